"""Measurements shared by the benchmark scripts (imported as ``_common``: a script's folder is on
``sys.path`` when it runs)."""

import statistics
import time


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (Linux): ``VmRSS``, ``VmHWM``, ... (0 when absent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    """This process's fp32 matmul rate: median of ``repeats`` timed n x n ``paddle.matmul``."""
    import paddle

    a, b = paddle.randn([n, n], dtype="float32"), paddle.randn([n, n], dtype="float32")
    paddle.matmul(a, b).numpy()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        paddle.matmul(a, b).numpy()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9
