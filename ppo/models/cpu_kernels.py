"""RMSNorm, rotary embedding, SwiGLU, attention and the token log-probs on CPU through the toolkit's
compiled kernels (``_cpu_kernels.c``): the training forms with their backward, and inference's
residual add with the norm; the rollout's own forms (a decode step's attention over the KV cache,
the cache writes, a whole decode step's layers in one call) are in ``ppo.models.decode_kernels``.

paddle runs these on one thread, as several elementwise ops with an autograd node each (profiled in
``docs/performance.md``: in an actor update the norm's and rotary's multiplies and their gradients
took as long as the matmuls' backward).  Each is one pass here, forward and backward, on the
threads the matmuls use (``cpu_gemm.STATE.threads``), as a ``PyLayer`` so autograd, recompute
and LoRA see ordinary tensors.  Results equal paddle's ops within float32 rounding and do not
depend on the number of threads (``tests/test_cpu_kernels.py``).

They are a declared CPU adaptation of the same switch as the matmuls: on while ``cpu_gemm`` is
(``auto`` / ``onednn``; ``cpu_gemm.activate`` loads them through ``ppo.models.kernel_library``),
off with ``cpu_gemm: paddle``, never on a GPU device, never in a static graph, never for other
dtypes.  Where the library was not built
(``pip install`` compiles it from the C file; a machine without a C compiler skips it) the run
says so in one line and paddle's ops run.
"""

from __future__ import annotations

import math

import paddle
from paddle.autograd import PyLayer

from ppo.models import cpu_gemm


def ready(*tensors) -> bool:
    """Whether the kernels take these tensors: loaded and switched on, dynamic mode, float32 on CPU."""
    return (cpu_gemm.STATE.kernels is not None and paddle.in_dynamic_mode()
            and all(t.dtype == paddle.float32 and t.place.is_cpu_place() for t in tensors))


def _lib():
    return cpu_gemm.STATE.kernels


def _threads() -> int:
    return cpu_gemm.STATE.threads or 1


def _dense(t):
    return t if t.is_contiguous() else t.contiguous()


class RMSNorm(PyLayer):
    """``x * rsqrt(mean(x^2, -1) + eps) * weight``, x [..., H] and weight [H] float32."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x, weight = _dense(x), _dense(weight)
        rows = math.prod(x.shape[:-1])
        rstd = paddle.empty([max(rows, 1)], dtype="float32")
        y = _rms_norm(x, weight, eps, rstd)
        ctx.save_for_backward(x, weight, rstd)
        ctx.rows = rows
        # paddle wants None for the gradient of an input that does not need one (a frozen weight)
        ctx.needs = (not x.stop_gradient, not weight.stop_gradient)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensor()
        grad = _dense(grad)
        dx = paddle.empty_like(x) if ctx.needs[0] else None
        dw = paddle.empty_like(weight) if ctx.needs[1] else None
        status = _lib().ppk_rms_norm_backward(grad.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
                                              dx.data_ptr() if dx is not None else None,
                                              dw.data_ptr() if dw is not None else None,
                                              ctx.rows, x.shape[-1], _threads())
        if status:
            raise MemoryError("RMSNorm backward: out of memory for the weight gradient's partial sums")
        return dx, dw


def _norm_width(x, weight) -> int:
    """H of a norm over x [..., H] with weight [H] (a ValueError for any other weight shape)."""
    if list(weight.shape) != [x.shape[-1]]:
        raise ValueError(f"RMSNorm: weight of shape {weight.shape} for inputs of shape {x.shape}")
    return x.shape[-1]


def _rms_norm(x, weight, eps: float, rstd=None):
    """RMSNorm of dense float32 ``x`` [..., H]; each row's rsqrt into ``rstd`` when given."""
    y = paddle.empty_like(x)
    _lib().ppk_rms_norm_forward(x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                                None if rstd is None else rstd.data_ptr(), math.prod(x.shape[:-1]),
                                _norm_width(x, weight), float(eps), _threads())
    return y


def rms_norm_forward(x, weight, eps: float):
    """RMSNorm of float32 ``x`` [..., H] without autograd (inference)."""
    return _rms_norm(_dense(x), _dense(weight), eps)


