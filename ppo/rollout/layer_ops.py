"""The rollout inference model's per-operator forms (``ppo.rollout.inference``): each takes the
toolkit's CPU kernels where they run, else paddle's fused kernel where the build has it, else
composed ops; the projections with their LoRA terms applied on the fly (always the current
adapters); the prefill's cache writes."""

from __future__ import annotations

import numpy as np
import paddle

from ppo.models import cpu_gemm, cpu_kernels, decode_kernels
from ppo.models.families import Projection
from ppo.models.fast_paths import FUSED_RMS_NORM


def rms_norm(x, weight, eps):
    if cpu_kernels.ready(x, weight):  # the toolkit's CPU kernel: one pass on the matmuls' threads
        return cpu_kernels.rms_norm_forward(x, weight, eps)
    if FUSED_RMS_NORM is not None and x.dtype == weight.dtype:
        # paddle's fused kernel (CPU too): 8x faster than the composed ops at decode size
        return FUSED_RMS_NORM(x, weight, None, eps, x.ndim - 1)[0]
    # every op counts in a decode step: no dtype casts when everything is float32 already
    x32 = x if x.dtype == paddle.float32 else x.astype("float32")
    variance = (x32 * x32).mean(-1, keepdim=True)  # x * x: paddle's pow kernel is ~50x slower on CPU
    normed = paddle.rsqrt(variance + eps) * x
    return (normed if normed.dtype == weight.dtype else normed.astype(weight.dtype)) * weight


def add_rms_norm(x, residual, weight, eps):
    """(RMSNorm of ``x + residual``, ``x + residual``): the residual stream's add and the next norm,
    one fused kernel where the build has it."""
    if cpu_kernels.ready(x, residual, weight):
        return cpu_kernels.add_rms_norm_forward(x, residual, weight, eps)
    if FUSED_RMS_NORM is not None and x.dtype == weight.dtype == residual.dtype:
        normed, summed = FUSED_RMS_NORM(x, weight, None, eps, x.ndim - 1, residual=residual)[:2]
        return normed, summed
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary_sign(D: int, dtype):
    """[D]: -1 on the first half, 1 on the second: ``rotate_half(x) == roll(x, D/2) * sign``, so a
    rotary ``x * cos + rotate_half(x) * sin`` is ``x * cos + roll(x, D/2) * (sin * sign)``."""
    return paddle.concat([paddle.full([D // 2], -1.0, dtype), paddle.full([D - D // 2], 1.0, dtype)])


def rotary(x, cos, signed_sin):
    """RoPE of x [..., D] with factors broadcast to it (``signed_sin``: sin times ``rotary_sign``)."""
    return x * cos + paddle.roll(x, x.shape[-1] // 2, axis=-1) * signed_sin


def matmul(x, projection: Projection):
    """x [N, in] @ weight [in, out] (+ the LoRA term x @ A [in, r] @ B [r, out] * scale, applied on
    the fly: always the current adapters) -> [N, out]."""
    y = cpu_gemm.matmul(x, projection.weight)  # (paddle.matmul unless the oneDNN path is active)
    if projection.lora_a is not None:
        y = y + paddle.matmul(paddle.matmul(x, projection.lora_a), projection.lora_b) * projection.lora_scale
    return y


def linear(x, projection: Projection):
    """x [N, in] @ weight [in, out] (+ bias [out]) -> [N, out]."""
    y = matmul(x, projection)
    return y if projection.bias is None else y + projection.bias


def write_prefill(cache, layer: int, new, rows, slot: int):
    """``cache[layer, rows, :, slot:slot + S] = new`` [b, KV, S, D] (``rows`` None: every row, in
    order); written through the whole cache tensor (under dense kernels ``cache[layer]`` is a copy),
    in place by the toolkit's kernels where they run (paddle's assignment copies the whole cache)."""
    S = new.shape[2]
    if rows is None:
        if not decode_kernels.write_cache(cache, new, slot, layer=layer):
            cache[layer, :, :, slot:slot + S] = new
        return
    for j, row in enumerate(rows):
        if not decode_kernels.write_cache(cache, new[j], slot, layer=layer, row=int(row)):
            cache[layer, int(row), :, slot:slot + S] = new[j]


def rotation_matrix(D: int, dtype):
    """[D, D] with ``x @ R == rotate_half(x)``: out[j] = -x[j + D/2] (j < D/2), x[j - D/2] (j >= D/2)."""
    half = D // 2
    r = np.zeros((D, D), dtype="float32")
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return paddle.to_tensor(r).astype(dtype)
