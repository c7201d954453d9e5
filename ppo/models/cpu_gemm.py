"""CPU matmuls through oneDNN's GEMM, the library paddle's own CPU wheel ships (``paddle/libs/libdnnl.so.3``).

paddle's CPU matmul (its bundled MKL) reaches about half to two thirds of a 2-core machine's fp32
rate and has no bfloat16 kernel; oneDNN's ``dnnl_sgemm`` reaches the machine's fp32 peak, and
``dnnl_gemm_bf16bf16f32`` (bf16 inputs, fp32 accumulation and output) runs on the AVX512-BF16 / AMX
units of CPUs that have them (``docs/performance.md``, ``benchmarks/gemm_rates.py``).  This module is
the toolkit's one place that calls them: a declared CPU adaptation, switched on at run time
(``cpu_gemm``: ``auto`` / ``onednn`` / ``paddle``), never on a GPU device.

What goes through it once :func:`activate` ran (CPU only):

* every ``paddle.nn.functional.linear`` call on float32 tensors: ``nn.Linear`` (projections, score
  heads), paddlenlp's LoRA linears (the base product; the rank-r adapters stay paddle's), and
  fleet's column / row parallel linears (:func:`install` points their ``linear`` at it);
* the LM heads of a model without tensor parallel (:func:`install`; under tensor parallel the head
  keeps paddlenlp's ``parallel_matmul``);
* the rollout decoder's projections and head (``ppo.rollout.inference`` calls :func:`matmul`);
  with the toolkit's kernels a decode step's layer products are called from their C instead, on
  the GEMM :func:`blas_gemm` finds (paddle's MKL, faster at so few rows); so are the
  attention's batched products (``cpu_kernels.attention_matmul``).

Each product runs forward and both backward products (``dx = dy W^T``, ``dW = x^T dy``) as one
``PyLayer``, so paddle's autograd, recompute and the optimizer see ordinary tensors; results equal
paddle's matmul within float32 rounding (``tests/test_cpu_gemm.py``).  With ``bf16`` (a CPU that
has bf16 units) the three products take bf16 inputs and accumulate in fp32; weights, gradients
and the optimizer stay fp32.  Where the library or a symbol is missing the matmuls stay paddle's
and :func:`activate` says so in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ppo.core.errors import UserError
from ppo.models import kernel_library

logger = logging.getLogger(__name__)

MODES = ("auto", "onednn", "paddle")
_ORIGINAL_LINEAR = F.linear


class _State:
    library = None  # ctypes handle of libdnnl, once loaded
    openmp = None  # its OpenMP runtime: the team size is set around each product
    reason = None  # why it could not be loaded
    active = False  # F.linear routed here
    bf16 = False  # products in bf16 with fp32 accumulation
    cache = None  # within frozen_weights: {id(parameter): (parameter, its bf16 copy)}
    threads = None
    kernels = None  # the toolkit's compiled CPU kernels (ppo.models.kernel_library), loaded and switched on
    kernels_library = None  # loaded once: (handle or None, why not)
    blas_gemm = None  # (address, kind) of the GEMM the kernels call, found once


STATE = _State()


def _library_path() -> str:
    return os.path.join(os.path.dirname(paddle.__file__), "libs", "libdnnl.so.3")


def load():
    """The oneDNN library (ctypes), or None with ``STATE.reason`` saying why."""
    if STATE.library is not None or STATE.reason is not None:
        return STATE.library
    path = _library_path()
    try:
        lib = ctypes.CDLL(path)
        dim, f32 = ctypes.c_int64, ctypes.c_float
        for name, pointer in (("dnnl_sgemm", ctypes.c_void_p), ("dnnl_gemm_bf16bf16f32", ctypes.c_void_p)):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_char, ctypes.c_char, dim, dim, dim, f32, pointer, dim, pointer, dim, f32,
                           ctypes.c_void_p, dim]
    except (OSError, AttributeError) as error:
        STATE.reason = f"oneDNN is not usable here ({path}: {error})"
        return None
    STATE.library = lib
    return lib


def cpu_flags() -> list[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; [] where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matmul units (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _openmp():
    """The OpenMP runtime libdnnl's parallel regions run on: paddle's ``libiomp5`` (loaded before
    libdnnl, it provides the GOMP entry points), else the system's libgomp; None if neither loads."""
    for path in (os.path.join(os.path.dirname(paddle.__file__), "libs", "libiomp5.so"), "libgomp.so.1"):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_get_max_threads.restype = ctypes.c_int
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def activate(mode: str = "auto", bf16: bool = False, threads: int | None = None) -> str | None:
    """Route the CPU matmuls through oneDNN (``mode`` auto / onednn) or leave them paddle's
    (``paddle``); ``bf16`` runs them in bf16 with fp32 accumulation.  Returns a notice line when the
    request cannot be met (no library, no bf16 units), else None.  A no-op on GPU devices."""
    if mode == "paddle" or not paddle.get_device().startswith("cpu"):
        deactivate()
        return None
    if load() is None:
        deactivate()
        return f"{STATE.reason}: matmuls stay paddle's, and so do the norms, rotary, SwiGLU, attention and the log-probs"
    if threads is None:  # as many as paddle's MKL: the toolkit's default is the process's share of the cores
        threads = max(1, int(os.environ.get("MKL_NUM_THREADS") or 1))
    # paddle runs its own OpenMP kernels on one thread; the products get ``threads`` for their duration only
    STATE.openmp, STATE.threads = _openmp(), threads
    notices = []
    if STATE.kernels_library is None:
        STATE.kernels_library = kernel_library.load(STATE.openmp)
    STATE.kernels, why_not = STATE.kernels_library
    if why_not:
        notices.append(f"{why_not}: norms, rotary, SwiGLU, attention and the log-probs run paddle's")
    if bf16 and not cpu_has_bf16():
        notices.append("bf16 requested but this CPU has no bf16 units (avx512_bf16 / amx_bf16): training in float32")
        bf16 = False
    STATE.active, STATE.bf16 = True, bool(bf16)
    F.linear = linear
    return "; ".join(notices) or None


