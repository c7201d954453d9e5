"""The rollout inference model: same logits and greedy tokens as the training model, live weights."""

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

from ppo.models import cpu_gemm
from ppo.rollout.inference import InferenceModel
from ppo.models import position_ids_from_mask
from ppo.rollout.collect import GenerationConfig, forward_log_probs, generate


def make_model(seed=0, **extra):
    paddle.seed(seed)
    dims = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, use_flash_attention=False)
    config = LlamaConfig(**dims)
    for key, value in extra.items():
        # set after construction: PretrainedConfig.__init__ resets fuse_attention_* to False
        setattr(config, key, value)
    model = LlamaForCausalLM(config)
    attn = model.llama.layers[0].self_attn
    assert hasattr(attn, "qkv_proj") == bool(extra.get("fuse_attention_qkv"))  # the variant is really built
    model.eval()
    return model


def prompts(B=5, P=9, vocab=320, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(B, P))
    mask = np.ones((B, P), dtype="int64")
    for b in range(B):  # mixed lengths, left padded
        mask[b, : b % 4] = 0
        ids[b, : b % 4] = 3
    return paddle.to_tensor(ids, dtype="int64"), paddle.to_tensor(mask)


@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 2}, {"fuse_attention_qkv": True,
                                                                      "fuse_attention_ffn": True},
                                   {"num_key_value_heads": 2, "fuse_attention_qkv": True}],
                         ids=["plain", "grouped-kv", "fused-weights", "grouped-kv-fused-qkv"])
def test_greedy_tokens_equal_the_training_model(extra):
    model = make_model(**extra)
    assert_same_greedy(InferenceModel(model), model, GenerationConfig(max_new_tokens=12, do_sample=False))


def assert_same_greedy(decoder, model, config):
    """``decoder`` generates the training model's greedy tokens and masks on mixed-length prompts."""
    ids, mask = prompts()
    ref, ref_mask = generate(model, ids, mask, config, eos_token_id=2, pad_token_id=3)
    got, got_mask = generate(decoder, ids, mask, config, eos_token_id=2, pad_token_id=3)
    np.testing.assert_array_equal(got.numpy(), ref.numpy())
    np.testing.assert_array_equal(got_mask.numpy(), ref_mask.numpy())


def test_prefill_and_step_logits_match_the_full_forward():
    model = make_model()
    ids, mask = prompts()
    inference = InferenceModel(model)
    pos = position_ids_from_mask(mask)
    with paddle.no_grad():
        first = inference.start(ids, mask, pos, max_new_tokens=3)
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos, return_dict=True).logits[:, -1]
        np.testing.assert_allclose(first.numpy(), full.numpy(), rtol=1e-5, atol=1e-5)
        token = paddle.argmax(first, axis=-1)
        second = inference.step(token, paddle.ones_like(token), pos[:, -1:] + 1)
        ids2 = paddle.concat([ids, token.unsqueeze(1)], axis=1)
        mask2 = paddle.concat([mask, paddle.ones_like(token).unsqueeze(1)], axis=1)
        full2 = model(input_ids=ids2, attention_mask=mask2, position_ids=position_ids_from_mask(mask2),
                      return_dict=True).logits[:, -1]
    np.testing.assert_allclose(second.numpy(), full2.numpy(), rtol=1e-5, atol=1e-5)


def uneven_prompts(lengths=(19, 20, 7, 11, 1, 3), vocab=320, seed=4):
    """Left-padded prompts of very different lengths (the prefill splits them into groups)."""
    rng = np.random.default_rng(seed)
    P = max(lengths)
    ids = np.full((len(lengths), P), 3, dtype="int64")
    mask = np.zeros((len(lengths), P), dtype="int64")
    for b, n in enumerate(lengths):
        ids[b, P - n:] = rng.integers(4, vocab, size=n)
        mask[b, P - n:] = 1
    return paddle.to_tensor(ids), paddle.to_tensor(mask)