def add_rms_norm_forward(x, residual, weight, eps: float):
    """``(RMSNorm(x + residual), x + residual)`` in one pass, without autograd (inference)."""
    x, residual, weight = _dense(x), _dense(residual), _dense(weight)
    _norm_width(x, weight)
    if residual.shape != x.shape:
        raise ValueError(f"RMSNorm: residual of shape {residual.shape} for inputs of shape {x.shape}")
    y, total = paddle.empty_like(x), paddle.empty_like(x)
    _lib().ppk_add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), y.data_ptr(), total.data_ptr(),
                            math.prod(x.shape[:-1]), x.shape[-1], float(eps), _threads())
    return y, total


def _rope(x, cos, sin, time_axis: int, backward: bool, transpose_out: bool = False):
    """One rotary pass over x [B, A1, A2, D] with tables [1 or B, T, D] (see ``ppk_rope``); with
    ``transpose_out`` the result is [B, A2, A1, D]."""
    B, A1, A2, D = x.shape
    T = A1 if time_axis == 1 else A2
    for table in (cos, sin):  # (the kernel reads [batches, T, D] of each)
        if table.ndim != 3 or table.shape[0] not in (1, B) or list(table.shape[1:]) != [T, D] or D % 2:
            raise ValueError(f"rotary: tables of shape {table.shape} for inputs of shape {x.shape}")
    if list(sin.shape) != list(cos.shape):
        raise ValueError(f"rotary: sin of shape {sin.shape} against cos of shape {cos.shape}")
    y = paddle.empty([B, A2, A1, D] if transpose_out else [B, A1, A2, D], dtype=x.dtype)
    _lib().ppk_rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), y.data_ptr(), B, A1, A2, D, time_axis,
                    cos.shape[0], int(backward), int(transpose_out), _threads())
    return y


_INT32 = 2 ** 31  # MKL's cblas_sgemm takes 32-bit sizes and leading dimensions


def _matrices(t):
    """``t`` (or its dense copy) with (stride of dim 0, stride of dim 1, row stride): a 4-D tensor read
    as [d0, d1] matrices of [d2, d3] with contiguous rows, a transposed view as it is.  (paddle's
    ``contiguous()`` makes a view dense in place: it stops sharing its base's memory.)"""
    s = t.strides
    if s[3] != 1 or s[2] < t.shape[3]:
        t = t.contiguous()
        s = t.strides
    return t, s[0], s[1], s[2]


def _batched(a, trans_a: bool, b, trans_b: bool, heads_last: bool = False):
    """op(a) @ op(b) per [d0, d1] item of 4-D float32 tensors (op transposes the last two axes where
    asked), returned [d0, d1, M, N], or [d0, M, d1, N] with ``heads_last``."""
    B, H = a.shape[:2]
    M, K = (a.shape[3], a.shape[2]) if trans_a else (a.shape[2], a.shape[3])
    N = b.shape[2] if trans_b else b.shape[3]
    gemm, kind = cpu_gemm.blas_gemm()
    a, sa0, sa1, lda = _matrices(a)
    b, sb0, sb1, ldb = _matrices(b)
    if heads_last:
        out = paddle.empty([B, M, H, N], dtype="float32")
        sc0, sc1, ldc = M * H * N, N, H * N
    else:
        out = paddle.empty([B, H, M, N], dtype="float32")
        sc0, sc1, ldc = H * M * N, M * N, N
    with cpu_gemm.team():
        status = _lib().ppk_batched_gemm(gemm, kind, B, H, a.data_ptr(), sa0, sa1, lda, int(trans_a), b.data_ptr(),
                                         sb0, sb1, ldb, int(trans_b), out.data_ptr(), sc0, sc1, ldc, M, N, K,
                                         _threads())
    if status:
        raise RuntimeError(f"attention product: the GEMM failed ({list(a.shape)} x {list(b.shape)})")
    return out


