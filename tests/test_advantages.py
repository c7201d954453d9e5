"""The composed advantage step (ppo.core.advantages.compute_advantages) against a naive numpy loop.

Every estimator, with and without advantage normalisation, every KL estimator, KL in the reward
or as a loss, the missing-EOS penalty and the score clip, on a hand-built ``Experience``: random
log-probs, values and scores (garbage outside the responses, which must be masked), responses
of different lengths, some cut off without EOS, two prompts with four responses each.
"""

import itertools
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from ppo.core.advantages import compute_advantages, mean_sequence_kl
from ppo.core.experience import Experience

P, R, GROUP = 4, 6, 4                          # prompt length, longest response, responses per prompt
LENGTHS = [6, 3, 1, 5, 2, 6, 4, 6]             # response tokens (EOS included when it ended)
ENDED = [False, True, True, True, True, False, True, True]
KL_COEFF = 0.15


def make_experience(seed=0, with_values=True) -> Experience:
    rng = np.random.default_rng(seed)
    B, L = len(LENGTHS), P + R
    T = L - 1
    attention = np.zeros((B, L), np.int64)
    action = np.zeros((B, T), np.float32)
    for b, n in enumerate(LENGTHS):
        attention[b, :P + n] = 1
        action[b, P - 1:P - 1 + n] = 1  # column t scores token t + 1
    old = -np.abs(rng.normal(1.0, 0.8, (B, T)))
    ref = old + rng.normal(0, 0.4, (B, T))  # log-ratios of +-0.4: the three KL estimators differ
    f32 = lambda a: paddle.to_tensor(np.asarray(a, np.float32))  # noqa: E731
    return Experience(
        sequences=paddle.to_tensor(rng.integers(4, 50, (B, L))), attention_mask=paddle.to_tensor(attention),
        action_mask=f32(action), old_log_probs=f32(old), ref_log_probs=f32(ref),
        end_scores=f32(rng.normal(0, 1.5, B)),  # some beyond the score clip
        response_lengths=paddle.to_tensor(LENGTHS, dtype="int64"), ended_with_eos=paddle.to_tensor(ENDED),
        prompt_length=P, values=f32(rng.normal(0, 1, (B, T))) if with_values else None)


def make_args(estimator, normalize, kl_estimator="k1", kl_mode="reward", missing_eos_penalty=0.0,
              clip_range_score=0.0):
    return SimpleNamespace(adv_estimator=estimator, normalize_advantage=normalize, kl_estimator=kl_estimator,
                           kl_mode=kl_mode, missing_eos_penalty=missing_eos_penalty,
                           clip_range_score=clip_range_score, gamma=0.9, lam=0.8, num_return_sequences=GROUP)


# ---------------------------------------------------------------------------------------------
# numpy reference: one row, one token at a time


def np_whiten(x, mask, moments=None):
    if moments is None:
        n = mask.sum()
        mean = (x * mask).sum() / n
        var = ((x - mean) ** 2 * mask).sum() / (n - 1)
    else:
        mean, var = moments
    return (x - mean) / np.sqrt(var + 1e-8)


def reference(exp: Experience, args, kl_coeff, moments=None):
    """(kl, rewards, advantages, returns) as float64 [B, T] arrays."""
    mask = exp.action_mask.numpy().astype(np.float64)
    old, ref = (t.numpy().astype(np.float64) for t in (exp.old_log_probs, exp.ref_log_probs))
    scores, ended = exp.end_scores.numpy().astype(np.float64), exp.ended_with_eos.numpy()
    B, T = mask.shape
    kl, rewards = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                r = old[b, t] - ref[b, t]
                kl[b, t] = {"k1": r, "k2": r * r / 2, "k3": np.exp(-r) - 1 + r}[args.kl_estimator]
                if args.kl_mode == "reward":
                    rewards[b, t] = -kl_coeff * kl[b, t]
        score = scores[b] + (0.0 if ended[b] else args.missing_eos_penalty)
        if args.clip_range_score > 0:
            score = min(max(score, -args.clip_range_score), args.clip_range_score)
        last = max(t for t in range(T) if mask[b, t])
        rewards[b, last] += score

    adv, returns = np.zeros((B, T)), np.zeros((B, T))
    if args.adv_estimator == "gae":
        values = exp.values.numpy().astype(np.float64) * mask
        for b in range(B):
            running = 0.0
            for t in reversed(range(T)):
                next_value = values[b, t + 1] if t + 1 < T else 0.0
                delta = rewards[b, t] + args.gamma * next_value - values[b, t]
                running = delta + args.gamma * args.lam * running
                adv[b, t] = running * mask[b, t]
                returns[b, t] = (running + values[b, t]) * mask[b, t]
    elif args.adv_estimator in ("grpo", "rloo"):
        total = [sum(rewards[b, t] for t in range(T) if mask[b, t]) for b in range(B)]  # the shaped return
        for g in range(0, B, GROUP):
            group = total[g:g + GROUP]
            for i, s in enumerate(group):
                if args.adv_estimator == "grpo":
                    a = (s - np.mean(group)) / (np.std(group, ddof=1) + 1e-6)
                else:
                    a = s - (sum(group) - s) / (GROUP - 1)
                adv[g + i] = a * mask[g + i]
        returns = adv.copy()
    else:  # reinforce_plus_plus: discounted reward-to-go, whitened over the batch's tokens
        for b in range(B):
            running = 0.0
            for t in reversed(range(T)):
                running = rewards[b, t] * mask[b, t] + args.gamma * running
                returns[b, t] = running * mask[b, t]
        adv = np_whiten(returns, mask, moments) * mask
    if args.normalize_advantage and args.adv_estimator != "reinforce_plus_plus":
        adv = np_whiten(adv, mask, moments) * mask
    return kl, rewards, adv, returns


