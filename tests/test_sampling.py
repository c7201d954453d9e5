"""Sampling: the distribution ``next_token`` draws from, and the repetition penalty in the decode loop.

The frequencies of 50k draws from one logits row are compared with the processed softmax
computed here in numpy (penalty -> temperature -> top-k -> top-p, the order ``ppo.rollout.collect``
documents): filtered tokens are never drawn, and Pearson's chi-square over the kept tokens stays
below its 1 - 1e-6 quantile.  Every case first checks that the distribution a plausible bug would
sample (no temperature, no top-p, top-p before top-k, ...) is far outside that bound.
"""

import numpy as np
import paddle
import pytest

from ppo.rollout.collect import generate
from ppo.rollout.sampling import GenerationConfig, next_token

N = 50_000  # draws per case: one row repeated, so one multinomial call
LOGITS = np.array([2.0, 1.6, 1.3, 0.9, 0.4, 0.0, -0.6, -1.5])


# ---------------------------------------------------------------------------------------------
# numpy reference (one row)


def np_softmax(z):
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


def np_penalty(z, seen, penalty):
    return np.where(seen, np.where(z > 0, z / penalty, z * penalty), z)


def np_top_k(z, k):
    if k <= 0:
        return z
    kth = np.sort(z)[::-1][k - 1]
    return np.where(z < kth, -np.inf, z)


def np_top_p(z, p):
    """Keep the top tokens, most likely first, until the kept probability reaches p."""
    if p >= 1:
        return z
    probs = np_softmax(z)
    keep, total = np.zeros(len(z), bool), 0.0
    for i in np.argsort(-z, kind="stable"):
        if total >= p:
            break
        keep[i] = True
        total += probs[i]
    return np.where(keep, z, -np.inf)


def np_distribution(z, temperature=1.0, top_k=0, top_p=1.0, seen=None, penalty=1.0, order="kp"):
    """The probabilities next_token samples from; ``order`` 'pk' composes top-p before top-k."""
    if seen is not None:
        z = np_penalty(z, seen, penalty)
    z = z / temperature
    z = np_top_p(np_top_k(z, top_k), top_p) if order == "kp" else np_top_k(np_top_p(z, top_p), top_k)
    return np_softmax(z)


def chi_square(freq, expected):
    """Pearson's statistic of N draws with frequencies ``freq`` over the tokens ``expected`` keeps."""
    keep = expected > 0
    return N * (((freq - expected)[keep]) ** 2 / expected[keep]).sum()


def chi_square_bound(expected):
    """The statistic's 1 - 1e-6 quantile (Wilson-Hilferty, slightly above the exact value)."""
    df = int((expected > 0).sum()) - 1
    return df * (1 - 2 / (9 * df) + 4.7534 * np.sqrt(2 / (9 * df))) ** 3


def sample_frequencies(config, seed, seen=None):
    paddle.seed(seed)
    logits = paddle.to_tensor(np.tile(LOGITS, (N, 1)).astype("float32"))
    mask = None if seen is None else paddle.to_tensor(np.tile(seen, (N, 1)))
    tokens = next_token(logits, config, mask).numpy()
    assert tokens.shape == (N,)
    return np.bincount(tokens, minlength=len(LOGITS)) / N


SEEN = np.array([True, False, False, True, False, False, True, False])

