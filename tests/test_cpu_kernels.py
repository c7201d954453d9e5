"""The compiled CPU kernels (ppo/models/_cpu_kernels.c through ppo.models.cpu_kernels): RMSNorm,
rotary embedding, SwiGLU and the attention softmax, forward and backward, against numpy written
here (float64); results that do not depend on the number of threads; whole models through them
equal paddle's own ops; the fallbacks say so in one line."""


import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ppo.models import cpu_gemm, cpu_kernels, decode_kernels, fast_paths, kernel_library

RNG = np.random.default_rng(7)


class Counting:
    """The kernels' library with a count of the calls of each entry point."""

    def __init__(self, lib):
        self.lib, self.calls = lib, {}

    def __getattr__(self, name):
        fn = getattr(self.lib, name)

        def counted(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args)

        return counted


@pytest.fixture
def kernels():
    """The kernels on (with the oneDNN matmuls) for one test, counted."""
    notice = cpu_gemm.activate("onednn")
    assert notice is None, f"{notice} (a C compiler, e.g. gcc, then the set-up's pip install again)"
    counting = Counting(cpu_gemm.STATE.kernels)
    cpu_gemm.STATE.kernels = counting
    yield counting
    cpu_gemm.deactivate()


def tensor(*shape, grad=True, scale=1.0):
    return paddle.to_tensor((RNG.normal(size=shape) * scale).astype("float32"), stop_gradient=not grad)


def close(got, want, tol=2e-6):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


# ------------------------------------------------------------------ numpy references (float64)

def np_rms_norm(x, w, eps):
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x * r * w


def np_rms_norm_grads(x, w, g, eps):
    """d/dx and d/dw of sum(g * rms_norm(x)), written out from the definition."""
    H = x.shape[-1]
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    x_hat = x * r
    gw = g * w
    dx = r * gw - x * r ** 3 * (gw * x).sum(-1, keepdims=True) / H
    dw = (g * x_hat).reshape(-1, H).sum(0)
    return dx, dw


def np_rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------ kernels against numpy

@pytest.mark.parametrize("shape", [(3, 37, 64), (70, 48), (1, 1, 9)])
def test_rms_norm_forward_and_both_gradients_equal_numpy(kernels, shape):
    """Rows not a multiple of the kernel's block of 32, an odd H."""
    x, w = tensor(*shape, scale=3.0), tensor(shape[-1])
    g = RNG.normal(size=shape)
    y = fast_paths.rms_norm(x, w, 1e-5)
    y.backward(paddle.to_tensor(g.astype("float32")))
    xn, wn = x.numpy().astype(np.float64), w.numpy().astype(np.float64)
    close(y.numpy(), np_rms_norm(xn, wn, 1e-5))
    dx, dw = np_rms_norm_grads(xn, wn, g, 1e-5)
    close(x.grad.numpy(), dx, 1e-5)
    close(w.grad.numpy(), dw, 1e-5)
    assert kernels.calls == {"ppk_rms_norm_forward": 1, "ppk_rms_norm_backward": 1}


def test_rms_norm_frozen_weight_has_no_gradient(kernels):
    x, w = tensor(4, 16), tensor(16, grad=False)
    fast_paths.rms_norm(x, w, 1e-6).sum().backward()
    assert w.grad is None and x.grad is not None


def test_results_do_not_depend_on_the_number_of_threads(kernels):
    """Sizes above the kernels' one-thread cut-off (32768 elements), odd counts so that the split
    has a remainder: on 2 threads every result equals numpy, and bit for bit the 1-thread one (the
    weight gradient's sum over rows is taken in fixed blocks of rows)."""
    x, w, g = tensor(301, 128), tensor(128), RNG.normal(size=(301, 128))
    q, k = tensor(2, 81, 4, 64), tensor(2, 81, 2, 64)
    cos, sin = tensor(1, 81, 64, grad=False), tensor(1, 81, 64, grad=False)
    gate, up = tensor(3, 5, 3001, scale=3.0), tensor(3, 5, 3001)
    scores, bias = tensor(2, 4, 101, 101, scale=3.0), tensor(2, 1, 101, 101, grad=False)
    results = []
    for threads in (1, 2):
        cpu_gemm.STATE.threads = threads
        for t in (x, w, q, k, gate, up, scores):
            t.clear_gradient()
        y = cpu_kernels.RMSNorm.apply(x, w, 1e-6)
        y.backward(paddle.to_tensor(g.astype("float32")))
        qe, ke = cpu_kernels.Rotary.apply(q, k, cos, sin, 1)
        (qe.sum() * 2 + ke.sum()).backward()
        act = cpu_kernels.SwiGLU.apply(gate, up)
        (act * act).sum().backward()
        probs = cpu_kernels.softmax_bias(scores, bias)
        (probs * probs).sum().backward()
        results.append([t.numpy() for t in (y, x.grad, w.grad, qe, ke, q.grad, k.grad, act, gate.grad, up.grad,
                                             probs, scores.grad)])
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)
    y, dx, dw, qe, ke, dq, dk, act, dgate, dup, probs, dscores = results[1]
    xn, wn = x.numpy().astype(np.float64), w.numpy().astype(np.float64)
    close(y, np_rms_norm(xn, wn, 1e-6))
    for got, want in zip((dx, dw), np_rms_norm_grads(xn, wn, g, 1e-6)):
        close(got, want, 1e-5)
    c, s = cos.numpy()[:, :, None].astype(np.float64), sin.numpy()[:, :, None]
    for t, emb, grad, factor in ((q, qe, dq, 2.0), (k, ke, dk, 1.0)):
        tn = t.numpy().astype(np.float64)
        close(emb, tn * c + np_rotate_half(tn) * s)
        upstream = np.full_like(tn, factor)
        close(grad, upstream * c - np_rotate_half(upstream * s))
    a, b = gate.numpy().astype(np.float64), up.numpy().astype(np.float64)
    close(act, np_silu(a) * b)
    sig = 1.0 / (1.0 + np.exp(-a))
    close(dgate, 2 * act * b * (sig + a * sig * (1 - sig)), 1e-5)
    close(dup, 2 * act * np_silu(a), 1e-5)
    p = np_softmax(scores.numpy().astype(np.float64) + bias.numpy())
    close(probs, p)
    close(dscores, p * (2 * p - (2 * p * p).sum(-1, keepdims=True)), 1e-5)


