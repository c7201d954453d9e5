"""The rollout's inference forms of the toolkit's CPU kernels (``_cpu_kernels.c``, no autograd): a
decode step's attention over the KV cache, the cache writes (a decode step's slot, a prefill's
slots), rotary written in place or heads-first, and a whole decode step's layers in one call
(``decode_layers``: the products through the GEMM ``cpu_gemm.blas_gemm`` finds, paddle's MKL).

The same switch as the training forms (``ppo.models.cpu_kernels``): on while ``cpu_gemm`` is, for
float32 tensors on CPU in dynamic mode; the callers keep paddle's ops where these say no.
"""

from __future__ import annotations

import ctypes
import math

import paddle

from ppo.models import cpu_gemm
from ppo.models.cpu_kernels import _INT32, _dense, _lib, _rope, _threads, ready


def decode_attention(q, k, v, keys, values, layer: int, bias):
    """A decode step's attention (no autograd): q [B, H, 1, D] (scaled), the new k, v [B, KV, 1, D],
    the whole cache ``keys`` / ``values`` [layers, B, KV, T, D] (``layer`` read in place) and ``bias``
    [B, 1, 1, T]; returns [B, H, 1, D], the softmax over the cache's slots and the new token."""
    B, H, _, D = q.shape
    L, _, KV, T, _ = keys.shape
    if (list(keys.shape) != [L, B, KV, T, D] or values.shape != keys.shape or not 0 <= layer < L or H % KV
            or list(k.shape) != [B, KV, 1, D] or v.shape != k.shape or list(q.shape) != [B, H, 1, D]
            or math.prod(bias.shape) != B * T or not ready(q, k, v, keys, values, bias)
            or not (keys.is_contiguous() and values.is_contiguous())):
        raise ValueError(f"decode_attention: q {q.shape}, k {k.shape}, v {v.shape}, cache {keys.shape} / "
                         f"{values.shape} (dense float32), layer {layer}, bias {bias.shape}")
    q, k, v, bias = _dense(q), _dense(k), _dense(v), _dense(bias.reshape([B, T]))
    out = paddle.empty_like(q)
    offset = layer * B * KV * T * D * 4  # bytes: float32
    if _lib().ppk_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), keys.data_ptr() + offset,
                                   values.data_ptr() + offset, bias.data_ptr(), out.data_ptr(), B, H, KV, T, D,
                                   _threads()):
        raise MemoryError("decode attention: out of memory for the scores")
    return out


def write_cache(cache, new, slot: int, layer: int | None = None, row: int | None = None) -> bool:
    """``cache[(layer, (row,)) ..., slot:slot + S, :] = new`` in place for a dense float32 cache
    [L, B, KV, T, D]: ``new`` [L, B, KV, S, D] (a decode step's new keys or values, S = 1), [B, KV,
    S, D] with ``layer`` (a prefill's) or [KV, S, D] with ``layer`` and ``row`` (one row of a
    prefill in groups).  False (nothing written) where the kernels do not take them; paddle's
    assignment copies the whole cache per write on CPU (15 ms a layer for a [16, 8, 195, 64] one)."""
    if not (ready(cache, new) and cache.is_contiguous() and cache.ndim == 5) or (row is not None and layer is None):
        return False
    L, B, KV, T, D = cache.shape
    lead, first = [L, B], 0  # the rows of [.., KV] that new covers and the first of them
    if layer is not None:
        if not 0 <= layer < L or (row is not None and not 0 <= row < B):
            return False
        lead, first = ([], layer * B + row) if row is not None else ([B], layer * B)
    S = new.shape[-2] if new.ndim == len(lead) + 3 else 0
    if list(new.shape) != lead + [KV, S, D] or S < 1 or not 0 <= slot <= T - S:
        return False
    new = _dense(new)
    _lib().ppk_cache_write(cache.data_ptr() + first * KV * T * D * 4, new.data_ptr(), math.prod(lead) * KV, T, D,
                           slot, S)
    return True


def rotary_forward(x, cos, sin, time_axis: int):
    """Rotary of x [B, A1, A2, D] (time axis 1 or 2) with tables [1 or B, T, D], no autograd (inference)."""
    return _rope(_dense(x), _dense(cos), _dense(sin), time_axis, False)


def rotary_heads_first(x, cos, sin):
    """Rotary of x [B, S, heads, D] with tables [1 or B, S, D], returned [B, heads, S, D] (inference)."""
    return _rope(_dense(x), _dense(cos), _dense(sin), 1, False, transpose_out=True)


DECODE_LAYER_TENSORS = ("q", "k", "v", "o", "gate", "up", "down", "post_attention_norm", "next_norm", "q_norm",
                        "k_norm")


