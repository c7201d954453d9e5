"""Faster CPU paths through paddlenlp's decoder layers, with the same results (float rounding).

Profiled on the 2-core CPU (``benchmarks/profile_phases.py``: one actor update of the 33.5M model),
three things cost more than their arithmetic outside the matmuls:

* RMSNorm: paddlenlp composes it from ``pow`` (a slow CPU kernel), ``mean``, ``rsqrt`` and two
  broadcasting multiplies, each with its own backward node.  :class:`FusedRMSNorm` runs paddle's
  fused RMSNorm kernel forward (it has no CPU backward kernel; on CPU it needs AVX-512, else the
  composed forward runs inside the layer) and the closed-form backward.
* attention: paddlenlp multiplies the queries by a transposed *view* of the keys, a batched
  matmul path about 10x slower on CPU than ``matmul(q, k, transpose_y=True)`` (:func:`attention`).
* rotary embedding: paddlenlp's ``rotate_half`` (``[-x2, x1]`` of the two halves of the head) is
  two slices, a negation and a concat, each with its own backward; :func:`rotate_half` is one roll
  and a multiply by a cached sign row, bit for bit the same (``apply_rotary_pos_emb`` of LLaMA,
  Qwen2, Qwen3 / ERNIE and Mistral forward + backward: 16.8 -> 10.0 ms on ``[4, 128, 8, 64]``).
* strided views: paddle 3 makes ``transpose`` / ``slice`` results views, and the copies later ops
  make of them run a generic strided-copy kernel (a ``[4, 128, 8, 64]`` transpose + reshape: 2 ms
  against 0.05 ms for the dense transpose kernel).  :func:`dense_kernels` switches views off
  (``FLAGS_use_stride_kernel``) around a forward + backward that does not write through views.

:func:`install` puts the norm and attention paths on a model's layers (instance attributes only:
other models and paddlenlp's classes are untouched); :func:`install_rotate_half` points the
``rotate_half`` of a family's paddlenlp module (``ModelFamily.rotary_module``) at :func:`rotate_half`
on CPU (a module global, since ``apply_rotary_pos_emb`` reads it there; its results are unchanged
bit for bit); the loaders (``ppo.models.loading``) install them on every model
they load, for SFT, reward-model training and PPO alike.
Anything they do not cover (flash attention, alibi, sequence-split attention, non-float32 norms)
goes to paddlenlp's own code.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ppo.models import cpu_kernels
from ppo.models.cpu_gemm import cpu_flags

try:
    from paddle.incubate.nn.functional import fused_rms_norm as _fused_rms_norm
except ImportError:  # an older paddle
    _fused_rms_norm = None


def _probe(kernel, flags=None):
    """``kernel`` when this build has it for the current device and it can run on this CPU, else None.

    paddle's CPU kernel (``phi::fusion::RmsNormAvxKernel``) uses AVX-512 instructions whatever the
    CPU: on one without them the process dies of SIGILL, which no ``except`` can catch (seen on an
    AMD EPYC with AVX2 alone).  So on CPU it is tried only where the CPU has ``avx512f``
    (``flags``: the CPU's feature flags, read from ``/proc/cpuinfo`` when None).
    """
    if paddle.get_device().startswith("cpu"):
        if "avx512f" not in (cpu_flags() if flags is None else flags):
            return None
    try:
        kernel(paddle.ones([1, 8]), paddle.ones([8]), None, 1e-6, 1)
    except Exception:  # no kernel registered for this device
        return None
    return kernel


# paddle's fused RMSNorm ``(x, weight, bias, eps, begin_norm_axis, residual=...)`` (CPU too, with
# AVX-512; no CPU backward kernel), or None
FUSED_RMS_NORM = _probe(_fused_rms_norm) if _fused_rms_norm is not None else None


try:
    from paddle.incubate.nn.functional import swiglu as _PADDLE_SWIGLU
except ImportError:  # an older paddle
    _PADDLE_SWIGLU = None


def on_cpu() -> bool:
    return paddle.get_device().startswith("cpu")


@contextlib.contextmanager
def dense_kernels():
    """Within it (on CPU), view-making ops (transpose, slice, ...) return dense tensors: no slow
    strided copies later.  Only for code that never writes into a tensor through a view of it."""
    if not on_cpu():
        yield
        return
    before = paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"]
    paddle.set_flags({"FLAGS_use_stride_kernel": False})
    try:
        yield
    finally:
        paddle.set_flags({"FLAGS_use_stride_kernel": before})


class FusedRMSNorm(PyLayer):
    """``x * rsqrt(mean(x^2, -1) + eps) * weight`` for x [..., H], weight [H]: the fused kernel
    forward; backward with r = rsqrt(mean(x^2) + eps), x_hat = x r, g_w = g * weight:
    dx = r (g_w - x_hat mean(g_w x_hat, -1)),  dweight = sum over rows of g x_hat."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        # paddle wants None for the gradient of an input that does not need one (a frozen weight)
        ctx.needs = (not x.stop_gradient, not weight.stop_gradient)
        if FUSED_RMS_NORM is None:  # no usable kernel: the composed forward (no autograd nodes in here)
            return x * paddle.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight
        return FUSED_RMS_NORM(x, weight, None, eps, x.ndim - 1)[0]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        r = paddle.rsqrt((x * x).mean(-1, keepdim=True) + ctx.eps)
        x_hat = x * r
        grad_w = grad * weight
        dx = (grad_w - x_hat * (grad_w * x_hat).mean(-1, keepdim=True)) * r if ctx.needs[0] else None
        dweight = (grad * x_hat).reshape([-1, x.shape[-1]]).sum(0) if ctx.needs[1] else None
        return dx, dweight


def rms_norm(x, weight, eps: float):
    """Differentiable RMSNorm [..., H] of float32 ``x`` and ``weight`` [H]: the compiled kernels where
    they run (``cpu_kernels.RMSNorm``), else :class:`FusedRMSNorm`."""
    if cpu_kernels.ready(x, weight):
        return cpu_kernels.RMSNorm.apply(x, weight, eps)
    return FusedRMSNorm.apply(x, weight, eps)


def _norm_forward(self, hidden_states):
    """A paddlenlp RMSNorm layer's forward (bound to the layer): fused for float32."""
    if hidden_states.dtype == paddle.float32 and self.weight.dtype == paddle.float32:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)  # mixed precision: paddlenlp's casts


