"""The oneDNN matmul path (ppo.models.cpu_gemm): products and both gradients equal paddle's matmul
within float32 rounding (numpy products as the reference), whole models (causal LM logits,
log-probs, gradients; a tied head; LoRA; recompute; the rollout decoder) equal paddle's path, bf16
products equal the product of the bf16-rounded inputs, and the fallbacks say so in one line."""

import numpy as np
import paddle
import pytest

from ppo.models import cpu_gemm

RNG = np.random.default_rng(0)


@pytest.fixture
def onednn():
    """The oneDNN path on for one test (fp32), with a count of the products it ran."""
    assert cpu_gemm.activate("onednn") is None, cpu_gemm.STATE.reason
    calls = []
    original = cpu_gemm._gemm

    def counted(*args):
        calls.append(args[2:])
        return original(*args)

    cpu_gemm._gemm = counted
    yield calls
    cpu_gemm._gemm = original
    cpu_gemm.deactivate()


def tensor(*shape, grad=True):
    return paddle.to_tensor(RNG.normal(size=shape).astype("float32"), stop_gradient=not grad)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_products_and_gradients_equal_numpy(onednn, transpose_w):
    x, w = tensor(3, 5, 24), tensor(*((16, 24) if transpose_w else (24, 16)))
    upstream = RNG.normal(size=(3, 5, 16)).astype("float32")
    y = cpu_gemm.matmul(x, w, transpose_w)
    y.backward(paddle.to_tensor(upstream))
    xn, wn = x.numpy().reshape(15, 24), (w.numpy().T if transpose_w else w.numpy())
    dy = upstream.reshape(15, 16)
    np.testing.assert_allclose(y.numpy().reshape(15, 16), xn @ wn, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x.grad.numpy().reshape(15, 24), dy @ wn.T, rtol=1e-5, atol=1e-5)
    dw = xn.T @ dy
    np.testing.assert_allclose(w.grad.numpy(), dw.T if transpose_w else dw, rtol=1e-5, atol=1e-5)
    # forward, dx and dW: three oneDNN products, with the transposes each needs
    assert [c[:2] for c in onednn] == [(False, transpose_w), (False, not transpose_w),
                                       (True, False)]


def test_frozen_weight_views_and_no_grad(onednn):
    x, w = tensor(8, 12), tensor(12, 6, grad=False)
    view = x[:, 2:10]  # a strided view: copied dense before oneDNN reads it
    y = cpu_gemm.matmul(view, w[2:10])
    y.sum().backward()
    np.testing.assert_allclose(y.numpy(), x.numpy()[:, 2:10] @ w.numpy()[2:10], rtol=1e-5, atol=1e-5)
    assert w.grad is None and x.grad is not None
    expected = np.zeros((8, 12), np.float32)
    expected[:, 2:10] = np.ones((8, 6), np.float32) @ w.numpy()[2:10].T
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-5, atol=1e-5)
    with paddle.no_grad():
        n = len(onednn)
        out = cpu_gemm.matmul(x, w)  # fewer rows than SMALL_ROWS (a decode step's): paddle's matmul
        assert out.stop_gradient and len(onednn) == n
        np.testing.assert_allclose(out.numpy(), x.numpy() @ w.numpy(), rtol=1e-5, atol=1e-5)
        tall = tensor(cpu_gemm.SMALL_ROWS, 12, grad=False)
        out = cpu_gemm.matmul(tall, w)
        assert out.stop_gradient and len(onednn) == n + 1
        np.testing.assert_allclose(out.numpy(), tall.numpy() @ w.numpy(), rtol=1e-5, atol=1e-5)


def test_linear_routes_float32_only(onednn):
    x, w, b = tensor(4, 8), tensor(8, 3), tensor(3)
    y = paddle.nn.functional.linear(x, w, b)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ w.numpy() + b.numpy(), rtol=1e-5, atol=1e-5)
    assert len(onednn) == 1
    paddle.nn.functional.linear(x.astype("float64"), w.astype("float64"))  # paddle's own kernel
    assert len(onednn) == 1
    cpu_gemm.deactivate()
    paddle.nn.functional.linear(x, w)
    assert len(onednn) == 1 and paddle.nn.functional.linear is cpu_gemm._ORIGINAL_LINEAR