class DecodePlan:
    """A decode step's layers for :func:`decode_layers`: the weights' addresses (checked once, held
    with the tensors, so they stay alive) and the geometry; built per rollout (the weights are
    frozen while it decodes)."""

    def __init__(self, layers: list, heads: int, kv_heads: int, head_dim: int, eps: float):
        gemm = cpu_gemm.blas_gemm()
        if (gemm is None or not layers or kv_heads <= 0 or heads % kv_heads or head_dim % 2
                or any(len(layer) != len(DECODE_LAYER_TENSORS) for layer in layers)
                or any(t is None or t.ndim != 2 for t in (layers[0][0], layers[0][4]))):
            raise ValueError(f"decode plan: {len(layers)} layers, {heads} heads over {kv_heads} kv heads of "
                             f"{head_dim}, GEMM {gemm}")
        hidden = layers[0][0].shape[0]
        inter = layers[0][4].shape[1]
        if max(hidden, inter, heads * head_dim) >= _INT32:
            raise ValueError(f"decode plan: sizes {hidden}, {inter}, {heads * head_dim} past the GEMM's 32-bit range")
        H, KV, D = heads, kv_heads, head_dim
        shapes = ([hidden, H * D], [hidden, KV * D], [hidden, KV * D], [H * D, hidden], [hidden, inter],
                  [hidden, inter], [inter, hidden], [hidden], [hidden], [D], [D])
        addresses = []
        for i, tensors in enumerate(layers):
            for name, t, shape in zip(DECODE_LAYER_TENSORS, tensors, shapes):
                if t is None and name in ("q_norm", "k_norm"):
                    addresses.append(None)
                    continue
                if t is None or list(t.shape) != shape or not ready(t) or not t.is_contiguous():
                    raise ValueError(f"decode plan: layer {i} {name} "
                                     f"{None if t is None else list(t.shape)} (needs a dense float32 {shape})")
                addresses.append(t.data_ptr())
        self.gemm, self.kind = gemm
        self.addresses = (ctypes.c_void_p * len(addresses))(*addresses)
        self.tensors = layers
        self.layers, self.hidden, self.inter, self.heads, self.kv_heads, self.head_dim = (
            len(layers), hidden, inter, H, KV, D)
        self.eps = float(eps)


def decode_layers(plan: DecodePlan, x, h, cos_q, sin_q, cos_k, sin_k, keys, values, bias):
    """All layers of a decode step in one call (no autograd): x [B, hidden] the first layer's
    normalised input and h [B, hidden] the residual stream, both updated in place (x to the final
    norm's output); rotary tables [B, D] (the queries' with the attention scale folded in); the
    cache ``keys`` / ``values`` [layers, B, KV, T, D] and ``bias`` [B, 1, 1, T] as in
    :func:`decode_attention`.  Returns the step's keys and values [layers, B, KV, 1, D]."""
    B = x.shape[0]
    L, KV, D = plan.layers, plan.kv_heads, plan.head_dim
    T = keys.shape[3] if keys.ndim == 5 else -1
    if (list(x.shape) != [B, plan.hidden] or list(h.shape) != [B, plan.hidden]
            or any(list(t.shape) != [B, D] for t in (cos_q, sin_q, cos_k, sin_k))
            or list(keys.shape) != [L, B, KV, T, D] or list(values.shape) != list(keys.shape)
            or math.prod(bias.shape) != B * T
            or not ready(x, h, cos_q, sin_q, cos_k, sin_k, keys, values, bias)
            or not all(t.is_contiguous() for t in (x, h, keys, values))):
        raise ValueError(f"decode_layers: x {x.shape}, h {h.shape}, tables {cos_q.shape}, cache {keys.shape} / "
                         f"{values.shape}, bias {bias.shape} for {L} layers of {plan.heads} x {D} heads "
                         f"({KV} kv), hidden {plan.hidden} (dense float32)")
    cos_q, sin_q, cos_k, sin_k, bias = (_dense(t) for t in (cos_q, sin_q, cos_k, sin_k, bias))
    new_keys = paddle.empty([L, B, KV, 1, D], dtype="float32")
    new_values = paddle.empty([L, B, KV, 1, D], dtype="float32")
    with cpu_gemm.team():
        status = _lib().ppk_decode_layers(plan.gemm, plan.kind, plan.addresses, L, x.data_ptr(), h.data_ptr(),
                                          cos_q.data_ptr(), sin_q.data_ptr(), cos_k.data_ptr(), sin_k.data_ptr(),
                                          keys.data_ptr(), values.data_ptr(), bias.data_ptr(), new_keys.data_ptr(),
                                          new_values.data_ptr(), B, plan.hidden, plan.heads, KV, D, plan.inter, T,
                                          plan.eps, _threads())
    if status == 1:
        raise MemoryError("decode layers: out of memory for the step's buffers")
    if status:
        raise RuntimeError("decode layers: the GEMM failed")
    return new_keys, new_values