def assert_matches(got: Experience, want):
    for name, value in zip(("kl", "rewards", "advantages", "returns"), want):
        np.testing.assert_allclose(getattr(got, name).numpy(), value, rtol=1e-5, atol=1e-5, err_msg=name)


SHAPING = {  # (kl_mode, missing_eos_penalty, clip_range_score)
    "kl-in-reward-eos-penalty-clip": ("reward", -1.0, 1.5),
    "kl-in-reward-no-clip": ("reward", 0.0, 0.0),
    "kl-as-loss": ("loss", 0.5, 2.0),
}


@pytest.mark.parametrize("estimator,normalize,kl_estimator,shaping", [
    pytest.param(*c, id="-".join(str(x) for x in c)) for c in
    itertools.product(["gae", "grpo", "rloo", "reinforce_plus_plus"], [True, False], ["k1", "k2", "k3"], SHAPING)])
def test_compute_advantages_matches_numpy(estimator, normalize, kl_estimator, shaping):
    kl_mode, penalty, clip = SHAPING[shaping]
    args = make_args(estimator, normalize, kl_estimator, kl_mode, penalty, clip)
    exp = make_experience(with_values=estimator == "gae")
    got = compute_advantages(exp, args, KL_COEFF)
    assert_matches(got, reference(exp, args, KL_COEFF))
    assert exp.advantages is None and exp.kl is None  # pure: the input is not changed
    for f in ("sequences", "action_mask", "old_log_probs", "end_scores", "values"):
        assert getattr(got, f) is getattr(exp, f)


def test_the_cases_tell_the_inputs_apart():
    """The KL shaping moves the group advantages, lam matters, the score clip and the EOS penalty
    change some rows: the cases above run on inputs where those bugs show."""
    exp = make_experience()
    for estimator in ("grpo", "rloo"):
        args = make_args(estimator, False, "k1", "reward", -1.0, 1.5)
        shaped, unshaped = (reference(exp, args, coeff)[2] for coeff in (KL_COEFF, 0.0))
        assert np.abs(shaped - unshaped).max() > 0.05
    _, clipped, _, _ = reference(exp, make_args("grpo", False, "k1", "reward", -1.0, 1.5), KL_COEFF)
    _, unclipped, _, _ = reference(exp, make_args("grpo", False, "k1", "reward", 0.0, 0.0), KL_COEFF)
    assert (np.abs(clipped - unclipped).sum(axis=1) > 0.1).sum() >= 3
    gae = lambda lam: reference(exp, SimpleNamespace(**{**vars(make_args("gae", False)), "lam": lam}), 0.1)[2]  # noqa
    assert np.abs(gae(0.8) - gae(0.95)).max() > 0.05 and np.abs(gae(0.8) - gae(1.0)).max() > 0.05


@pytest.mark.parametrize("estimator", ["gae", "grpo", "reinforce_plus_plus"])
def test_whitening_uses_the_moments_it_is_given(estimator):
    """``moments`` (the all-data-rank statistics in the trainer) replaces the batch's own mean and
    variance, once per whitening, on the values being whitened; None falls back to the batch's."""
    exp = make_experience(with_values=estimator == "gae")
    args = make_args(estimator, True, "k3", "reward", -0.5, 1.5)
    calls = []

    def fixed(values, mask):
        calls.append((values.numpy().copy(), mask.numpy().copy()))
        return 0.3, 2.0

    got = compute_advantages(exp, args, KL_COEFF, moments=fixed)
    assert_matches(got, reference(exp, args, KL_COEFF, moments=(0.3, 2.0)))
    assert len(calls) == 1
    raw = reference(exp, make_args(estimator, False, "k3", "reward", -0.5, 1.5), KL_COEFF)
    mask = exp.action_mask.numpy()
    # what gets whitened: the estimator's advantages (reward-to-go for REINFORCE++)
    np.testing.assert_allclose(calls[0][0] * mask, raw[3] if estimator == "reinforce_plus_plus" else raw[2],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(calls[0][1], mask)
    local = compute_advantages(exp, args, KL_COEFF, moments=lambda v, m: None)
    assert_matches(local, reference(exp, args, KL_COEFF))
    assert np.abs(local.advantages.numpy() - got.advantages.numpy()).max() > 0.1


def test_mean_sequence_kl_is_the_mean_of_per_row_sums():
    exp = compute_advantages(make_experience(), make_args("gae", True, "k3"), KL_COEFF)
    kl = reference(exp, make_args("gae", True, "k3"), KL_COEFF)[0]
    assert mean_sequence_kl(exp) == pytest.approx(kl.sum(axis=1).mean(), rel=1e-5)


def test_unknown_estimator_is_named():
    exp = make_experience()
    with pytest.raises(ValueError, match="'ppo'"):
        compute_advantages(exp, make_args("ppo", True), KL_COEFF)