@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 2}], ids=["plain", "grouped-kv"])
@pytest.mark.parametrize("overhead, widths_expected", [(0, [20, 19, 11, 7, 3, 1]), (6, [20, 11, 3])],
                         ids=["a-group-per-row", "pairs"])
def test_prefill_in_length_groups_equals_the_whole_batch_prefill(extra, overhead, widths_expected):
    """Prompts of unequal lengths are prefilled in groups, each cut to its own longest prompt: the
    first logits, the cache's real slots and the following steps' logits equal the whole batch's
    prefill, in the input's row order (the pairs: rows (1, 0), (3, 2), (5, 4), the longer first);
    the toolkit's CPU kernels on, which write the cache in place."""
    assert cpu_gemm.activate("onednn") is None
    model = make_model(**extra)
    ids, mask = uneven_prompts()
    pos = position_ids_from_mask(mask)
    whole, grouped = InferenceModel(model), InferenceModel(model)
    whole.PREFILL_GROUP_OVERHEAD = 10 ** 9  # one group: the whole batch, padded to the longest prompt
    grouped.PREFILL_GROUP_OVERHEAD = overhead
    widths = []
    forward = grouped._forward
    grouped._forward = lambda ids_, *a: widths.append(ids_.shape[1]) or forward(ids_, *a)
    real = mask.numpy().astype(bool)
    with paddle.no_grad():
        first = [m.start(ids, mask, pos, max_new_tokens=3) for m in (whole, grouped)]
        assert widths == widths_expected  # really in groups, each cut to its longest prompt
        np.testing.assert_allclose(first[1].numpy(), first[0].numpy(), rtol=1e-5, atol=1e-5)
        for a, b in zip(whole.cache, grouped.cache):  # [layers, B, kv, T, D]: the prompts' real slots
            a, b = a.numpy()[:, :, :, :ids.shape[1]], b.numpy()[:, :, :, :ids.shape[1]]
            np.testing.assert_allclose(b.transpose(1, 3, 0, 2, 4)[real], a.transpose(1, 3, 0, 2, 4)[real],
                                       rtol=1e-5, atol=1e-5)
        token, next_pos = paddle.argmax(first[0], axis=-1), pos[:, -1:] + 1
        for _ in range(2):
            steps = [m.step(token, paddle.ones_like(token), next_pos) for m in (whole, grouped)]
            np.testing.assert_allclose(steps[1].numpy(), steps[0].numpy(), rtol=1e-5, atol=1e-5)
            token, next_pos = paddle.argmax(steps[0], axis=-1), next_pos + 1


def test_greedy_tokens_with_a_grouped_prefill_equal_the_training_model():
    assert cpu_gemm.activate("onednn") is None
    model = make_model()
    decoder = InferenceModel(model)
    decoder.PREFILL_GROUP_OVERHEAD = 0
    ids, mask = uneven_prompts()
    config = GenerationConfig(max_new_tokens=8, do_sample=False)
    ref, ref_mask = generate(model, ids, mask, config, eos_token_id=2, pad_token_id=3)
    got, got_mask = generate(decoder, ids, mask, config, eos_token_id=2, pad_token_id=3)
    np.testing.assert_array_equal(got.numpy(), ref.numpy())
    np.testing.assert_array_equal(got_mask.numpy(), ref_mask.numpy())