@pytest.mark.parametrize("layout", ["llama", "mistral"])
def test_rotary_equals_paddlenlps_and_the_formula(kernels, layout):
    """paddlenlp's apply_rotary_pos_emb forms: LLaMA / Qwen2 (q [B, S, heads, D], tables
    [1, max, 1, D]) and Mistral (q [B, heads, S, D], tables [max, D]); positions with offsets (left
    padding), q and k with other head counts (grouped-query attention)."""
    import paddlenlp.transformers.llama.modeling as llama
    import paddlenlp.transformers.mistral.modeling as mistral

    module = llama if layout == "llama" else mistral
    B, S, H, KV, D, MAX = 2, 7, 4, 2, 16, 20
    angles = RNG.uniform(0, 6, size=(MAX, D))
    cos_np, sin_np = np.cos(angles), np.sin(angles)
    shape_table = (1, MAX, 1, D) if layout == "llama" else (MAX, D)
    cos = paddle.to_tensor(cos_np.reshape(shape_table).astype("float32"))
    sin = paddle.to_tensor(sin_np.reshape(shape_table).astype("float32"))
    positions = np.stack([np.arange(S) + 3, np.maximum(np.arange(S) - 2, 0)])
    q_shape, k_shape = ((B, S, H, D), (B, S, KV, D)) if layout == "llama" else ((B, H, S, D), (B, KV, S, D))
    q, k = tensor(*q_shape), tensor(*k_shape)
    gq, gk = RNG.normal(size=q_shape), RNG.normal(size=k_shape)
    pos = paddle.to_tensor(positions)

    def run(fn):
        q.clear_gradient(), k.clear_gradient()
        qe, ke = fn(q, k, cos, sin, pos)
        ((qe * paddle.to_tensor(gq.astype("float32"))).sum() + (ke * paddle.to_tensor(gk.astype("float32"))).sum()).backward()
        return qe.numpy(), ke.numpy(), q.grad.numpy(), k.grad.numpy()

    own = fast_paths.PADDLENLP_ROTATE_HALF.get(module.__name__, {}).get("apply_rotary_pos_emb",
                                                                         module.apply_rotary_pos_emb)
    got = run(lambda *a: fast_paths.apply_rotary_pos_emb(own, *a))
    assert kernels.calls == {"ppk_rope": 4}  # q and k, forward and backward
    for mine, theirs in zip(got, run(own)):  # paddlenlp's own ops
        close(mine, theirs)
    assert kernels.calls == {"ppk_rope": 4}
    # the formula, in numpy: tables gathered at the positions, broadcast over the heads
    c, s = cos_np[positions], sin_np[positions]  # [B, S, D]
    c, s = (c[:, :, None], s[:, :, None]) if layout == "llama" else (c[:, None], s[:, None])
    for x, g, emb, grad in ((q, gq, got[0], got[2]), (k, gk, got[1], got[3])):
        xn = x.numpy().astype(np.float64)
        close(emb, xn * c + np_rotate_half(xn) * s)
        # d/dx of sum(g * (x c + R x s)) = g c + R^T (g s), R^T = -R
        close(grad, g * c - np_rotate_half(g * s))


def test_swiglu_forward_and_gradients_equal_numpy(kernels):
    gate, up = tensor(3, 5, 1000, scale=4.0), tensor(3, 5, 1000)
    g = RNG.normal(size=(3, 5, 1000))
    out = fast_paths.swiglu(fast_paths._PADDLE_SWIGLU, gate, up)
    out.backward(paddle.to_tensor(g.astype("float32")))
    a, b = gate.numpy().astype(np.float64), up.numpy().astype(np.float64)
    sig = 1.0 / (1.0 + np.exp(-a))
    close(out.numpy(), np_silu(a) * b)
    close(gate.grad.numpy(), g * b * (sig + a * sig * (1 - sig)))
    close(up.grad.numpy(), g * np_silu(a))
    assert kernels.calls == {"ppk_swiglu_forward": 1, "ppk_swiglu_backward": 1}
    # far tails: silu is 0 below and x above, without overflow
    x = paddle.to_tensor(np.array([-200.0, -90.0, -30.0, 0.0, 30.0, 95.0, 200.0], np.float32))
    close(cpu_kernels.swiglu_forward(x, paddle.ones([7])).numpy(), np_silu(x.numpy().astype(np.float64)))


@pytest.mark.parametrize("bias_heads,scale", [(1, 1.0), (3, 1.0), (1, 0.125), (3, 0.3)])
def test_masked_softmax_and_its_gradient_equal_numpy(kernels, bias_heads, scale):
    """softmax(scores * scale + bias) with a causal mask at the dtype's minimum (a bias shared by
    the heads, or one per head), and its gradient; fully masked entries are exactly 0."""
    B, H, S = 2, 3, 9
    scores = tensor(B, H, S, S, scale=5.0)
    minimum = np.finfo(np.float32).min
    causal = np.where(np.tril(np.ones((S, S))) > 0, 0.0, minimum)
    bias_np = np.broadcast_to(causal, (B, bias_heads, S, S)).copy()
    bias_np[1, :, :, 0] = minimum  # a padded first key in the second row
    for head in range(1, bias_heads):  # per-head biases that differ (as ALiBi's would)
        bias_np[:, head] += np.tril(RNG.normal(size=(S, S)) * head)
    bias_np[..., 0, 0] = 0.0
    bias = paddle.to_tensor(bias_np.astype("float32"))
    g = RNG.normal(size=(B, H, S, S))
    probs = cpu_kernels.softmax_bias(scores, bias, scale)
    probs.backward(paddle.to_tensor(g.astype("float32")))
    z = scores.numpy().astype(np.float64) * scale + np.maximum(bias_np, -1e30)
    p = np_softmax(z)
    close(probs.numpy(), p)
    assert (probs.numpy()[np.broadcast_to(bias_np, p.shape) == minimum] == 0).all()
    close(scores.grad.numpy(), p * (g - (g * p).sum(-1, keepdims=True)) * scale)
    assert kernels.calls == {"ppk_softmax_bias": 1, "ppk_softmax_grad": 1}
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            cpu_kernels.softmax_bias(scores, bias, bad)


