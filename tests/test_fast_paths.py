"""The fast CPU paths through paddlenlp's layers (ppo.models.fast_paths) give paddlenlp's results:
the fused RMSNorm against numpy and paddle's composed ops, a whole model's logits and every
gradient against the same model without them."""

import contextlib

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

from ppo.models import fast_paths
from ppo.rollout.collect import forward_log_probs


def test_the_fused_norm_kernel_is_never_tried_on_a_cpu_without_avx512():
    """paddle's CPU RMSNorm kernel is AVX-512 code: called on a CPU without it the process dies of
    SIGILL, so the probe must not call it there (it calls the kernel it is given otherwise)."""
    calls = []

    def kernel(*a):
        calls.append(a)
        return (a[0],)

    if not paddle.get_device().startswith("cpu"):
        pytest.skip("the gate is for CPU devices")
    assert fast_paths._probe(kernel, flags=["avx", "avx2", "fma"]) is None and calls == []
    assert fast_paths._probe(kernel, flags=["avx2", "avx512f"]) is kernel and len(calls) == 1

    def missing(*a):
        raise RuntimeError("no kernel")

    assert fast_paths._probe(missing, flags=["avx512f"]) is None


def test_fused_rms_norm_forward_and_gradients():
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(3, 5, 16)).astype("float32")
    w_np = (rng.random(16) + 0.5).astype("float32")
    g_np = rng.normal(size=(3, 5, 16)).astype("float32")
    x, w = paddle.to_tensor(x_np, stop_gradient=False), paddle.to_tensor(w_np, stop_gradient=False)
    out = fast_paths.rms_norm(x, w, 1e-6)
    (out * paddle.to_tensor(g_np)).sum().backward()

    x64 = x_np.astype(np.float64)
    r = 1 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out.numpy(), x64 * r * w_np, rtol=1e-5, atol=1e-6)
    # gradients: paddle's autograd through the composed ops (paddlenlp's formula)
    x2, w2 = paddle.to_tensor(x_np, stop_gradient=False), paddle.to_tensor(w_np, stop_gradient=False)
    ref = paddle.rsqrt((x2 * x2).mean(-1, keepdim=True) + 1e-6) * x2 * w2
    (ref * paddle.to_tensor(g_np)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), x2.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.grad.numpy(), w2.grad.numpy(), rtol=1e-5, atol=1e-5)
    # and a finite difference of one input entry, in float64 numpy
    eps, i = 1e-4, (1, 2, 3)

    def loss(xv):
        rr = 1 / np.sqrt((xv * xv).mean(-1, keepdims=True) + 1e-6)
        return float((xv * rr * w_np * g_np).sum())

    up, down = x64.copy(), x64.copy()
    up[i] += eps
    down[i] -= eps
    assert abs((loss(up) - loss(down)) / (2 * eps) - x.grad.numpy()[i]) < 1e-3


def test_a_frozen_weight_gets_no_gradient():
    x = paddle.randn([4, 8])
    x.stop_gradient = False
    w = paddle.ones([8])  # stop_gradient: a frozen model's norm
    fast_paths.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and w.grad is None


def tiny_llama(seed=0, **extra):
    paddle.seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, use_flash_attention=False, **extra)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 2}], ids=["plain", "grouped-kv"])