def attention(original, query_states, config, key_states, value_states, attention_mask, output_attentions,
              alibi=None, attn_mask_startend_row_indices=None, sequence_parallel=False, reshard_layer=None, *args,
              **kwargs):
    """paddlenlp's ``scaled_dot_product_attention`` (``original``; same arguments, same result) with
    the keys multiplied as ``matmul(q, k, transpose_y=True)``; cases it does not cover go to ``original``.
    Inputs [B, S, heads, D]; returns [B, S, heads * D] ([B * S, heads * D] under sequence parallel)."""
    if (config.use_flash_attention or alibi is not None or attn_mask_startend_row_indices is not None
            or reshard_layer is not None or attention_mask is None or query_states.dtype != paddle.float32
            or getattr(config, "context_parallel_degree", 1) > 1):
        return original(query_states, config, key_states, value_states, attention_mask, output_attentions,
                        alibi, attn_mask_startend_row_indices, sequence_parallel, reshard_layer, *args, **kwargs)
    bsz, q_len, num_heads, head_dim = query_states.shape
    kv_len = value_states.shape[1]
    q, k, v = (t.transpose([0, 2, 1, 3]) for t in (query_states, key_states, value_states))  # [B, heads, S, D]
    mask = attention_mask.reshape([bsz, 1, q_len, kv_len])
    if mask.stop_gradient and key_states.shape[1] == kv_len and cpu_kernels.softmax_bias_ready(q, mask, kv_len):
        # one pass forward and backward, the scale inside it (the multiply of the queries, a strided
        # view, and its gradient were 8 ms of [16, 8, 320, 64] on CPU)
        weights = cpu_kernels.softmax_bias(cpu_kernels.attention_matmul(q, k, transpose_b=True), mask,
                                           1 / math.sqrt(head_dim))
    else:
        weights = cpu_kernels.attention_matmul(q * (1 / math.sqrt(head_dim)), k, transpose_b=True)
        weights = F.softmax(weights + mask, axis=-1)
    # (the kernels' batched products where they run: per head one GEMM on the matmuls' threads)
    out = cpu_kernels.attention_matmul(weights, v, heads_last=True)  # [B, S, heads, D]
    out = out.reshape([bsz * q_len, head_dim * num_heads] if sequence_parallel else [bsz, q_len, head_dim * num_heads])
    return (out, weights) if output_attentions else out