def test_inference_forms_equal_numpy(kernels):
    """The residual add with the next norm, and rotary written heads-first, no autograd."""
    x, res, w = tensor(6, 32, grad=False), tensor(6, 32, grad=False), tensor(32, grad=False)
    normed, total = cpu_kernels.add_rms_norm_forward(x, res, w, 1e-6)
    want_total = x.numpy().astype(np.float64) + res.numpy()
    close(total.numpy(), want_total)
    close(normed.numpy(), np_rms_norm(want_total, w.numpy().astype(np.float64), 1e-6))
    q, cos, sin = tensor(2, 5, 3, 8, grad=False), tensor(2, 5, 8, grad=False), tensor(2, 5, 8, grad=False)
    got = decode_kernels.rotary_heads_first(q, cos, sin).numpy()
    qn = q.numpy().astype(np.float64)
    want = qn * cos.numpy()[:, :, None] + np_rotate_half(qn) * sin.numpy()[:, :, None]
    close(got, want.transpose(0, 2, 1, 3))


# ------------------------------------------------------------------ whole models, switches, fallbacks

@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_whole_models_through_the_kernels_equal_paddles_ops(kernels, family):
    """Logits, log-probs and every gradient with the kernels equal paddle's own ops (the oneDNN
    matmuls on in both), and every norm, rotary, SwiGLU and attention softmax went through them."""
    from test_cpu_gemm import causal_lm, forward_and_grads

    from ppo.models.families import family_named

    model = causal_lm(family, False)
    fast_paths.install_rotate_half(family_named(family).rotary_module)  # (as the loaders do)
    ids = paddle.to_tensor(RNG.integers(0, 96, size=(3, 12)))
    library, cpu_gemm.STATE.kernels = cpu_gemm.STATE.kernels, None
    reference = forward_and_grads(model, ids)
    assert not kernels.calls
    cpu_gemm.STATE.kernels = library
    got = forward_and_grads(model, ids)
    layers = model.config.num_hidden_layers
    norms = 2 * layers + 1 + (2 * layers if family == "qwen3" else 0)  # Qwen3's q/k head norms
    assert kernels.calls == {"ppk_rms_norm_forward": norms, "ppk_rms_norm_backward": norms,
                             "ppk_rope": 4 * layers, "ppk_swiglu_forward": layers, "ppk_swiglu_backward": layers,
                             "ppk_softmax_bias": layers, "ppk_softmax_grad": layers,
                             # the attention's two products forward, and each one's two gradients
                             "ppk_batched_gemm": 6 * layers}, kernels.calls
    np.testing.assert_allclose(got[0], reference[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], reference[1], rtol=1e-5, atol=1e-5)
    for name, g in reference[2].items():
        np.testing.assert_allclose(got[2][name], g, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("with_entropy", [False, True], ids=["log-probs", "with-entropy"])
def test_actor_log_probs_through_the_kernel_equal_paddles_ops(kernels, with_entropy):
    """The update's log-probs (``forward_log_probs`` at a temperature, the entropy a statistic) and
    every gradient of their weighted sum, with the token log-prob kernel against paddle's softmax
    cross-entropy, on left-padded rows."""
    from test_cpu_gemm import causal_lm

    from ppo.rollout.collect import forward_log_probs

    model = causal_lm("llama", False)
    ids = paddle.to_tensor(RNG.integers(0, 96, size=(3, 12)))
    mask = paddle.to_tensor((np.arange(12)[None, :] >= np.array([[0], [3], [5]])).astype("int64"))
    weights = paddle.to_tensor(RNG.normal(size=(3, 11)).astype("float32"))

    def run():
        model.clear_gradients()
        log_probs, entropy = forward_log_probs(model, ids, mask, 0.7, with_entropy, entropy_grad=False)
        (log_probs * weights).sum().backward()
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
        return log_probs.numpy(), entropy.numpy() if with_entropy else None, grads

    library, cpu_gemm.STATE.kernels = cpu_gemm.STATE.kernels, None
    reference = run()
    cpu_gemm.STATE.kernels = library
    got = run()
    assert kernels.calls["ppk_token_log_probs"] == 1 and kernels.calls["ppk_token_log_probs_grad"] == 1
    np.testing.assert_allclose(got[0], reference[0], rtol=1e-5, atol=1e-5)
    if with_entropy:
        np.testing.assert_allclose(got[1], reference[1], rtol=1e-5, atol=1e-5)
    for name, g in reference[2].items():
        np.testing.assert_allclose(got[2][name], g, rtol=1e-4, atol=1e-6, err_msg=name)


def test_paddle_mode_switches_them_off_and_restore_brings_them_back():
    x, w = tensor(4, 8), tensor(8)
    cpu_gemm.activate("paddle")
    assert cpu_gemm.STATE.kernels is None and not cpu_kernels.ready(x, w)
    assert cpu_gemm.activate("auto") is None and cpu_kernels.ready(x, w)
    state = cpu_gemm.snapshot()
    cpu_gemm.deactivate()
    assert not cpu_kernels.ready(x, w)
    cpu_gemm.restore(state)
    assert cpu_kernels.ready(x, w)
    assert not cpu_kernels.ready(x.astype("float64"), w.astype("float64"))  # other dtypes: paddle's
    cpu_gemm.deactivate()


def test_a_missing_or_broken_library_is_one_notice_and_paddles_ops(monkeypatch, tmp_path):
    """Not built (no compiler at install) or not loadable: ``activate`` says so in one line and
    the models run paddle's ops; the matmuls stay oneDNN's."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    broken = tmp_path / "_cpu_kernels.so"
    broken.write_bytes(b"\x7fELF truncated")
    for origin, words in ((None, "were not built"), (str(broken), "are not usable")):
        def find_spec(name, *args, origin=origin):
            if name == kernel_library._LIBRARY_MODULE:
                return None if origin is None else importlib.util.spec_from_file_location("x", origin)
            return real_find_spec(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(cpu_gemm.STATE, "kernels_library", None)
        notice = cpu_gemm.activate("auto")
        assert words in notice and "\n" not in notice and "paddle's" in notice
        assert cpu_gemm.STATE.active and cpu_gemm.STATE.kernels is None
        x, w = tensor(4, 8), tensor(8)
        y = fast_paths.rms_norm(x, w, 1e-6)  # the composed form
        close(y.numpy(), np_rms_norm(x.numpy().astype(np.float64), w.numpy().astype(np.float64), 1e-6))
        # 'onednn' is about the matmuls: it still runs, with the same notice
        assert words in cpu_gemm.select("onednn")
    cpu_gemm.deactivate()
    monkeypatch.setattr(cpu_gemm.STATE, "kernels_library", None)  # (loaded again by the next test)


def test_the_library_is_built_with_the_toolkit():
    """pip install built it: a machine with a C compiler must not fall back silently."""
    lib, why_not = kernel_library.load()
    assert lib is not None, why_not
    assert lib.ppk_version() == kernel_library.VERSION


def test_decode_attention_equals_numpy(kernels):
    """A decode step's attention: grouped-query heads, cache slots masked (padding and slots not
    written yet) weigh 0, the new token's own key and value as one more column; a layer of the
    whole cache read in place."""
    L, B, H, KV, T, D = 3, 2, 4, 2, 11, 8
    keys, values = tensor(L, B, KV, T, D, grad=False), tensor(L, B, KV, T, D, grad=False)
    q, k, v = tensor(B, H, 1, D, grad=False, scale=2.0), tensor(B, KV, 1, D, grad=False), tensor(B, KV, 1, D, grad=False)
    minimum = np.finfo(np.float32).min
    bias_np = np.zeros((B, 1, 1, T), np.float32)
    bias_np[:, ..., 7:] = minimum  # not written yet
    bias_np[1, ..., :2] = minimum  # left padding of the second row
    out = decode_kernels.decode_attention(q, k, v, keys, values, 1, paddle.to_tensor(bias_np)).numpy()
    assert kernels.calls == {"ppk_decode_attention": 1}
    kn, vn = keys.numpy()[1].astype(np.float64), values.numpy()[1].astype(np.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // KV)
            allowed = bias_np[b, 0, 0] == 0
            qv = q.numpy()[b, h, 0].astype(np.float64)
            scores = np.concatenate([kn[b, g][allowed] @ qv, [k.numpy()[b, g, 0] @ qv]])
            p = np_softmax(scores)
            want = p[:-1] @ vn[b, g][allowed] + p[-1] * v.numpy()[b, g, 0]
            close(out[b, h, 0], want)


def np_decode_layers(x, h, layers, cos_q, sin_q, cos_k, sin_k, keys, values, bias, H, KV, D, eps):
    """A decode step's layers in float64, written out: returns x (the final norm's output), h and
    the step's keys and values [layers, B, KV, D]."""
    B = x.shape[0]
    new_keys, new_values = [], []
    for layer, (wq, wk, wv, wo, wg, wu, wd, post, following, q_norm, k_norm) in enumerate(layers):
        q, k, v = (x @ wq).reshape(B, H, D), (x @ wk).reshape(B, KV, D), (x @ wv).reshape(B, KV, D)
        if q_norm is not None:
            q, k = np_rms_norm(q, q_norm, eps), np_rms_norm(k, k_norm, eps)
        q = q * cos_q[:, None] + np_rotate_half(q) * sin_q[:, None]
        k = k * cos_k[:, None] + np_rotate_half(k) * sin_k[:, None]
        new_keys.append(k)
        new_values.append(v)
        out = np.zeros((B, H, D))
        for b in range(B):
            allowed = bias[b] == 0
            for head in range(H):
                g = head // (H // KV)
                scores = np.concatenate([keys[layer, b, g][allowed] @ q[b, head], [k[b, g] @ q[b, head]]])
                p = np_softmax(scores)
                out[b, head] = p[:-1] @ values[layer, b, g][allowed] + p[-1] * v[b, g]
        h = h + out.reshape(B, H * D) @ wo
        x = np_rms_norm(h, post, eps)
        h = h + (np_silu(x @ wg) * (x @ wu)) @ wd
        x = np_rms_norm(h, following, eps)
    return x, h, np.stack(new_keys), np.stack(new_values)


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
def test_decode_layers_equal_numpy(kernels, gemm):
    """A decode step's layers in one call: grouped-query heads, Qwen3's per-head norms on one layer
    and not the other, masked cache slots, the rotary tables of queries and keys apart; through
    either GEMM (MKL's cblas_sgemm, oneDNN's dnnl_sgemm)."""
    B, hidden, H, KV, D, inter, T, L, eps = 3, 16, 4, 2, 4, 24, 6, 2, 1e-5
    rng = np.random.default_rng(3)

    def array(*shape, scale=1.0):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    weights = []
    for layer in range(L):
        norms = [array(D, scale=0.3) + 1, array(D, scale=0.3) + 1] if layer == 0 else [None, None]
        weights.append([array(hidden, H * D, scale=0.3), array(hidden, KV * D, scale=0.3),
                        array(hidden, KV * D, scale=0.3), array(H * D, hidden, scale=0.3),
                        array(hidden, inter, scale=0.3), array(hidden, inter, scale=0.3),
                        array(inter, hidden, scale=0.3), array(hidden, scale=0.3) + 1,
                        array(hidden, scale=0.3) + 1] + norms)
    x, h = array(B, hidden), array(B, hidden)
    cos_q, sin_q, cos_k, sin_k = array(B, D), array(B, D), array(B, D), array(B, D)
    keys, values = array(L, B, KV, T, D), array(L, B, KV, T, D)
    bias = np.zeros((B, 1, 1, T), np.float32)
    bias[..., 4:] = np.finfo(np.float32).min  # not written yet
    bias[2, ..., :2] = np.finfo(np.float32).min  # left padding of the last row
    if gemm == "onednn":
        cpu_gemm.STATE.blas_gemm = (cpu_gemm.ctypes.cast(cpu_gemm.STATE.library.dnnl_sgemm,
                                                           cpu_gemm.ctypes.c_void_p).value, 2)
    try:
        plan = decode_kernels.DecodePlan([[None if w is None else paddle.to_tensor(w) for w in layer]
                                       for layer in weights], H, KV, D, eps)
        assert plan.kind == (1 if gemm == "mkl" else 2)
        xt, ht = paddle.to_tensor(x), paddle.to_tensor(h)
        got_keys, got_values = decode_kernels.decode_layers(
            plan, xt, ht, *(paddle.to_tensor(t) for t in (cos_q, sin_q, cos_k, sin_k, keys, values, bias)))
    finally:
        cpu_gemm.STATE.blas_gemm = None
    assert kernels.calls == {"ppk_decode_layers": 1}
    f64 = [[None if w is None else w.astype(np.float64) for w in layer] for layer in weights]
    want = np_decode_layers(x.astype(np.float64), h.astype(np.float64), f64, cos_q, sin_q, cos_k, sin_k,
                            keys.astype(np.float64), values.astype(np.float64), bias.reshape(B, T), H, KV, D, eps)
    for got, expected in zip((xt, ht, got_keys, got_values), want):
        close(got.numpy().reshape(expected.shape), expected, tol=2e-5)