def select(mode: str, bf16: bool = False) -> str | None:
    """:func:`activate` for a run's ``cpu_gemm`` argument: a UserError (one line) when ``onednn`` was
    asked for and cannot load; else the notice line to show, or None."""
    notice = activate(mode, bf16=bf16)
    if notice and mode == "onednn" and not STATE.active:
        raise UserError(f"'cpu_gemm' = 'onednn': {notice}; use auto or paddle")
    return notice


@contextlib.contextmanager
def frozen_weights():
    """Within it the parameters do not change (a rollout's decode steps): under bf16 each one is
    cast once and its copy reused by every step; the copies are dropped on exit.  No effect in fp32."""
    outer = STATE.cache
    if outer is None:
        STATE.cache = {}
    try:
        yield
    finally:
        if outer is None:
            STATE.cache = None


def _bf16_weight(w):
    """``w`` as a dense bf16 tensor: the copy made for it within :func:`frozen_weights` (a parameter
    there), else a fresh one."""
    if STATE.cache is None or not isinstance(w, paddle.base.framework.EagerParamBase):
        return _dense(w, True)
    entry = STATE.cache.get(id(w))
    if entry is None or entry[0] is not w:
        entry = STATE.cache[id(w)] = (w, _dense(w, True))
    return entry[1]


def deactivate() -> None:
    STATE.active, STATE.bf16, STATE.kernels = False, False, None
    F.linear = _ORIGINAL_LINEAR


def snapshot() -> tuple:
    """The process's matmul path now (routed, bf16, threads), for :func:`restore`."""
    return STATE.active, STATE.bf16, STATE.threads


def restore(state: tuple) -> None:
    """Put back the matmul path :func:`snapshot` saw: a run's choice (``cpu_gemm``, ``bf16``) ends
    with the run instead of carrying into whatever the process does next."""
    active, bf16, threads = state
    if (STATE.active, STATE.bf16, STATE.threads) == (active, bf16, threads):
        return
    if active:
        activate("onednn", bf16=bf16, threads=threads)
    else:
        deactivate()


