"""Activation checkpointing: the same gradients with and without it, for every granularity."""

import numpy as np
import paddle
import pytest

GRANULARITIES = ("full", "full_attn", "core_attn")


def tiny_llama(seed=0):
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    paddle.seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, dtype="float32",
                         use_flash_attention=False)
    return LlamaForCausalLM(config)


def batch():
    rng = np.random.default_rng(0)
    ids = paddle.to_tensor(rng.integers(3, 320, size=(3, 12)), dtype="int64")
    mask = np.ones((3, 12), dtype="int64")
    mask[1, :4] = 0  # a left-padded row: masking must recompute the same way
    return ids, paddle.to_tensor(mask)


def lm_grads(model):
    """Gradients of the summed next-token loss, by parameter name (float32 numpy)."""
    ids, mask = batch()
    logits = model(input_ids=ids, attention_mask=mask, return_dict=True).logits
    loss = paddle.nn.functional.cross_entropy(logits[:, :-1], ids[:, 1:].unsqueeze(-1)).mean()
    loss.backward()
    return float(loss), {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


def recomputed_block(function) -> str:
    """Which block a recompute call covers: 'full_attn' (the attention layer), 'core_attn' (the
    attention kernel) or 'full' (the decoder layer, through paddlenlp's custom-forward closure)."""
    from paddlenlp.transformers.llama.modeling import LlamaAttention

    from ppo.models.fast_paths import attention

    if isinstance(function, LlamaAttention):
        return "full_attn"
    inner = getattr(function, "func", function)
    # the attention kernel: paddlenlp's, or the toolkit's fast path wrapping it (ppo.models.fast_paths)
    core = inner is attention or getattr(inner, "__name__", "") == "scaled_dot_product_attention"
    return "core_attn" if core else "full"


@pytest.fixture
def count_recomputes(monkeypatch):
    """How often paddlenlp's llama code calls paddle's recompute (proof that it is switched on)."""
    from paddlenlp.transformers.llama import modeling

    calls = []
    original = modeling.recompute

    def counting(function, *a, **k):
        calls.append(recomputed_block(function))
        return original(function, *a, **k)

    monkeypatch.setattr(modeling, "recompute", counting)
    return calls


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_causal_lm_gradients_identical_with_recompute(granularity, count_recomputes):
    from ppo.models.recompute import enable_recompute

    loss, reference = lm_grads(tiny_llama())
    assert not count_recomputes
    model = enable_recompute(tiny_llama(), granularity)
    loss_r, grads = lm_grads(model)
    assert count_recomputes == [granularity] * 2  # once per decoder layer, the chosen block
    assert model.config.recompute and model.config.recompute_granularity == granularity
    # the recomputed forward runs the same kernels on the same inputs: bitwise equal on CPU
    assert loss_r == loss
    assert grads.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(grads[name], reference[name], err_msg=name)


@pytest.mark.parametrize("granularity", ["full", "core_attn"])
def test_score_model_gradients_identical_with_recompute(granularity, tiny_dir, count_recomputes):
    from ppo.models import load_score_model
    from ppo.models.recompute import enable_recompute

    ids, mask = batch()

    def grads(model):
        model(ids, mask).end_scores.sum().backward()
        return {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}

    paddle.seed(1)
    reference = grads(load_score_model(str(tiny_dir / "base")))
    paddle.seed(1)
    model = enable_recompute(load_score_model(str(tiny_dir / "base")), granularity)
    got = grads(model)
    assert count_recomputes == [granularity] * 2
    for name in reference:
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)


def test_recompute_rejects_unknown_granularity():
    from ppo.core.errors import UserError
    from ppo.models.recompute import enable_recompute

    with pytest.raises(UserError, match="granularity must be one of"):
        enable_recompute(tiny_llama(), "selective")