def test_decode_layers_refuse_what_they_cannot_read(kernels):
    """Weights of another shape or dtype are refused when the plan is made (the rollout model then
    keeps its per-operator step); inputs that do not match the plan are refused at the call."""
    D, H = 4, 2
    layer = [tensor(8, 8, grad=False) for _ in range(4)] + [tensor(8, 12, grad=False), tensor(8, 12, grad=False),
                                                           tensor(12, 8, grad=False), tensor(8, grad=False),
                                                           tensor(8, grad=False), None, None]
    plan = decode_kernels.DecodePlan([layer], H, H, D, 1e-6)
    for i, bad in ((1, tensor(8, 6, grad=False)), (6, tensor(12, 8, grad=False).astype("float64")),
                   (8, None), (9, tensor(5, grad=False))):
        broken = list(layer)
        broken[i] = bad
        with pytest.raises(ValueError):
            decode_kernels.DecodePlan([broken], H, H, D, 1e-6)
    with pytest.raises(ValueError):
        decode_kernels.DecodePlan([layer], 3, 2, D, 1e-6)  # heads not a multiple of the kv heads
    for heads, kv_heads, head_dim in ((2, 0, D), (2, 2, 3)):  # no kv heads; an odd head size (rotary halves)
        with pytest.raises(ValueError):
            decode_kernels.DecodePlan([layer], heads, kv_heads, head_dim, 1e-6)
    with pytest.raises(ValueError):
        decode_kernels.DecodePlan([[None] + layer[1:]], H, H, D, 1e-6)
    cache = tensor(1, 2, H, 5, D, grad=False)
    tables = [tensor(2, D, grad=False) for _ in range(4)]
    bias = paddle.zeros([2, 1, 1, 5])
    with pytest.raises(ValueError):
        decode_kernels.decode_layers(plan, tensor(2, 6, grad=False), tensor(2, 8, grad=False), *tables, cache, cache, bias)
    with pytest.raises(ValueError):  # a cache of two layers for a plan of one
        decode_kernels.decode_layers(plan, tensor(2, 8, grad=False), tensor(2, 8, grad=False), *tables,
                                  paddle.concat([cache, cache]), paddle.concat([cache, cache]), bias)
    assert not kernels.calls


