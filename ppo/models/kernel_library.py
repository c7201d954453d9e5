"""Loading the toolkit's compiled CPU kernels (``_cpu_kernels.c``, built by ``pip install``) with ctypes.

The one place that knows the library's file, its entry points' signatures and its version; the
wrappers around them live in ``ppo.models.cpu_kernels``, and ``ppo.models.cpu_gemm`` loads the
library when it switches the CPU path on.  No toolkit imports: the lowest layer.
"""

from __future__ import annotations

import ctypes
import importlib.util

_LIBRARY_MODULE = "ppo.models._cpu_kernels"
VERSION = 5  # ppk_version() of the C file these wrappers call (bumped with every change of an entry point)
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "ppk_init": (None, [_P, _P, _P]),
    "ppk_version": (ctypes.c_int, []),
    "ppk_rms_norm_forward": (None, [_P, _P, _P, _P, _I64, _I64, ctypes.c_float, ctypes.c_int]),
    "ppk_rms_norm_backward": (ctypes.c_int, [_P, _P, _P, _P, _P, _P, _I64, _I64, ctypes.c_int]),
    "ppk_add_rms_norm": (None, [_P, _P, _P, _P, _P, _I64, _I64, ctypes.c_float, ctypes.c_int]),
    "ppk_rope": (None, [_P, _P, _P, _P, _I64, _I64, _I64, _I64, ctypes.c_int, _I64, ctypes.c_int, ctypes.c_int,
                        ctypes.c_int]),
    "ppk_softmax_bias": (None, [_P, _P, _P, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int]),
    "ppk_softmax_grad": (None, [_P, _P, _P, _I64, _I64, ctypes.c_float, ctypes.c_int]),
    "ppk_cache_write": (None, [_P, _P, _I64, _I64, _I64, _I64, _I64]),
    "ppk_token_log_probs": (ctypes.c_int, [_P, _P, _P, _P, _P, _I64, _I64, ctypes.c_float, ctypes.c_int]),
    "ppk_token_log_probs_grad": (ctypes.c_int, [_P, _P, _P, _P, _P, _I64, _I64, ctypes.c_float, ctypes.c_int]),
    "ppk_decode_attention": (ctypes.c_int, [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, ctypes.c_int]),
    "ppk_swiglu_forward": (None, [_P, _P, _P, _I64, ctypes.c_int]),
    "ppk_swiglu_backward": (None, [_P, _P, _P, _P, _P, _I64, ctypes.c_int]),
    "ppk_batched_gemm": (ctypes.c_int, [_P, ctypes.c_int, _I64, _I64, _P, _I64, _I64, _I64, ctypes.c_int, _P, _I64,
                                        _I64, _I64, ctypes.c_int, _P, _I64, _I64, _I64, _I64, _I64, _I64,
                                        ctypes.c_int]),
    "ppk_decode_layers": (ctypes.c_int, [_P, ctypes.c_int, _P, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                                         _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int]),
}


def load(openmp=None):
    """The compiled kernels (a ctypes handle, given ``openmp``'s GOMP_parallel so they share the
    matmuls' thread team), or ``(None, reason)`` when the library is not there or not loadable."""
    try:
        spec = importlib.util.find_spec(_LIBRARY_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return None, "the toolkit's CPU kernels were not built (pip install compiles ppo/models/_cpu_kernels.c)"
    rebuild = "run the set-up's pip install again"
    try:
        lib = ctypes.CDLL(spec.origin)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as error:  # (the error names the file)
        return None, f"the toolkit's CPU kernels are not usable ({error}; {rebuild})"
    if lib.ppk_version() != VERSION:
        return None, (f"the toolkit's CPU kernels in {spec.origin} were built from another version "
                      f"({lib.ppk_version()}, these need {VERSION}; {rebuild})")
    if openmp is not None:
        try:
            entries = [ctypes.cast(getattr(openmp, name), _P).value
                       for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")]
        except AttributeError:  # a runtime without the GOMP entry point: the kernels run on one thread
            entries = [None, None, None]
        lib.ppk_init(*entries)
    return lib, None