class AttentionProduct(PyLayer):
    """``a @ b`` (``b`` transposed on its last two axes with ``transpose_b``) per [B, H] item, the
    attention's products; with ``heads_last`` the result is [B, M, H, N]."""

    @staticmethod
    def forward(ctx, a, b, transpose_b: bool, heads_last: bool):
        # saved dense: views saved as they are came back wrong under paddle's non-reentrant recompute
        # (its saved-tensor hooks), which paddlenlp's recompute uses by default
        ctx.save_for_backward(_dense(a), _dense(b))
        ctx.transpose_b, ctx.heads_last = transpose_b, heads_last
        ctx.needs = (not a.stop_gradient, not b.stop_gradient)
        return _batched(a, False, b, transpose_b, heads_last)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensor()
        if ctx.heads_last:  # [B, M, H, N] read as [B, H, M, N] (a view: no copy)
            grad = grad.transpose([0, 2, 1, 3])
        da = db = None
        if ctx.needs[0]:  # da = grad @ op(b)^T
            da = _batched(grad, False, b, not ctx.transpose_b)
        if ctx.needs[1]:  # db = grad^T @ a  (b [N, K]),  or  a^T @ grad  (b [K, N])
            db = _batched(grad, True, a, False) if ctx.transpose_b else _batched(a, True, grad, False)
        return da, db


def attention_matmul_ready(a, b, transpose_b: bool = False) -> bool:
    """Whether :func:`attention_matmul` takes these: 4-D float32 CPU tensors, the same [B, H], inner
    sizes that agree, no empty axis, and a GEMM to call."""
    if not (a.ndim == 4 and b.ndim == 4 and ready(a, b) and list(a.shape[:2]) == list(b.shape[:2])):
        return False
    inner = b.shape[3] if transpose_b else b.shape[2]
    strides = [s for t in (a, b) for s in t.strides]
    return (a.shape[3] == inner and min(*a.shape, *b.shape) > 0 and cpu_gemm.blas_gemm() is not None
            and max(*a.shape, *b.shape, *strides, a.shape[1] * b.shape[2 if transpose_b else 3]) < _INT32)


def attention_matmul(a, b, transpose_b: bool = False, heads_last: bool = False):
    """``paddle.matmul(a, b, transpose_y=transpose_b)`` of a [B, H, M, K] and b [B, H, K, N] (or [B, H,
    N, K]) through the kernels where they take them (:func:`attention_matmul_ready`): each item's
    product one GEMM call, the items split over the threads, transposed views read in place; with
    ``heads_last`` the result comes [B, M, H, N] (the attention's output before its heads are merged),
    a transposed view where paddle's matmul ran."""
    if not attention_matmul_ready(a, b, transpose_b):
        y = paddle.matmul(a, b, transpose_y=transpose_b)
        return y.transpose([0, 2, 1, 3]) if heads_last else y
    if (a.stop_gradient and b.stop_gradient) or not paddle.is_grad_enabled():
        return _batched(a, False, b, transpose_b, heads_last)
    return AttentionProduct.apply(a, b, transpose_b, heads_last)


class TokenLogProbs(PyLayer):
    """``log_softmax(logits inv_t)[label]`` per row of logits [..., V] (differentiable) and the
    softmax's entropy (a statistic, no gradient), from two passes over each row; the backward
    recomputes the exponentials instead of keeping paddle's [..., V] softmax."""

    @staticmethod
    def forward(ctx, logits, labels, inv_t: float):
        log_probs, lse, entropy = _token_log_probs(logits, labels, inv_t, True)
        ctx.save_for_backward(logits, labels, lse)
        ctx.inv_t = inv_t
        ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad, _entropy_grad=None):
        logits, labels, lse = ctx.saved_tensor()
        grad = _dense(grad.astype("float32"))
        out = paddle.empty_like(logits)
        V = logits.shape[-1]
        if _lib().ppk_token_log_probs_grad(logits.data_ptr(), labels.data_ptr(), grad.data_ptr(), lse.data_ptr(),
                                           out.data_ptr(), math.prod(logits.shape[:-1]), V, ctx.inv_t, _threads()):
            raise RuntimeError("token log-probs: labels or temperature changed after the forward")
        return out, None