@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 2}], ids=["plain", "grouped-kv"])
def test_prefill_in_groups_through_the_kernels_equals_paddles_whole_batch(kernels, extra):
    """The rollout's prefill in length groups with the kernels on (the cache written in place, a row
    at a time) against the whole batch's prefill on paddle's ops: first logits, the prompts' cache
    slots and a decode step's logits within float32 rounding."""
    from test_inference import make_model, uneven_prompts

    from ppo.models import position_ids_from_mask
    from ppo.rollout.inference import InferenceModel

    model = make_model(**extra)
    ids, mask = uneven_prompts()
    pos = position_ids_from_mask(mask)
    B, P = ids.shape

    def run(overhead):
        decoder = InferenceModel(model)
        decoder.PREFILL_GROUP_OVERHEAD = overhead
        with paddle.no_grad():
            first = decoder.start(ids, mask, pos, max_new_tokens=3)
            cache = [c.numpy()[:, :, :, :P].transpose(1, 3, 0, 2, 4)[mask.numpy().astype(bool)] for c in decoder.cache]
            step = decoder.step(paddle.argmax(first, axis=-1), paddle.ones([B], "int64"), pos[:, -1:] + 1)
        return [first.numpy(), step.numpy()] + cache

    library, cpu_gemm.STATE.kernels = cpu_gemm.STATE.kernels, None
    reference = run(10 ** 9)
    assert not kernels.calls
    cpu_gemm.STATE.kernels = library
    got = run(6)
    layers = model.config.num_hidden_layers
    assert kernels.calls["ppk_cache_write"] == 2 * layers * B + 2  # a row at a time, then the step's slot
    for mine, theirs in zip(got, reference):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 2}, {"num_key_value_heads": 2, "fuse_attention_qkv": True}],
                         ids=["plain", "grouped-kv", "grouped-kv-fused-qkv"])