# (config, seen mask, the wrong distributions this case must tell apart from the right one)
CASES = {
    "temperature-0.7": (dict(temperature=0.7), None, [dict(temperature=1.0)]),
    "temperature-1.6-top-p": (dict(temperature=1.6, top_p=0.7),
                              None, [dict(temperature=1.0, top_p=0.7), dict(temperature=1.6)]),
    "temperature-0.7-top-k": (dict(temperature=0.7, top_k=3), None, [dict(temperature=0.7), dict(top_k=3)]),
    "top-k-then-top-p": (dict(temperature=1.6, top_k=4, top_p=0.7), None,
                         [dict(temperature=1.6, top_k=4, top_p=0.7, order="pk"),
                          dict(temperature=1.6, top_k=4), dict(temperature=1.6, top_p=0.7),
                          dict(temperature=1.0, top_k=4, top_p=0.7)]),
    "top-k-then-top-p-cold": (dict(temperature=0.7, top_k=3, top_p=0.8), None,
                              [dict(temperature=0.7, top_k=3, top_p=0.8, order="pk"),
                               dict(temperature=1.0, top_k=3, top_p=0.8)]),
    "penalty-then-temperature": (dict(temperature=0.7, top_p=0.9, repetition_penalty=1.5), SEEN,
                                 [dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_p=0.9, penalty=1.5),
                                  dict(temperature=0.7, penalty=1.5)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sampled_frequencies_match_the_processed_softmax(name):
    config, seen, wrong = CASES[name]
    penalty = config.get("repetition_penalty", 1.0)
    keys = dict(temperature=config.get("temperature", 1.0), top_k=config.get("top_k", 0),
                top_p=config.get("top_p", 1.0))
    expected = np_distribution(LOGITS, **keys, seen=seen, penalty=penalty)
    bound = chi_square_bound(expected)
    for mutation in wrong:
        # each bug samples a token that must never be drawn (>= 1% of the draws, the test allows
        # none) or moves the kept tokens' statistic to >= 10x its bound
        w = np_distribution(LOGITS, **{"seen": seen, **mutation})
        assert w[expected == 0].max(initial=0) >= 0.01 or chi_square(w, expected) >= 10 * bound, (name, mutation)
    for seed in (0, 1):
        freq = sample_frequencies(GenerationConfig(do_sample=True, **config), seed, seen)
        assert (freq[expected == 0] == 0).all(), (name, freq, expected)  # filtered tokens are never drawn
        assert chi_square(freq, expected) <= bound, (name, seed, freq, expected)


def test_greedy_takes_the_argmax_after_the_penalty():
    config = GenerationConfig(do_sample=False, temperature=0.3, top_k=2, repetition_penalty=2.0)
    seen = paddle.to_tensor(np.array([[True] + [False] * 7, [False] * 8]))
    logits = paddle.to_tensor(np.tile(LOGITS, (2, 1)).astype("float32"))
    assert next_token(logits, config, seen).numpy().tolist() == [1, 0]  # 2.0 / 2 < 1.6


# ---------------------------------------------------------------------------------------------
# the repetition penalty inside the decode loop


class FixedLogitsDecoder:
    """A decoder (``start`` / ``step`` / ``release``) whose next-token logits never change, so greedy
    decoding would repeat its favourite token forever; it records the tokens it is fed."""

    def __init__(self, logits):
        self.logits = np.asarray(logits, dtype="float32")
        self.vocab_size = len(self.logits)
        self.fed = []

    def _rows(self, B):
        return paddle.to_tensor(np.tile(self.logits, (B, 1)))

    def start(self, input_ids, attention_mask, position_ids, max_new_tokens):
        self.B = input_ids.shape[0]
        return self._rows(self.B)

    def step(self, token, token_mask, position_ids):
        self.fed.append(token.numpy().tolist())
        return self._rows(self.B)

    def release(self):
        pass


def naive_penalised_greedy(logits, prompt, steps, penalty):
    """Greedy decoding where every token of the prompt or generated so far is penalised."""
    seen, out = set(prompt), []
    for _ in range(steps):
        z = np.array([(v / penalty if v > 0 else v * penalty) if i in seen else v for i, v in enumerate(logits)])
        token = int(np.argmax(z))
        out.append(token)
        seen.add(token)
    return out


def test_repetition_penalty_tracks_tokens_generated_so_far():
    EOS, PAD, PROMPT_PAD = 2, 3, 7
    # token 6 is best but in the prompt; 4 comes next; 7 appears only as (masked) prompt padding
    logits = [-5.0, 2.0, -9.0, -5.0, 3.0, -5.0, 3.5, 2.8]
    ids = paddle.to_tensor([[PROMPT_PAD, 5, 6], [4, 5, 6]], dtype="int64")
    mask = paddle.to_tensor([[0, 1, 1], [1, 1, 1]], dtype="int64")
    config = GenerationConfig(max_new_tokens=5, do_sample=False, repetition_penalty=2.0)
    decoder = FixedLogitsDecoder(logits)
    seqs, seq_mask = generate(decoder, ids, mask, config, eos_token_id=EOS, pad_token_id=PAD)
    response = seqs.numpy()[:, 3:].tolist()
    # row 0: 4 first (6 is penalised), then 4 is penalised in its turn, so the padding id 7
    # (never a real prompt token) comes next, then 1, then 6 beats the penalised 4, 7 and 1
    assert response[0] == [4, 7, 1, 6, 6]
    assert response[1] == [7, 1, 6, 6, 6]
    for b, prompt in enumerate([[5, 6], [4, 5, 6]]):
        assert response[b] == naive_penalised_greedy(logits, prompt, 5, 2.0)
    # without the penalty greedy repeats its favourite
    plain, _ = generate(FixedLogitsDecoder(logits), ids, mask, GenerationConfig(max_new_tokens=5, do_sample=False),
                        eos_token_id=EOS, pad_token_id=PAD)
    assert plain.numpy()[:, 3:].tolist() == [[6] * 5] * 2
    assert decoder.fed == [list(col) for col in zip(*response)]  # every generated token was decoded
    assert seq_mask.numpy()[:, 3:].tolist() == [[1] * 5] * 2