@contextlib.contextmanager
def team():
    """Within it the OpenMP runtime's parallel regions (oneDNN's, the toolkit's kernels') use
    ``STATE.threads``; paddle's own setting is put back after."""
    omp = STATE.openmp
    before = omp.omp_get_max_threads() if omp is not None else None
    if omp is not None and before != STATE.threads:
        omp.omp_set_num_threads(STATE.threads)
    try:
        yield
    finally:
        if omp is not None and before != STATE.threads:
            omp.omp_set_num_threads(before)


def _gemm(a, b, trans_a: bool, trans_b: bool, m: int, n: int, k: int, bf16: bool):
    """C [m, n] float32 = op(a) @ op(b) (row-major; op transposes when asked); a, b dense CPU tensors."""
    out = paddle.empty([m, n], dtype="float32")
    lda = m if trans_a else k
    ldb = k if trans_b else n
    fn = STATE.library.dnnl_gemm_bf16bf16f32 if bf16 else STATE.library.dnnl_sgemm
    with team():
        status = fn(b"T" if trans_a else b"N", b"T" if trans_b else b"N", m, n, k, 1.0, a.data_ptr(), lda,
                    b.data_ptr(), ldb, 0.0, out.data_ptr(), n)
    if status != 0:
        raise RuntimeError(f"oneDNN gemm failed with status {status} (m={m}, n={n}, k={k})")
    return out


def blas_gemm():
    """``(address, kind)`` of the GEMM the toolkit's kernels call from their C (a decode step's
    layers, the attention's batched products): MKL's ``cblas_sgemm`` from paddle's wheel (kind 1;
    paddle's own CPU matmul, the faster one at a decode step's few rows, ``SMALL_ROWS``, and
    single-threaded inside the kernels' parallel regions), else oneDNN's ``dnnl_sgemm`` (kind 2);
    None where the path is off or in bf16."""
    if not STATE.active or STATE.bf16:
        return None
    if STATE.blas_gemm is None:
        path = os.path.join(os.path.dirname(paddle.__file__), "libs", "libmklml_intel.so")
        try:
            STATE.blas_gemm = (ctypes.cast(ctypes.CDLL(path).cblas_sgemm, ctypes.c_void_p).value, 1)
        except (OSError, AttributeError):
            STATE.blas_gemm = (ctypes.cast(STATE.library.dnnl_sgemm, ctypes.c_void_p).value, 2)
    return STATE.blas_gemm


def _dense(t, bf16: bool):
    t = t.astype("bfloat16") if bf16 else t
    return t if t.is_contiguous() else t.contiguous()


class _Product(PyLayer):
    """``x [M, K] @ w`` with ``w`` [K, N], or [N, K] when ``transpose_w``; float32 out."""

    @staticmethod
    def forward(ctx, x, w, transpose_w: bool, bf16: bool):
        ctx.transpose_w, ctx.bf16 = transpose_w, bf16
        ctx.needs = (not x.stop_gradient, not w.stop_gradient)
        xd, wd = _dense(x, bf16), _dense(w, bf16)
        ctx.save_for_backward(xd, wd)  # (bf16 copies under bf16: the backward products read them)
        m, k = x.shape
        n = w.shape[0] if transpose_w else w.shape[1]
        return _gemm(xd, wd, False, transpose_w, m, n, k, bf16)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensor()
        dy = _dense(dy, ctx.bf16)
        m, n = dy.shape
        k = x.shape[1]
        dx = dw = None
        if ctx.needs[0]:  # dx = dy @ w^T  (w [K, N])  or  dy @ w  (w [N, K])
            dx = _gemm(dy, w, False, not ctx.transpose_w, m, k, n, ctx.bf16)
        if ctx.needs[1]:  # dw = x^T @ dy  [K, N]  or  dy^T @ x  [N, K]
            dw = (_gemm(dy, x, True, False, n, k, m, ctx.bf16) if ctx.transpose_w
                  else _gemm(x, dy, True, False, k, n, m, ctx.bf16))
        return dx, dw