def test_rollout_model_through_the_kernels_equals_paddles_ops(kernels, extra):
    """The rollout model (prefill, decode steps, scoring) with the kernels on: the same greedy tokens
    as with paddle's ops, and the step logits and scoring log-probs within float32 rounding.  Its
    decode steps are one kernel call for separate projections, the per-operator kernels for fused ones."""
    from test_inference import make_model, prompts

    from ppo.models import position_ids_from_mask
    from ppo.rollout.collect import GenerationConfig, generate
    from ppo.rollout.inference import InferenceModel

    model = make_model(**extra)
    ids, mask = prompts()
    pos = position_ids_from_mask(mask)
    config = GenerationConfig(max_new_tokens=10, do_sample=False)

    def run():
        decoder = InferenceModel(model)
        with paddle.no_grad():
            first = decoder.start(ids, mask, pos, max_new_tokens=3)
            second = decoder.step(paddle.argmax(first, axis=-1), paddle.ones([ids.shape[0]], "int64"), pos[:, -1:] + 1)
        tokens, _ = generate(decoder, ids, mask, config, eos_token_id=2, pad_token_id=3)
        return first.numpy(), second.numpy(), tokens.numpy(), decoder.log_probs(tokens, paddle.ones_like(tokens),
                                                                                 temperature=0.7).numpy()

    library, cpu_gemm.STATE.kernels = cpu_gemm.STATE.kernels, None
    reference = run()
    assert not kernels.calls
    cpu_gemm.STATE.kernels = library
    got = run()
    fused = bool(extra.get("fuse_attention_qkv"))
    steps = "ppk_decode_attention" if fused else "ppk_decode_layers"
    for name in (steps, "ppk_rope", "ppk_add_rms_norm", "ppk_swiglu_forward", "ppk_softmax_bias"):
        assert kernels.calls.get(name), (name, kernels.calls)
    assert ("ppk_decode_layers" in kernels.calls) != fused, kernels.calls
    np.testing.assert_array_equal(got[2], reference[2])
    for mine, theirs in zip(got[:2] + got[3:], reference[:2] + reference[3:]):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)


def test_cache_writes_equal_paddles_assignment(kernels):
    """A decode step's new keys into their slot of every layer, a prefill's into a layer's slots and
    one row's into its slots, in place; other slots untouched; shapes and places it does not take
    are left to paddle (False) with nothing written."""
    cache = tensor(2, 3, 2, 7, 4, grad=False)
    want = cache.numpy().copy()
    pointer = cache.data_ptr()
    rows = tensor(2, 3, 2, 1, 4, grad=False)
    assert decode_kernels.write_cache(cache, rows, 3)
    want[:, :, :, 3] = rows.numpy()[:, :, :, 0]
    layer = tensor(3, 2, 4, 4, grad=False)
    assert decode_kernels.write_cache(cache, layer, 2, layer=1)
    want[1, :, :, 2:6] = layer.numpy()
    one = tensor(2, 5, 4, grad=False)
    assert decode_kernels.write_cache(cache, one, 2, layer=0, row=2)
    want[0, 2, :, 2:7] = one.numpy()
    assert cache.data_ptr() == pointer
    np.testing.assert_array_equal(cache.numpy(), want)
    refused = [(rows, 7, {}), (layer, 4, {"layer": 1}), (layer, -1, {"layer": 1}), (layer, 0, {"layer": 2}),
               (one, 3, {"layer": 0, "row": 2}), (one, 0, {"layer": 0, "row": 3}), (one, 0, {"row": 1}),
               (rows[:, :2], 0, {}), (layer, 0, {}), (one, 0, {"layer": 1}), (layer[:, :1], 0, {"layer": 0}),
               (tensor(3, 2, 4, 3, grad=False), 0, {"layer": 0}), (layer.astype("float64"), 0, {"layer": 0})]
    for new, slot, where in refused:
        assert not decode_kernels.write_cache(cache, new, slot, **where), (new.shape, slot, where)
    np.testing.assert_array_equal(cache.numpy(), want)


def test_shapes_the_kernels_cannot_read_go_to_paddle_or_are_refused(kernels):
    """Tables or positions that do not broadcast never reach the C code (it would read past them):
    paddlenlp's own ops say what is wrong; the wrappers refuse shapes they cannot read."""
    import paddlenlp.transformers.llama.modeling as llama

    own = fast_paths.PADDLENLP_ROTATE_HALF.get(llama.__name__, {}).get("apply_rotary_pos_emb",
                                                                        llama.apply_rotary_pos_emb)
    q, k = tensor(4, 6, 2, 8), tensor(4, 6, 2, 8)
    table = tensor(1, 16, 1, 8, grad=False)
    positions = paddle.to_tensor(np.tile(np.arange(6), (2, 1)))  # a batch of 2 for inputs of 4
    with pytest.raises(ValueError):
        fast_paths.apply_rotary_pos_emb(own, q, k, table, table, positions)
    assert not kernels.calls
    with pytest.raises(ValueError, match="rotary: tables"):
        cpu_kernels.Rotary.apply(q, k, tensor(2, 6, 8, grad=False), tensor(2, 6, 8, grad=False), 1)
    with pytest.raises(ValueError, match="RMSNorm: weight"):
        cpu_kernels.RMSNorm.apply(q, tensor(7), 1e-6)
    with pytest.raises(ValueError, match="RMSNorm: residual"):
        cpu_kernels.add_rms_norm_forward(tensor(3, 8, grad=False), tensor(2, 8, grad=False), tensor(8), 1e-6)
    cache = tensor(2, 4, 2, 5, 8, grad=False)
    with pytest.raises(ValueError, match="decode_attention"):
        decode_kernels.decode_attention(tensor(4, 4, 1, 8, grad=False), tensor(4, 2, 1, 8, grad=False),
                                     tensor(4, 2, 1, 8, grad=False), cache, cache, 2, tensor(4, 1, 1, 5, grad=False))
    assert not kernels.calls


def test_a_library_built_from_another_version_is_refused(monkeypatch, tmp_path):
    """A checkout updated without re-running pip install keeps an old build: refused by its
    version, in one line that says what to do, instead of called with other arguments."""
    import importlib.util
    import os
    import subprocess

    source = open(os.path.join(os.path.dirname(cpu_kernels.__file__), "_cpu_kernels.c")).read()
    assert f"return {kernel_library.VERSION}; }}" in source
    old = tmp_path / "old.c"
    old.write_text(source.replace(f"return {kernel_library.VERSION}; }}", "return 1; }"))
    built = tmp_path / "_cpu_kernels.so"
    subprocess.run(["gcc", "-O1", "-std=c99", "-fPIC", "-shared", "-o", str(built), str(old)], check=True)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == kernel_library._LIBRARY_MODULE:
            return importlib.util.spec_from_file_location("x", str(built))
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    lib, why_not = kernel_library.load()
    assert lib is None and "another version (1, these need" in why_not and "pip install again" in why_not