def causal_lm(family: str, tied: bool, seed: int = 0):
    from ppo.models.families import family_named

    fam = family_named(family)
    sizes = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=64)
    if family in ("qwen3", "ernie4_5"):
        sizes["head_dim"] = 16
    paddle.seed(seed)
    model = fam.causal_lm_class(fam.config_class(**sizes))
    from ppo.models import fast_paths

    return cpu_gemm.install(fast_paths.install(model))


def forward_and_grads(model, ids):
    from ppo.core.algorithms import gather_log_probs

    model.clear_gradients()
    logits = model(input_ids=ids, return_dict=True).logits
    log_probs = gather_log_probs(logits[:, :-1], ids[:, 1:])
    (-log_probs.mean()).backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return logits.numpy(), log_probs.numpy(), grads


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", True), ("ernie4_5", False)])
def test_whole_models_equal_paddles_path(onednn, family, tied):
    """Logits, log-probs and every gradient of a causal LM equal paddle's matmul path within fp32
    rounding, and the products (projections, MLP, head) really went through oneDNN."""
    model = causal_lm(family, tied)
    ids = paddle.to_tensor(RNG.integers(0, 96, size=(3, 12)))
    cpu_gemm.deactivate()
    reference = forward_and_grads(model, ids)
    assert not onednn  # paddle's path: no oneDNN product
    assert cpu_gemm.activate("onednn") is None
    got = forward_and_grads(model, ids)
    # 7 projections per layer and the head, each forward + dx + dW
    assert len(onednn) == 3 * (7 * 2 + 1), len(onednn)
    np.testing.assert_allclose(got[0], reference[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], reference[1], rtol=1e-5, atol=1e-5)
    assert got[2].keys() == reference[2].keys()
    for name, g in reference[2].items():
        np.testing.assert_allclose(got[2][name], g, rtol=1e-4, atol=1e-6, err_msg=name)