# Products of fewer rows than this (a decode step: one row per sequence) run paddle's matmul in
# float32 inference: there oneDNN's call costs more than it saves (16 x 512 x 1376: 224 against
# 185 us; 16 x 512 x 8000: 1003 against 967 us, measured on a 2-core AMD EPYC with AVX2)
SMALL_ROWS = 64


def _eligible(x, w) -> bool:
    # (a static graph, e.g. the to_static decode step, keeps paddle's matmul: its tensors hold no data yet)
    return (STATE.active and paddle.in_dynamic_mode() and w.ndim == 2 and x.ndim >= 1 and x.dtype == paddle.float32
            and w.dtype == paddle.float32 and x.place.is_cpu_place() and w.place.is_cpu_place())


def matmul(x, w, transpose_w: bool = False):
    """``x [..., K] @ w`` (``w`` [K, N], or [N, K] with ``transpose_w``) through oneDNN where active,
    else ``paddle.matmul``."""
    if not _eligible(x, w):
        return paddle.matmul(x, w, transpose_y=transpose_w)
    lead = list(x.shape[:-1])
    x2 = x.reshape([-1, x.shape[-1]])
    inference = (x.stop_gradient and w.stop_gradient) or not paddle.is_grad_enabled()
    if inference and not STATE.bf16 and x2.shape[0] < SMALL_ROWS:  # a decode step's rows: paddle's is faster
        return paddle.matmul(x, w, transpose_y=transpose_w)
    if inference:  # no autograd node
        n = w.shape[0] if transpose_w else w.shape[1]
        wd = _bf16_weight(w) if STATE.bf16 else _dense(w, False)
        y = _gemm(_dense(x2, STATE.bf16), wd, False, transpose_w, x2.shape[0], n, x2.shape[1], STATE.bf16)
    else:
        y = _Product.apply(x2, w, transpose_w, STATE.bf16)
    return y.reshape([*lead, y.shape[-1]])


def linear(x, weight, bias=None, name=None):
    """``paddle.nn.functional.linear`` (``x @ weight + bias``, weight [in, out]) through oneDNN where
    active and the inputs are float32 CPU tensors; anything else goes to paddle's own."""
    if not _eligible(x, weight) or (bias is not None and bias.dtype != paddle.float32):
        return _ORIGINAL_LINEAR(x, weight, bias, name=name)
    y = matmul(x, weight)
    return y if bias is None else y + bias


def _lm_head_forward(self, hidden_states, tensor_parallel_output=None):
    """A paddlenlp LM head (bound to it) without tensor or sequence parallel: ``hidden @ weight``."""
    if not _eligible(hidden_states, self.weight):
        return type(self).forward(self, hidden_states, tensor_parallel_output)
    return matmul(hidden_states, self.weight, transpose_w=bool(getattr(self, "transpose_y", False)))


def install(model):
    """Point ``model``'s fleet parallel linears and (without tensor parallel) its LM head at this
    module (instance attributes only); returns ``model``.  Plain ``nn.Linear`` layers need nothing:
    they call ``paddle.nn.functional.linear``, which :func:`activate` routes."""
    import types

    for layer in [model, *model.sublayers()]:
        if getattr(layer, "linear", None) is _ORIGINAL_LINEAR:  # fleet's Column / RowParallelLinear
            layer.linear = linear
        config = getattr(layer, "config", None)
        if (type(layer).__name__.endswith(("LMHead", "LMHeadPipe")) and hasattr(layer, "weight") and config is not None
                and getattr(config, "tensor_parallel_degree", 1) <= 1 and not getattr(config, "sequence_parallel", False)
                and "forward" not in vars(layer)):
            layer.forward = types.MethodType(_lm_head_forward, layer)
    return model