def test_decode_step_keeps_the_per_operator_path_where_a_layer_needs_it(kernels):
    """Projection biases, LoRA adapters, tensor parallel and weights in another dtype have no place
    in the one-call step: the rollout model plans none and decodes per operator."""
    import dataclasses

    from test_inference import make_model

    from ppo.rollout.inference import InferenceModel

    decoder = InferenceModel(make_model())
    layout = decoder.layout()
    assert isinstance(decoder._decode_plan(layout), decode_kernels.DecodePlan)
    first = layout.layers[0]
    q = first.q
    variants = {"bias": dataclasses.replace(q, bias=paddle.zeros([q.weight.shape[1]])),
                "lora": dataclasses.replace(q, lora_a=paddle.zeros([q.weight.shape[0], 2]),
                                            lora_b=paddle.zeros([2, q.weight.shape[1]]), lora_scale=1.0),
                "float64": dataclasses.replace(q, weight=q.weight.astype("float64"))}
    for name, projection in variants.items():
        decoder._plan = None
        changed = dataclasses.replace(layout, layers=[dataclasses.replace(first, q=projection), *layout.layers[1:]])
        assert decoder._decode_plan(changed) is None, name
    decoder._plan, decoder.mp = None, 2
    assert decoder._decode_plan(layout) is None
    assert not kernels.calls


def np_token_log_probs(logits, labels, temperature):
    """(log-probs, entropy) of softmax(logits / temperature) at the labels, float64."""
    z = logits.astype(np.float64) / temperature
    p = np_softmax(z)
    log_probs = np.log(np.take_along_axis(p, labels[..., None], -1))[..., 0]
    return log_probs, -(p * np.log(np.maximum(p, 1e-300))).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_log_probs_equal_numpy_on_any_thread_count(kernels, temperature):
    """Log-probs of the labels, the entropy and the logits' gradient of a weighted sum of the
    log-probs (rows above the one-thread cut-off, a width that is no multiple of the 16 lanes):
    numpy's in float64, bit for bit on 1 and 2 threads."""
    logits, labels = tensor(3, 37, 1001, scale=3.0), RNG.integers(0, 1001, size=(3, 37))
    weights = RNG.normal(size=(3, 37))
    want_lp, want_h = np_token_log_probs(logits.numpy(), labels, temperature)
    z = logits.numpy().astype(np.float64) / temperature
    onehot = np.zeros(z.shape)
    np.put_along_axis(onehot, labels[..., None], 1.0, -1)
    want_grad = weights[..., None] * (onehot - np_softmax(z)) / temperature
    results = []
    for threads in (1, 2):
        cpu_gemm.STATE.threads = threads
        log_probs, entropy = cpu_kernels.token_log_probs(logits, paddle.to_tensor(labels), temperature, True)
        (log_probs * paddle.to_tensor(weights.astype("float32"))).sum().backward()
        results.append([log_probs.numpy(), entropy.numpy(), logits.grad.numpy()])
        assert entropy.stop_gradient
        logits.clear_gradient()
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    close(results[0][0], want_lp, 1e-5)
    close(results[0][1], want_h, 1e-5)
    close(results[0][2], want_grad, 1e-5)
    assert kernels.calls == {"ppk_token_log_probs": 2, "ppk_token_log_probs_grad": 2}
    with paddle.no_grad():  # no graph: the log-probs alone, no entropy asked
        log_probs, entropy = cpu_kernels.token_log_probs(logits, paddle.to_tensor(labels), temperature)
    assert entropy is None and log_probs.stop_gradient
    np.testing.assert_array_equal(log_probs.numpy(), results[0][0])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_log_probs_shift_by_the_row_maximum(kernels, temperature):
    """Logits far beyond exp's float32 range, each row's largest in the tail after the 16-lane
    blocks: numpy's log-probs and entropy (two near peaks, or one far above the rest), finite."""
    x = RNG.normal(size=(4, 1001))
    x[:, -1] = 400.0  # the rows' maximum (the last two rows: far above everything else)
    x[:2, 5] = 399.7
    labels = np.array([1000, 5, 0, 1000])
    log_probs, entropy = cpu_kernels.token_log_probs(paddle.to_tensor(x.astype("float32")), paddle.to_tensor(labels),
                                                     temperature, True)
    want_lp, want_h = np_token_log_probs(x.astype("float32"), labels, temperature)
    assert np.isfinite(log_probs.numpy()).all() and want_h[:2].min() > 0.5
    close(log_probs.numpy(), want_lp, 1e-5)
    close(entropy.numpy(), want_h, 1e-5)


