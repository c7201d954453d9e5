"""Measurements shared by the benchmark scripts (imported as ``_common``: a script's folder is on
``sys.path`` when it runs)."""

import os
import statistics
import time

# MKL_NUM_THREADS as the user set it, read before this script imports ``ppo`` (which sets its
# default): worker processes get this, so each checkout's ``ppo`` picks its own default (a reference
# from before that default runs paddle's single MKL thread)
USER_MKL_THREADS = os.environ.get("MKL_NUM_THREADS")


def worker_env(code_root: str) -> dict:
    """The environment of a worker process that imports ``ppo`` from ``code_root``."""
    env = dict(os.environ)
    if USER_MKL_THREADS is None:
        env.pop("MKL_NUM_THREADS", None)
    else:
        env["MKL_NUM_THREADS"] = USER_MKL_THREADS
    env.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    env["PYTHONPATH"] = code_root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def mkl_threads() -> str:
    """This process's MKL thread setting (after ``import ppo``)."""
    return os.environ.get("MKL_NUM_THREADS") or "unset (paddle runs 1)"


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), or 'unknown'."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (Linux): ``VmRSS``, ``VmHWM``, ... (0 when absent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    """This process's fp32 matmul rate: median of ``repeats`` timed n x n products on the path its
    models use: the oneDNN path (``ppo.models.cpu_gemm``) where this checkout has it switched on,
    else ``paddle.matmul``."""
    import paddle

    try:
        from ppo.models import cpu_gemm
        product = cpu_gemm.matmul  # paddle.matmul unless the path is active
    except ImportError:  # a checkout without it
        product = paddle.matmul
    a, b = paddle.randn([n, n], dtype="float32"), paddle.randn([n, n], dtype="float32")
    product(a, b).numpy()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        product(a, b).numpy()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9