def _token_log_probs(logits, labels, inv_t: float, with_entropy: bool):
    lead = logits.shape[:-1]
    log_probs, lse = paddle.empty(lead, "float32"), paddle.empty(lead, "float32")
    entropy = paddle.empty(lead, "float32") if with_entropy else None
    if _lib().ppk_token_log_probs(logits.data_ptr(), labels.data_ptr(), log_probs.data_ptr(), lse.data_ptr(),
                                  entropy.data_ptr() if with_entropy else None, math.prod(lead), logits.shape[-1],
                                  inv_t, _threads()):
        raise ValueError(f"token log-probs: a label outside [0, {logits.shape[-1]}) or temperature {1 / inv_t}")
    return log_probs, lse, entropy


def token_log_probs(logits, labels, temperature: float = 1.0, with_entropy: bool = False):
    """(``log_softmax(logits / temperature)[..., label]`` [...], the entropy of that softmax [...]
    or None) for dense float32 CPU logits [..., V] and int64 labels [...]: the log-probs with
    autograd when the logits need it, the entropy always detached.  Two passes over the logits
    (paddle's softmax cross-entropy took 130 ms forward and 190 ms with its backward on [2560,
    8000], kept the [..., V] softmax for the backward, and the entropy a third pass).  None where
    the kernels do not take them: other dtypes or places, views, labels outside the vocabulary or a
    temperature outside [1e-30, 1e30] (paddle's ops then say what is wrong)."""
    temperature = float(temperature)
    if not (ready(logits) and logits.is_contiguous() and logits.ndim >= 1 and labels.dtype == paddle.int64
            and list(labels.shape) == list(logits.shape[:-1]) and labels.place.is_cpu_place()
            and 1e-30 <= temperature <= 1e30):  # (1 / temperature a normal float32)
        return None
    V = logits.shape[-1]
    labels = _dense(labels)
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= V):
        return None
    inv_t = 1.0 / temperature
    if logits.stop_gradient or not paddle.is_grad_enabled():
        log_probs, _, entropy = _token_log_probs(logits, labels, inv_t, with_entropy)
        return log_probs, entropy
    log_probs, entropy = TokenLogProbs.apply(logits, labels, inv_t)
    return log_probs, (entropy if with_entropy else None)


def _softmax_bias(scores, bias, scale: float):
    B, H, S, L = scores.shape
    out = paddle.empty_like(scores)
    _lib().ppk_softmax_bias(scores.data_ptr(), bias.data_ptr(), out.data_ptr(), B, H, S, L, bias.shape[1], scale,
                            _threads())
    return out


def softmax_bias_ready(scores, bias, length: int | None = None) -> bool:
    """Whether :func:`softmax_bias` takes scores [B, H, S, L] and bias [B, 1 or H, S, L]; with
    ``length`` the first argument is the queries [B, H, S, D] of scores [B, H, S, length]."""
    shape = list(scores.shape) if length is None else [*scores.shape[:-1], length]
    return (len(shape) == 4 and bias.ndim == 4 and ready(scores, bias) and bias.shape[0] == shape[0]
            and bias.shape[1] in (1, shape[1]) and list(bias.shape[2:]) == shape[2:])


class SoftmaxBias(PyLayer):
    """``softmax(scores * scale + bias, -1)``: attention probabilities, the bias a constant mask."""

    @staticmethod
    def forward(ctx, scores, bias, scale: float):
        probs = _softmax_bias(_dense(scores), _dense(bias), scale)
        ctx.scale = scale
        # (detached: the output itself would hold its own gradient node, a cycle that leaks it
        # whenever no backward runs)
        ctx.save_for_backward(probs.detach())
        return probs

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensor()
        grad = _dense(grad)
        out = paddle.empty_like(probs)
        L = probs.shape[-1]
        _lib().ppk_softmax_grad(probs.data_ptr(), grad.data_ptr(), out.data_ptr(), math.prod(probs.shape) // L, L,
                                ctx.scale, _threads())
        return out, None


def softmax_bias(scores, bias, scale: float = 1.0):
    """``softmax(scores * scale + bias, -1)`` for scores [B, H, S, L] and a constant bias [B, 1 or H,
    S, L] (:func:`softmax_bias_ready`), with autograd when the scores need it.  ``scale``: the
    attention's 1 / sqrt(head_dim), so the queries need no multiply of their own."""
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_bias: scale {scale} (needs a finite number)")
    if scores.stop_gradient or not paddle.is_grad_enabled():
        return _softmax_bias(_dense(scores), _dense(bias), scale)
    return SoftmaxBias.apply(scores, bias, scale)


