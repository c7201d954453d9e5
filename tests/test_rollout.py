"""Rollout: logit processors vs numpy, KV-cache generation vs a no-cache loop, masks, re-tokenisation."""

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import LlamaForCausalLM

from ppo.models import position_ids_from_mask
from ppo.rollout.collect import action_mask_of, forward_log_probs, generate, retokenize
from ppo.rollout.sampling import GenerationConfig, apply_repetition_penalty, top_k_filter, top_p_filter


def np_top_p_keep(row, p):
    order = np.argsort(-row, kind="stable")
    probs = np.exp(row[order] - row.max())
    probs /= probs.sum()
    keep, total = [], 0.0
    for idx, pr in zip(order, probs):
        if total >= p:
            break
        keep.append(idx)
        total += pr
    return set(keep)


def test_top_p_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 30)).astype("float32") * 2
    for p in (0.1, 0.5, 0.9, 0.999):
        out = top_p_filter(paddle.to_tensor(logits), p).numpy()
        for b in range(6):
            assert set(np.where(np.isfinite(out[b]))[0]) == np_top_p_keep(logits[b], p), (p, b)


def test_top_k_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 20)).astype("float32")
    out = top_k_filter(paddle.to_tensor(logits), 5).numpy()
    for b in range(4):
        assert set(np.where(np.isfinite(out[b]))[0]) == set(np.argsort(-logits[b])[:5])


def test_repetition_penalty_matches_definition():
    logits = np.array([[2.0, -1.0, 0.5, -3.0]], dtype="float32")
    seen = np.array([[True, True, False, False]])
    out = apply_repetition_penalty(paddle.to_tensor(logits), paddle.to_tensor(seen), 2.0).numpy()
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, -3.0]])


@pytest.fixture(scope="module")
def lm(tiny_dir):
    model = LlamaForCausalLM.from_pretrained(str(tiny_dir / "base"))
    model.eval()
    return model


def naive_greedy(model, prompt, steps, eos):
    """Greedy decoding without a KV cache: a full forward per token."""
    seq = list(prompt)
    out = []
    for _ in range(steps):
        ids = paddle.to_tensor([seq])
        logits = model(input_ids=ids, attention_mask=paddle.ones_like(ids), return_dict=True).logits
        tok = int(paddle.argmax(logits[0, -1]))
        out.append(tok)
        seq.append(tok)
        if tok == eos:
            break
    return out


def test_greedy_generation_matches_no_cache_loop_with_left_padding(lm):
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50, 51]]
    pad = 3
    P = 6
    ids = paddle.to_tensor([p_ + [] if len(p_) == P else [pad] * (P - len(p_)) + p_ for p_ in prompts])
    mask = paddle.to_tensor([[0] * (P - len(p_)) + [1] * len(p_) for p_ in prompts])
    cfg = GenerationConfig(max_new_tokens=8, do_sample=False)
    eos = 2
    seqs, full_mask = generate(lm, ids, mask, cfg, eos_token_id=eos, pad_token_id=pad)
    for b, p_ in enumerate(prompts):
        ref = naive_greedy(lm, p_, 8, eos)
        got = [int(t) for t, m in zip(seqs[b, P:].numpy(), full_mask[b, P:].numpy()) if m]
        assert got == ref


class ForceToken:
    """Wraps a causal LM so that ``token`` is the argmax of every step (an EOS-forcing model)."""

    def __init__(self, model, token):
        self.model, self.token, self.config = model, token, model.config

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        bump = paddle.zeros([out.logits.shape[-1]])
        bump[self.token] = 1e4
        out.logits = out.logits + bump
        return out


def test_eos_is_kept_as_an_action_when_pad_equals_eos(lm):
    ids = paddle.to_tensor([[1, 40, 41], [3, 1, 40]])
    mask = paddle.to_tensor([[1, 1, 1], [0, 1, 1]])
    seqs, full_mask = generate(ForceToken(lm, 2), ids, mask, GenerationConfig(max_new_tokens=5, do_sample=False),
                               eos_token_id=2, pad_token_id=2)
    assert seqs.numpy().tolist() == [[1, 40, 41, 2], [3, 1, 40, 2]]
    assert full_mask.numpy().tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    am = action_mask_of(full_mask, 3).numpy()
    assert am.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]  # the generated EOS is the one action


def test_finished_rows_are_padded_and_masked(lm):
    ids = paddle.to_tensor([[1, 40, 41]])
    seqs, full_mask = generate(ForceToken(lm, 7), ids, paddle.ones_like(ids),
                               GenerationConfig(max_new_tokens=4, do_sample=False), eos_token_id=2, pad_token_id=3)
    # never emits EOS: runs to max_new_tokens, every response token real
    assert seqs.numpy().tolist() == [[1, 40, 41, 7, 7, 7, 7]]
    assert full_mask.numpy().tolist() == [[1] * 7]