def test_prefill_stays_one_batch_without_in_place_cache_writes_or_left_padding():
    """No groups where the cache would be written by paddle's assignment (a copy of the whole cache
    per row and layer) or where a prompt's real tokens are not its last columns; logits as the
    paddlenlp forward's."""
    model = make_model()
    ids, mask = uneven_prompts()
    right = paddle.to_tensor(np.ascontiguousarray(mask.numpy()[:, ::-1]))
    right_ids = paddle.to_tensor(np.ascontiguousarray(ids.numpy()[:, ::-1]))
    for kernels, prompt, prompt_mask in ((False, ids, mask), (True, right_ids, right)):
        assert cpu_gemm.activate("onednn" if kernels else "paddle") is None
        decoder = InferenceModel(model)
        decoder.PREFILL_GROUP_OVERHEAD = 0
        widths = []
        forward = decoder._forward
        decoder._forward = lambda ids_, *a: widths.append(ids_.shape[1]) or forward(ids_, *a)
        pos = position_ids_from_mask(prompt_mask)
        with paddle.no_grad():
            first = decoder.start(prompt, prompt_mask, pos, max_new_tokens=2)
            full = model(input_ids=prompt, attention_mask=prompt_mask, position_ids=pos, return_dict=True).logits[:, -1]
        assert widths == [prompt.shape[1]], (kernels, widths)
        if not kernels:  # (right padding: the last column is padding for most rows, compared nowhere)
            np.testing.assert_allclose(first.numpy(), full.numpy(), rtol=1e-5, atol=1e-5)


def test_rollout_after_an_update_uses_the_updated_weights():
    """The inference model is built once; an optimizer step on the training model shows up in the
    next rollout: log-probs of that rollout's tokens (from the decode logits) equal the updated
    training model's log-probs of the same sequences."""
    model = make_model()
    inference = InferenceModel(model)
    ids, mask = prompts()
    opt = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=model.parameters())
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, return_dict=True).logits.mean()
    loss.backward()
    opt.step()
    model.eval()

    recorded = []

    class Recording:
        vocab_size = inference.vocab_size

        def start(self, *a):
            recorded.append(inference.start(*a))
            return recorded[-1]

        def step(self, *a):
            recorded.append(inference.step(*a))
            return recorded[-1]

        def release(self):
            inference.release()

    paddle.seed(4)
    seqs, full_mask = generate(Recording(), ids, mask, GenerationConfig(max_new_tokens=6, temperature=0.8),
                               eos_token_id=2, pad_token_id=3)
    P = ids.shape[1]
    steps = seqs.shape[1] - P
    decode_logits = paddle.stack(recorded[:steps], axis=1) / 0.8  # [B, R, V]
    decode_lp = paddle.take_along_axis(paddle.nn.functional.log_softmax(decode_logits, -1),
                                       seqs[:, P:].unsqueeze(-1), axis=-1).squeeze(-1).numpy()
    with paddle.no_grad():
        train_lp, _ = forward_log_probs(model, seqs, full_mask, temperature=0.8)
    train_lp = train_lp.numpy()[:, P - 1:]
    live = full_mask.numpy()[:, P:].astype(bool)
    np.testing.assert_allclose(decode_lp[live], train_lp[live], atol=1e-4)
    # and the weights really moved: the stale (initial) model disagrees
    stale = make_model()
    with paddle.no_grad():
        stale_lp, _ = forward_log_probs(stale, seqs, full_mask, temperature=0.8)
    assert np.abs(stale_lp.numpy()[:, P - 1:][live] - train_lp[live]).max() > 1e-2