def test_token_log_probs_refuse_what_they_cannot_take(kernels):
    """Views, other dtypes, labels outside the vocabulary or of another shape or type, and
    temperatures that are not positive finite numbers go to paddle's ops (None), unread."""
    logits = tensor(2, 5, 40, grad=False)
    labels = paddle.to_tensor(RNG.integers(0, 40, size=(2, 5)))
    refused = [(logits[:, :4], labels[:, :4], 1.0), (logits.astype("float64"), labels, 1.0),
               (logits, labels.astype("int32"), 1.0), (logits, labels[:, :4], 1.0),
               (logits, paddle.full([2, 5], 40, "int64"), 1.0), (logits, paddle.full([2, 5], -1, "int64"), 1.0),
               (logits, labels, 0.0), (logits, labels, -1.0), (logits, labels, float("inf")),
               (logits, labels, float("nan")), (logits, labels, 1e-45), (logits, labels, 1e31)]
    for x, y, temperature in refused:
        assert cpu_kernels.token_log_probs(x, y, temperature, True) is None, (x.shape, y.dtype, temperature)
    assert not kernels.calls
    lib = cpu_gemm.STATE.kernels.lib  # the C code's own guard: a label it is handed outside [0, V)
    bad = paddle.full([2, 5], 40, "int64")
    out = paddle.full([2, 5], 7.0)
    assert lib.ppk_token_log_probs(logits.data_ptr(), bad.data_ptr(), out.data_ptr(), out.data_ptr(), None, 10, 40,
                                   1.0, 1) == 1
    np.testing.assert_array_equal(out.numpy(), 7.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_with_the_entropy_through_the_kernel_equal_the_formula(kernels, temperature):
    """The actor's log-probs with the entropy as a statistic and the scoring's log-probs, through
    the kernel: the direct formula's (float64 numpy), bf16 logits computed in float32."""
    from ppo.core.algorithms import gather_log_probs, log_probs_and_entropy

    logits, labels = tensor(2, 9, 301, scale=3.0, grad=False), RNG.integers(0, 301, size=(2, 9))
    log_probs, entropy = log_probs_and_entropy(logits, paddle.to_tensor(labels), temperature,
                                               cpu_kernels.token_log_probs)
    assert kernels.calls == {"ppk_token_log_probs": 1}
    want_lp, want_h = np_token_log_probs(logits.numpy(), labels, temperature)
    close(entropy.numpy(), want_h, 1e-5)
    close(log_probs.numpy(), want_lp, 1e-5)
    close(gather_log_probs(logits, paddle.to_tensor(labels), temperature, cpu_kernels.token_log_probs).numpy(),
          want_lp, 1e-5)
    bf16 = logits.astype("bfloat16")
    got = gather_log_probs(bf16, paddle.to_tensor(labels), temperature, cpu_kernels.token_log_probs)
    assert kernels.calls == {"ppk_token_log_probs": 3} and got.dtype == paddle.float32
    close(got.numpy(), np_token_log_probs(bf16.astype("float32").numpy(), labels, temperature)[0], 1e-5)


@pytest.mark.parametrize("transpose_b,heads_last", [(True, False), (False, True), (False, False)])
def test_attention_products_equal_numpy_views_read_in_place(kernels, transpose_b, heads_last):
    """The attention's batched products, operands transposed views of [B, S, heads, D] (read in
    place): numpy's per-item products forward and both gradients, on 1 and 2 threads; heads_last
    returns [B, M, H, N]."""
    B, H, M, K, N = 2, 3, 5, 4, 6
    a_base = tensor(B, M, H, K)
    b_base = tensor(B, N, H, K) if transpose_b else tensor(B, K, H, N)
    g = RNG.normal(size=(B, M, H, N) if heads_last else (B, H, M, N))
    an = a_base.numpy().transpose(0, 2, 1, 3).astype(np.float64)
    bn = b_base.numpy().transpose(0, 2, 1, 3).astype(np.float64)
    op_b = bn.transpose(0, 1, 3, 2) if transpose_b else bn
    want = an @ op_b
    gn = g.transpose(0, 2, 1, 3) if heads_last else g  # [B, H, M, N]
    want_da = (gn @ op_b.transpose(0, 1, 3, 2)).transpose(0, 2, 1, 3)
    want_db = (an.transpose(0, 1, 3, 2) @ gn)  # d op(b): [B, H, K, N]
    want_db = (want_db.transpose(0, 1, 3, 2) if transpose_b else want_db).transpose(0, 2, 1, 3)
    for threads in (1, 2):
        cpu_gemm.STATE.threads = threads
        a_base.clear_gradient()
        b_base.clear_gradient()
        a, b = a_base.transpose([0, 2, 1, 3]), b_base.transpose([0, 2, 1, 3])
        assert not a.is_contiguous() and cpu_kernels.attention_matmul_ready(a, b, transpose_b)
        y = cpu_kernels.attention_matmul(a, b, transpose_b, heads_last)
        y.backward(paddle.to_tensor(g.astype("float32")))
        close(y.numpy(), want.transpose(0, 2, 1, 3) if heads_last else want, 1e-5)
        close(a_base.grad.numpy(), want_da, 1e-5)
        close(b_base.grad.numpy(), want_db, 1e-5)
    assert kernels.calls == {"ppk_batched_gemm": 6}


def test_attention_products_under_recompute_and_their_fallbacks(kernels):
    """Under paddle's recompute, reentrant and not (paddlenlp's default), gradients equal paddle's
    matmul; shapes, dtypes or sizes the kernel does not take go to paddle's matmul."""
    from paddle.distributed.fleet.utils import recompute

    B, S, H, D = 2, 5, 3, 4
    x = tensor(B, S, H * D)
    w = tensor(H * D, 3 * H * D)
    g = paddle.to_tensor(RNG.normal(size=(B, S, H * D)).astype("float32"))

    def block(x, matmul):
        q, k, v = (t.transpose([0, 2, 1, 3]) for t in paddle.matmul(x, w).reshape([B, S, 3, H, D]).unbind(2))
        probs = F.softmax(matmul(q, k, True, False), axis=-1)
        return matmul(probs, v, False, True).reshape([B, S, H * D])

    def paddles(a, b, transpose_b, heads_last):
        y = paddle.matmul(a, b, transpose_y=transpose_b)
        return y.transpose([0, 2, 1, 3]) if heads_last else y

    for reentrant in (True, False):
        results = []
        for matmul in (paddles, cpu_kernels.attention_matmul):
            x.clear_gradient()
            w.clear_gradient()
            (recompute(block, x, matmul, use_reentrant=reentrant) * g).sum().backward()
            results.append((x.grad.numpy(), w.grad.numpy()))
        for mine, theirs in zip(results[1], results[0]):
            close(mine, theirs, 1e-5)
    assert kernels.calls["ppk_batched_gemm"] == 16  # per mode: 2 forward, 2 again in the backward, 4 gradients
    calls = dict(kernels.calls)
    a, b = tensor(2, 3, 4, 5, grad=False), tensor(2, 3, 5, 6, grad=False)
    for x_, y_ in ((a, tensor(2, 1, 5, 6, grad=False)), (a.astype("float64"), b.astype("float64")),
                   (tensor(2, 3, 0, 5, grad=False), b), (a, tensor(2, 3, 4, 6, grad=False))):
        try:
            want = paddle.matmul(x_, y_).numpy()
        except ValueError:  # (shapes that do not multiply: paddle's error, as before)
            with pytest.raises(ValueError):
                cpu_kernels.attention_matmul(x_, y_)
            continue
        np.testing.assert_array_equal(cpu_kernels.attention_matmul(x_, y_).numpy(), want)
    assert kernels.calls == calls