def test_sampling_is_seeded_and_log_probs_use_temperature(lm):
    ids = paddle.to_tensor([[1, 40, 41, 42]] * 3)
    mask = paddle.ones_like(ids)
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9)
    paddle.seed(5)
    a, _ = generate(lm, ids, mask, cfg, 2, 3)
    paddle.seed(5)
    b, _ = generate(lm, ids, mask, cfg, 2, 3)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    seq = paddle.to_tensor([[1, 40, 41, 42, 60, 61]])
    m = paddle.ones_like(seq)
    lp, _ = forward_log_probs(lm, seq, m, temperature=0.7)
    logits = lm(input_ids=seq, attention_mask=m, position_ids=position_ids_from_mask(m), return_dict=True).logits
    z = logits.numpy()[0, :-1] / 0.7
    ref = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    np.testing.assert_allclose(lp.numpy()[0], ref[np.arange(5), [40, 41, 42, 60, 61]], rtol=1e-5, atol=1e-5)


def test_retokenize_between_different_tokenizers(tiny_tokenizer, tmp_path):
    from ppo.tiny.build import build_tokenizer
    from ppo.tiny.task import corpus

    other = build_tokenizer(str(tmp_path / "other"), vocab_size=200, texts=list(corpus())[:500])
    assert len(other) != len(tiny_tokenizer)
    prompt = tiny_tokenizer("BEGINNING OF CONVERSATION: USER: Tell me about the cat. ASSISTANT:")["input_ids"]
    answer = tiny_tokenizer(" The cat is kind and warm.", add_special_tokens=False)["input_ids"] + [2]
    P = len(prompt) + 1
    seq = [3] + prompt + answer + [3, 3]  # left pad 1, right pad 2
    mask = [0] + [1] * (len(prompt) + len(answer)) + [0, 0]
    ids, m = retokenize(paddle.to_tensor([seq]), paddle.to_tensor([mask]), P, tiny_tokenizer, other, 64)
    got = [int(t) for t, k in zip(ids.numpy()[0], m.numpy()[0]) if k]
    expected = other("BEGINNING OF CONVERSATION: USER: Tell me about the cat. ASSISTANT:")["input_ids"] + \
        other(" The cat is kind and warm.", add_special_tokens=False)["input_ids"] + [other.eos_token_id]
    assert got == expected


def test_entropy_is_a_statistic_without_a_graph_unless_it_is_trained(lm):
    """entropy_grad=False (entropy_coeff 0): same values, no backward graph; True: gradients flow,
    and d(sum H)/d(logits) matches the analytic -p (log p + H) of a softmax entropy."""
    ids = paddle.to_tensor(np.random.default_rng(0).integers(4, 300, size=(2, 7)), dtype="int64")
    mask = paddle.ones_like(ids)
    lm.train()
    _, h_stat = forward_log_probs(lm, ids, mask, 0.8, with_entropy=True, entropy_grad=False)
    _, h_train = forward_log_probs(lm, ids, mask, 0.8, with_entropy=True, entropy_grad=True)
    np.testing.assert_allclose(h_stat.numpy(), h_train.numpy(), rtol=1e-6, atol=1e-6)
    assert h_stat.stop_gradient and not h_train.stop_gradient
    logits = paddle.to_tensor(np.random.default_rng(1).normal(size=(3, 11)).astype("float32"), stop_gradient=False)
    from ppo.core.algorithms import entropy_from_logits

    entropy_from_logits(logits).sum().backward()
    z = logits.numpy()
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    H = -(p * np.log(p)).sum(-1, keepdims=True)
    np.testing.assert_allclose(logits.grad.numpy(), -p * (np.log(p) + H), rtol=1e-4, atol=1e-6)
    lm.clear_gradients()
    lm.eval()


@pytest.mark.parametrize("size", [1, 2, 3])
def test_bucketed_generation_equals_one_batch(lm, size):
    """Rows grouped by prompt length and decoded a few at a time give the one-batch greedy result,
    in the input order and layout (prompts left padded, responses right padded)."""
    from ppo.rollout.inference import InferenceModel
    from ppo.rollout.collect import generate_in_buckets

    rng = np.random.default_rng(4)
    B, P = 5, 9
    ids = rng.integers(4, 300, size=(B, P))
    mask = np.ones((B, P), dtype="int64")
    for b, pad in enumerate([3, 0, 5, 1, 3]):  # mixed lengths, not sorted
        mask[b, :pad] = 0
        ids[b, :pad] = 3
    ids, mask = paddle.to_tensor(ids, dtype="int64"), paddle.to_tensor(mask)
    for decoder in (lm, InferenceModel(lm)):
        base = GenerationConfig(max_new_tokens=7, do_sample=False)
        want, want_mask = generate(decoder, ids, mask, base, eos_token_id=2, pad_token_id=3)
        got, got_mask = generate_in_buckets(decoder, ids, mask, GenerationConfig(max_new_tokens=7, do_sample=False,
                                                                                 micro_batch_size=size), 2, 3)
        np.testing.assert_array_equal(got_mask.numpy(), want_mask.numpy())
        np.testing.assert_array_equal(got.numpy(), want.numpy())