_SIGNS: dict = {}


def rotate_half(x):
    """paddlenlp's ``rotate_half``: ``concat([-x2, x1], -1)`` for the halves x1 = x[..., :D//2] and
    x2 = x[..., D//2:], bit for bit, as ``roll(x, D - D//2) * [-1 (D - D//2 times), +1 (D//2)]``."""
    D = x.shape[-1]
    shift = D - D // 2
    sign = _SIGNS.get((D, x.dtype))
    if sign is None:
        sign = _SIGNS[(D, x.dtype)] = paddle.concat([paddle.full([shift], -1.0, x.dtype),
                                                     paddle.full([D // 2], 1.0, x.dtype)])
    return paddle.roll(x, shift, axis=-1) * sign


def apply_rotary_pos_emb(original, q, k, cos, sin, position_ids):
    """paddlenlp's ``apply_rotary_pos_emb`` (``original``, same arguments and results) as one
    compiled pass for q and k where the kernels take it (``cpu_kernels.Rotary``), else ``original``."""
    if cpu_kernels.ready(q, k, cos, sin):
        tables = cpu_kernels.rotary_tables(q, k, cos, sin, position_ids)
        if tables is not None:
            return cpu_kernels.Rotary.apply(q, k, *tables)
    return original(q, k, cos, sin, position_ids)


def swiglu(original, x, y=None, name=None):
    """paddle's fused ``swiglu(x, y)`` (``original``): ``silu(x) * y`` through the compiled kernels
    where they take it (``cpu_kernels.SwiGLU``), else ``original``."""
    if y is not None and x.shape == y.shape and cpu_kernels.ready(x, y):
        return cpu_kernels.SwiGLU.apply(x, y)
    return original(x, y)


# paddlenlp modules given to install_rotate_half: {module: {name: its own function}}
PADDLENLP_ROTATE_HALF: dict = {}


def install_rotate_half(module_name: str | None) -> None:
    """On CPU, in the paddlenlp module ``module_name`` (a family's ``rotary_module``, whose decoder
    layers read these as module globals): :func:`rotate_half` for its ``rotate_half``, and
    :func:`apply_rotary_pos_emb` and :func:`swiglu` around its own (results unchanged; the compiled
    kernels decide per call)."""
    import importlib

    if module_name is None or not on_cpu():
        return
    module = importlib.import_module(module_name)
    if module_name in PADDLENLP_ROTATE_HALF:
        return
    own = PADDLENLP_ROTATE_HALF[module_name] = {"rotate_half": module.rotate_half}
    module.rotate_half = rotate_half
    for name, wrapper in (("apply_rotary_pos_emb", apply_rotary_pos_emb), ("swiglu", swiglu)):
        if callable(getattr(module, name, None)):
            own[name] = getattr(module, name)
            setattr(module, name, functools.partial(wrapper, own[name]))


def install(model):
    """Put the fast RMSNorm and attention on ``model``'s paddlenlp layers (once: a layer so changed
    is marked ``_ppo_fast_path``); returns ``model``.  Without paddle's fused RMSNorm kernel the norm
    runs its composed forward and the closed-form backward (forward + backward of [16, 128, 512]:
    40 ms against paddlenlp's 95, measured on a 2-core AMD EPYC with AVX2)."""
    for layer in [model, *model.sublayers()]:
        if getattr(layer, "_ppo_fast_path", False):
            continue
        config = getattr(layer, "config", None)
        if (type(layer).__name__.endswith("RMSNorm") and hasattr(layer, "weight")
                and hasattr(layer, "variance_epsilon") and not getattr(config, "use_fused_rms_norm", False)):
            layer.forward = types.MethodType(_norm_forward, layer)  # (a deep copy re-binds to the copy)
        elif callable(getattr(layer, "attn_func", None)):
            layer.attn_func = functools.partial(attention, layer.attn_func)
        elif getattr(layer, "act_fn", None) is _PADDLE_SWIGLU and _PADDLE_SWIGLU is not None:  # Qwen2's MLP
            layer.act_fn = functools.partial(swiglu, _PADDLE_SWIGLU)
        else:
            continue
        layer._ppo_fast_path = True
    return model