class Rotary(PyLayer):
    """``(q cos + rotate_half(q) sin, k cos + rotate_half(k) sin)`` with ``rotate_half(x) = [-x2, x1]``
    (the halves of the head); q, k [B, A1, A2, D] with the time axis at ``time_axis`` (1 or 2),
    cos and sin [1 or B, T, D] constants."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, time_axis: int):
        q, k = _dense(q), _dense(k)
        ctx.save_for_backward(cos, sin)
        ctx.time_axis = time_axis
        ctx.needs = (not q.stop_gradient, not k.stop_gradient)
        return _rope(q, cos, sin, time_axis, False), _rope(k, cos, sin, time_axis, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensor()
        return (_rope(_dense(dq), cos, sin, ctx.time_axis, True) if ctx.needs[0] else None,
                _rope(_dense(dk), cos, sin, ctx.time_axis, True) if ctx.needs[1] else None)


def rotary_tables(q, k, cos, sin, position_ids):
    """paddlenlp's rotary tables as ``(cos, sin, time_axis)`` for :class:`Rotary`, or None for a form
    it does not take.  LLaMA / Qwen2: q [B, S, heads, D], tables [1, max, 1, D]; Mistral: q [B, heads,
    S, D], tables [max, D]; ``position_ids`` [B, S] (or None: positions 0..S-1)."""
    if sin.shape != cos.shape or q.ndim != 4 or k.ndim != 4:
        return None
    if cos.ndim == 4 and cos.shape[0] == 1 and cos.shape[2] == 1:
        time_axis, table, table_sin = 1, cos.reshape([cos.shape[1], cos.shape[3]]), sin.reshape([sin.shape[1], sin.shape[3]])
    elif cos.ndim == 2 and position_ids is not None:
        time_axis, table, table_sin = 2, cos, sin
    else:
        return None
    S, D = q.shape[time_axis], q.shape[-1]
    if k.shape[0] != q.shape[0] or k.shape[time_axis] != S or k.shape[-1] != D:
        return None
    if D % 2 or table.shape[-1] != D or cos.stop_gradient is False or sin.stop_gradient is False:
        return None
    if position_ids is None:
        if table.shape[0] < S:
            return None
        return _dense(table[:S]).unsqueeze(0), _dense(table_sin[:S]).unsqueeze(0), time_axis
    if position_ids.ndim != 2 or position_ids.shape[1] != S or position_ids.shape[0] not in (1, q.shape[0]):
        return None  # (paddlenlp's own ops then say what does not broadcast)
    flat = position_ids.reshape([-1])
    B = position_ids.shape[0]
    return (paddle.index_select(table, flat).reshape([B, S, D]), paddle.index_select(table_sin, flat).reshape([B, S, D]),
            time_axis)


class SwiGLU(PyLayer):
    """``silu(gate) * up`` for float32 tensors of one shape."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = _dense(gate), _dense(up)
        out = swiglu_forward(gate, up)
        ctx.save_for_backward(gate, up)
        ctx.needs = (not gate.stop_gradient, not up.stop_gradient)
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensor()
        grad = _dense(grad)
        dgate, dup = paddle.empty_like(gate), paddle.empty_like(up)
        _lib().ppk_swiglu_backward(gate.data_ptr(), up.data_ptr(), grad.data_ptr(), dgate.data_ptr(), dup.data_ptr(),
                                   math.prod(gate.shape), _threads())
        return dgate if ctx.needs[0] else None, dup if ctx.needs[1] else None


def swiglu_forward(gate, up):
    """``silu(gate) * up`` without autograd (inference: neither needs a gradient, or no grad mode)."""
    gate, up = _dense(gate), _dense(up)
    out = paddle.empty_like(gate)
    _lib().ppk_swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), math.prod(gate.shape), _threads())
    return out


# the order of a layer's tensors in ppk_decode_layers (its DW_* names): q, k, v, o, gate, up, down
# projections, the post-attention norm, the norm after the layer, the per-head q / k norms or None