def test_lora_recompute_and_rollout_decoder_equal_paddles_path():
    """LoRA (the base products through oneDNN, adapters paddle's) under full recompute: gradients
    equal paddle's path; the rollout decoder's log-probs (temperature 0.7) equal too."""
    from ppo.models.lora import apply_lora
    from ppo.rollout.inference import InferenceModel

    model = causal_lm("llama", False, seed=3)
    apply_lora(model, rank=4, alpha=8.0, targets="q_proj,v_proj,gate_proj")
    for layer in model.sublayers():
        if hasattr(layer, "lora_B"):  # B starts at zero: make the adapters matter
            layer.lora_B.set_value(paddle.to_tensor(RNG.normal(0, 0.2, layer.lora_B.shape).astype("float32")))
    model.config.recompute, model.config.recompute_granularity = True, "full"
    model.llama.enable_recompute = True
    model.train()
    ids = paddle.to_tensor(RNG.integers(0, 96, size=(2, 10)))
    cpu_gemm.deactivate()
    reference = forward_and_grads(model, ids)
    decoder = InferenceModel(model)
    mask = paddle.ones_like(ids)
    ref_log_probs = decoder.log_probs(ids, mask, temperature=0.7).numpy()
    assert cpu_gemm.activate("onednn") is None
    try:
        got = forward_and_grads(model, ids)
        log_probs = decoder.log_probs(ids, mask, temperature=0.7).numpy()
    finally:
        cpu_gemm.deactivate()
    assert reference[2] and all("lora" in n for n in reference[2])
    for name, g in reference[2].items():
        np.testing.assert_allclose(got[2][name], g, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(log_probs, ref_log_probs, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_gemm.cpu_has_bf16(), reason="this CPU has no bf16 units")
def test_bf16_products_are_the_bf16_rounded_inputs_product():
    assert cpu_gemm.activate("onednn", bf16=True) is None
    try:
        x, w = tensor(64, 96), tensor(96, 40)
        y = cpu_gemm.matmul(x, w)
        y.backward(paddle.ones_like(y))
    finally:
        cpu_gemm.deactivate()
    bf = lambda t: t.astype("bfloat16").astype("float32").numpy()  # noqa: E731
    exact = x.numpy() @ w.numpy()
    np.testing.assert_allclose(y.numpy(), bf(x) @ bf(w), rtol=1e-5, atol=1e-4)
    assert np.abs(y.numpy() - exact).max() > 1e-3  # it did round the inputs to bf16
    np.testing.assert_allclose(w.grad.numpy(), bf(x).T @ np.ones((64, 40), np.float32), rtol=1e-5, atol=1e-4)
    assert x.grad.dtype == paddle.float32 and w.grad.dtype == paddle.float32


def test_fallbacks_are_one_line(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "cpu_has_bf16", lambda: False)
    assert "no bf16 units" in cpu_gemm.activate("onednn", bf16=True)
    assert cpu_gemm.STATE.active and not cpu_gemm.STATE.bf16
    assert cpu_gemm.activate("paddle") is None and not cpu_gemm.STATE.active
    monkeypatch.setattr(cpu_gemm, "_library_path", lambda: "/nonexistent/libdnnl.so.3")
    monkeypatch.setattr(cpu_gemm.STATE, "library", None)
    monkeypatch.setattr(cpu_gemm.STATE, "reason", None)
    notice = cpu_gemm.activate("auto")
    assert notice and "\n" not in notice and "matmuls stay paddle's" in notice and "/nonexistent" in notice
    assert not cpu_gemm.STATE.active and paddle.nn.functional.linear is cpu_gemm._ORIGINAL_LINEAR
    from ppo.core.errors import UserError
    from ppo.stages.optim import Precision

    with pytest.raises(UserError, match="'cpu_gemm' = 'onednn'"):
        Precision(False, False, on_gpu=False, cpu_gemm_mode="onednn")
    Precision(False, False, on_gpu=False, cpu_gemm_mode="auto")  # falls back, trains
    assert not cpu_gemm.STATE.active


@pytest.mark.skipif(not cpu_gemm.cpu_has_bf16(), reason="this CPU has no bf16 units")
def test_frozen_weights_casts_each_parameter_once_and_forgets_on_exit():
    """Within frozen_weights (a rollout) a bf16 parameter is cast once for every product; outside it
    every product reads the parameter's current value (a changed weight is never served stale)."""
    lin = paddle.nn.Linear(32, 16)
    x = tensor(4, 32, grad=False)
    assert cpu_gemm.activate("onednn", bf16=True) is None
    casts = []
    original = cpu_gemm._dense
    cpu_gemm._dense = lambda t, bf16: casts.append(tuple(t.shape)) or original(t, bf16)
    try:
        with paddle.no_grad():
            with cpu_gemm.frozen_weights():
                first = [cpu_gemm.matmul(x, lin.weight).numpy() for _ in range(3)]
            assert casts.count((32, 16)) == 1 and casts.count((4, 32)) == 3
            lin.weight.set_value(lin.weight * 2)  # (set_value leaves paddle's inplace version as it was)
            after = cpu_gemm.matmul(x, lin.weight).numpy()
            with cpu_gemm.frozen_weights():
                again = cpu_gemm.matmul(x, lin.weight).numpy()
    finally:
        cpu_gemm._dense = original
        cpu_gemm.deactivate()
    assert cpu_gemm.STATE.cache is None
    np.testing.assert_array_equal(first[0], first[2])
    bf = lambda t: t.astype("bfloat16").astype("float32").numpy()  # noqa: E731
    np.testing.assert_allclose(after, bf(x) @ bf(lin.weight), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(again, after, rtol=0, atol=0)
    np.testing.assert_allclose(after, 2 * first[0], rtol=1e-2, atol=1e-3)