def test_installed_model_gives_paddlenlp_logits_and_gradients(extra):
    plain, fast = tiny_llama(**extra), tiny_llama(**extra)
    fast.set_state_dict(plain.state_dict())
    assert fast_paths.install(fast) is fast
    marked = [layer for layer in fast.sublayers() if getattr(layer, "_ppo_fast_path", False)]
    assert len(marked) == 2 * 2 + 1 + 2  # every norm (2 per layer + final) and attention
    wrapper = fast.llama.layers[0].self_attn.attn_func
    fast_paths.install(fast)  # a second time changes nothing
    assert fast.llama.layers[0].self_attn.attn_func is wrapper
    rng = np.random.default_rng(1)
    ids = paddle.to_tensor(rng.integers(4, 96, size=(3, 10)), dtype="int64")
    mask = paddle.to_tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10, [0] * 5 + [1] * 5], dtype="int64")

    def run(model, dense):
        model.clear_gradients()
        with fast_paths.dense_kernels() if dense else contextlib.nullcontext():
            log_probs, _ = forward_log_probs(model, ids, mask)
            (log_probs * mask[:, 1:].astype("float32")).sum().backward()
        return log_probs.numpy(), {n: p.grad.numpy() for n, p in model.named_parameters()}

    ref_lp, ref_grads = run(plain, dense=False)
    for dense in (False, True):
        lp, grads = run(fast, dense)
        real = mask.numpy()[:, 1:] > 0
        np.testing.assert_allclose(lp[real], ref_lp[real], rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            scale = np.abs(ref_grads[name]).max()
            np.testing.assert_allclose(g, ref_grads[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_attention_returns_the_weights_when_asked_and_defers_what_it_does_not_cover():
    model = tiny_llama()
    fast_paths.install(model)
    attn = model.llama.layers[0].self_attn
    q, k, v = (paddle.randn([2, 5, 4, 8]) for _ in range(3))
    mask = paddle.zeros([2, 1, 5, 5])
    out, weights = attn.attn_func(q, model.config, k, v, mask, True)
    assert out.shape == [2, 5, 32] and weights.shape == [2, 4, 5, 5]
    np.testing.assert_allclose(weights.sum(-1).numpy(), 1.0, rtol=1e-5)
    calls = []
    deferred = fast_paths.attention(lambda *a: calls.append(a) or "paddlenlp", q, model.config, k, v, mask, False,
                                    paddle.zeros([2, 4, 1, 5]))  # alibi: paddlenlp's own code
    assert deferred == "paddlenlp" and len(calls) == 1


def test_dense_kernels_restore_the_flag():
    before = paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"]
    with pytest.raises(RuntimeError):
        with fast_paths.dense_kernels():
            if fast_paths.on_cpu():
                assert paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"] is False
            raise RuntimeError("inside")
    assert paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"] == before


def test_mkl_threads_default_to_this_ranks_share_of_the_cores():
    """``import ppo`` gives MKL the cores this process may use over the launcher's local ranks, at
    least 1, and keeps a value the user set (paddle alone runs its matmuls on one thread)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cores = len(os.sched_getaffinity(0))

    def threads(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("MKL_NUM_THREADS", "PADDLE_LOCAL_SIZE")}
        out = subprocess.run([sys.executable, "-c", "import os, ppo; print(os.environ['MKL_NUM_THREADS'])"],
                             env={**base, "PYTHONPATH": root, **env}, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert threads() == str(cores)
    assert threads(PADDLE_LOCAL_SIZE="2") == str(max(1, cores // 2))
    assert threads(PADDLE_LOCAL_SIZE=str(4 * cores)) == "1"
    assert threads(MKL_NUM_THREADS="3") == "3"


@pytest.mark.parametrize("D", [64, 7])
def test_rotate_half_is_paddlenlps_bit_for_bit_and_installed(D):
    """The roll form equals paddlenlp's slices + concat exactly, forward and gradient (an odd head
    size too), and every family's rotary module gets it (LLaMA's, Qwen2's, Mistral's paddlenlp modules)."""
    import importlib

    def original(x):  # paddlenlp's rotate_half, written out here
        return paddle.concat([-x[..., D // 2:], x[..., :D // 2]], axis=-1)

    rng = np.random.default_rng(3)
    x = paddle.to_tensor(rng.normal(size=(2, 5, 3, D)).astype("float32"), stop_gradient=False)
    upstream = paddle.to_tensor(rng.normal(size=(2, 5, 3, D)).astype("float32"))
    want = original(x)
    (want * upstream).sum().backward()
    want_grad = x.grad.numpy().copy()
    x.clear_gradient()
    got = fast_paths.rotate_half(x)
    (got * upstream).sum().backward()
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(x.grad.numpy(), want_grad)
    from ppo.models.families import family_named, supported

    for family in supported():
        name = family_named(family).rotary_module
        fast_paths.install_rotate_half(name)  # (what the loaders do for every model they load)
        assert importlib.import_module(name).rotate_half is fast_paths.rotate_half
        assert fast_paths.PADDLENLP_ROTATE_HALF[name]["rotate_half"] is not fast_paths.rotate_half
        module = importlib.import_module(name)
        assert module.apply_rotary_pos_emb.func is fast_paths.apply_rotary_pos_emb
        assert module.apply_rotary_pos_emb.args == (fast_paths.PADDLENLP_ROTATE_HALF[name]["apply_rotary_pos_emb"],)