def rollout_like(B=5, P=7, R=6, vocab=320, seed=2):
    """Prompt (left padded, mixed lengths) + response (right padded, mixed lengths), as collect makes."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(B, P + R))
    mask = np.ones((B, P + R), dtype="int64")
    for b in range(B):
        mask[b, : b % 3] = 0
        mask[b, P + R - (b % 4):] = 0
    ids[mask == 0] = 3
    return paddle.to_tensor(ids, dtype="int64"), paddle.to_tensor(mask)


@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 2}, {"fuse_attention_qkv": True,
                                                                      "fuse_attention_ffn": True},
                                   {"num_key_value_heads": 2, "fuse_attention_qkv": True}],
                         ids=["plain", "grouped-kv", "fused-weights", "grouped-kv-fused-qkv"])
def test_scoring_log_probs_equal_the_training_forward(extra):
    model = make_model(**extra)
    seqs, mask = rollout_like()
    with paddle.no_grad():
        want, _ = forward_log_probs(model, seqs, mask, temperature=0.7)
    got = InferenceModel.of(model).log_probs(seqs, mask, temperature=0.7)
    real = mask[:, 1:].numpy() * mask[:, :-1].numpy() > 0  # positions whose query and target are real tokens
    np.testing.assert_allclose(got.numpy()[real], want.numpy()[real], rtol=1e-5, atol=1e-5)
    assert np.isfinite(got.numpy()).all()  # padding positions too: they are masked by multiplication later
    assert InferenceModel.of(model) is InferenceModel.of(model)  # one cached view per model


def test_scoring_scores_equal_the_score_model_forward():
    from ppo.models.families.llama import LlamaModelForScore

    paddle.seed(4)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, use_flash_attention=False, score_dim=1,
                         score_bias=True)
    model = LlamaModelForScore(config)
    model.eval()
    seqs, mask = rollout_like(seed=5)
    with paddle.no_grad():
        out = model(seqs, mask)
    scores, end = InferenceModel.of(model).scores(seqs, mask)
    real = mask.numpy() > 0
    assert np.isfinite(scores.numpy()).all()
    np.testing.assert_allclose(scores.numpy()[..., 0][real], out.scores.numpy()[..., 0][real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(end.numpy(), out.end_scores.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 2}], ids=["plain", "grouped-kv"])
def test_static_graph_decode_equals_the_eager_step_and_follows_weight_updates(extra):
    """``static_decode``: the compiled step gives the eager step's logits and tokens, recompiles for
    a new bucket shape, and reads the parameters by reference (an in-place update is seen)."""
    model = make_model(**extra)
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    eager, static = InferenceModel(model), InferenceModel(model, static_decode=True)

    def logits_of(view, ids, mask):
        pos = position_ids_from_mask(mask)
        out = [view.start(ids, mask, pos, 4)]
        for i in range(3):
            token = paddle.argmax(out[-1], axis=-1)
            out.append(view.step(token, paddle.ones_like(token), pos[:, -1:] + 1 + i))
        view.release()
        return np.stack([o.numpy() for o in out])

    with paddle.no_grad():
        for B, P in ((5, 9), (3, 6)):  # two shape buckets
            ids, mask = prompts(B=B, P=P)
            np.testing.assert_allclose(logits_of(static, ids, mask), logits_of(eager, ids, mask), rtol=1e-6, atol=1e-6)
            got, _ = generate(static, ids, mask, config, eos_token_id=2, pad_token_id=3)
            ref, _ = generate(eager, ids, mask, config, eos_token_id=2, pad_token_id=3)
            np.testing.assert_array_equal(got.numpy(), ref.numpy())
        before = logits_of(static, ids, mask)
        weight = model.llama.layers[0].mlp.down_proj.weight
        weight.set_value(weight * 1.5)
        after = logits_of(static, ids, mask)
        assert np.abs(after[1:] - before[1:]).max() > 1e-3  # the decode steps see the new weights
        np.testing.assert_allclose(after, logits_of(eager, ids, mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [
    dict(temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.6),
    dict(temperature=1.3, top_p=0.5, repetition_penalty=0.7, micro_batch_size=2),
    dict(do_sample=False, temperature=0.6, repetition_penalty=2.0),
], ids=["penalty-topk-topp", "buckets-topp", "greedy"])
def test_rollout_log_probs_equal_the_recomputed_ones(config):
    """The log-probs kept from the decode steps are the scoring forward's (tempered, unfiltered:
    the penalty and the top-k / top-p filters only steer sampling) to 1e-5."""
    from ppo.rollout.collect import generate_in_buckets

    model = make_model(seed=4, num_key_value_heads=2)
    ids, mask = prompts(B=6)
    paddle.seed(11)
    gen = GenerationConfig(max_new_tokens=10, **{"do_sample": True, **config})
    seqs, full_mask, kept = generate_in_buckets(InferenceModel(model), ids, mask, gen, eos_token_id=2,
                                                pad_token_id=3, return_log_probs=True)
    P = ids.shape[1]
    want = InferenceModel.of(model).log_probs(seqs, full_mask, gen.temperature).numpy()[:, P - 1:]
    response = full_mask.numpy()[:, P:] > 0
    assert kept.shape == [6, seqs.shape[1] - P] and response.sum() > 20
    np.testing.assert_allclose(kept.numpy()[response], want[response], rtol=0, atol=1e-5)
    assert (kept.numpy()[~response] == 0).all()



def test_length_groups_are_the_cheapest_contiguous_partition():
    """The dynamic programme's grouping costs what the best of every contiguous partition of the
    length-sorted rows costs (brute force), and covers every row once."""
    import itertools

    from ppo.core.batching import length_groups

    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 300, size=int(rng.integers(1, 8)))
        groups = length_groups(lengths, overhead=40)
        assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
        cost = sum(len(g) * lengths[g].max() + 40 for g in groups)
        ls = np.sort(lengths)[::-1]
        best = min(sum((b - a) * ls[a] + 40 for a, b in zip((0,) + cuts, cuts + (len(ls),)))
                   for k in range(len(ls)) for cuts in itertools.combinations(range(1, len(ls)), k))
        assert cost == best


def test_scoring_in_length_groups_equals_one_batch():
    """Packed length groups give every real position the one-batch log-probs and scores (1e-5)."""
    from ppo.rollout.collect import score_in_length_groups

    model = make_model(seed=6)
    seqs, mask = rollout_like(B=7, P=9, R=8, seed=3)
    view = InferenceModel.of(model)
    want = view.log_probs(seqs, mask, 0.9).numpy()
    got = score_in_length_groups(lambda s, m: (view.log_probs(s, m, 0.9),), seqs, mask, ("action",))[0].numpy()
    real = mask[:, 1:].numpy() * mask[:, :-1].numpy() > 0
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-5)
    assert (got[~real] == 0).all()
    hidden_want = view.final_hidden(seqs, mask).numpy()
    hidden_got, last = score_in_length_groups(lambda s, m: (view.final_hidden(s, m), s[:, :1]), seqs, mask,
                                              ("token", "row"))
    live = mask.numpy() > 0
    np.testing.assert_allclose(hidden_got.numpy()[live], hidden_want[live], rtol=0, atol=1e-5)
    first = (mask.numpy() > 0).argmax(axis=1)
    np.testing.assert_array_equal(last.numpy()[:, 0], seqs.numpy()[np.arange(7), first])  # rows back in place


def test_decode_step_with_adapters_on_some_projections_equals_the_training_forward():
    """With LoRA adapters on only some projections, after the adapters and base weights move, and
    again after a further change (a new start without a release), prefill and step logits are the
    training forward's."""
    from ppo.models.lora import apply_lora

    model = make_model(seed=7, num_key_value_heads=2)
    apply_lora(model, rank=3, alpha=6.0, targets="q_proj,v_proj,up_proj,o_proj")
    for p in model.parameters():  # adapters B start at zero: move every weight, adapters included
        p.set_value(p + 0.02 * paddle.randn(p.shape, p.dtype))
    model.eval()
    ids, mask = prompts()
    inference = InferenceModel(model)
    pos = position_ids_from_mask(mask)
    with paddle.no_grad():
        for _ in range(2):  # a second rollout after the weights change again: fresh copies
            first = inference.start(ids, mask, pos, max_new_tokens=2)
            token = paddle.argmax(first, axis=-1)
            second = inference.step(token, paddle.ones_like(token), pos[:, -1:] + 1)  # (no release: start rebuilds)
            ids2 = paddle.concat([ids, token.unsqueeze(1)], axis=1)
            mask2 = paddle.concat([mask, paddle.ones_like(token).unsqueeze(1)], axis=1)
            full = model(input_ids=ids2, attention_mask=mask2, position_ids=position_ids_from_mask(mask2),
                         return_dict=True).logits
            np.testing.assert_allclose(first.numpy(), full[:, -2].numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(second.numpy(), full[:, -1].numpy(), rtol=1e-5, atol=1e-5)
            weight = model.llama.layers[1].self_attn.k_proj.weight
            weight.set_value(weight * 1.5)
