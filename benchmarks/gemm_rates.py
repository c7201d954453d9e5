"""GEMM rates on this CPU: paddle's matmul against the oneDNN path (``ppo.models.cpu_gemm``), fp32
and bf16, on one thread and on the process's share of the cores, beside the machine's fp32 peak.

Shapes (M x K x N): 2048^3, and the 33.5M benchmark model's products on 2,048 tokens (the MLP's
512 -> 1376 and 1376 -> 512, an attention projection 512 -> 512, the LM head 512 -> 8000), each
forward and, for the update, the two backward products (``dx = dy W^T``, ``dW = x^T dy``) through
autograd.  Each rate is the median of ``--repeats`` timed calls after warm-ups; every path is
checked against numpy's product of the same inputs (bf16: of the same bf16-rounded inputs).
The fp32 peak is cores x FMA units x lanes x 2 x base clock, from ``--ghz`` and the CPU's
vector width (AVX-512: 16 lanes, else 8; 2 FMA units).

Each thread setting runs in its own worker process (MKL reads its thread count when it loads).

    python benchmarks/gemm_rates.py [--repeats 10] [--ghz 2.6]

Prints one JSON object on stdout.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import cpu_name, worker_env  # noqa: E402

SHAPES = {"2048^3": (2048, 2048, 2048), "mlp_up 2048x512x1376": (2048, 512, 1376),
          "mlp_down 2048x1376x512": (2048, 1376, 512), "attn 2048x512x512": (2048, 512, 512),
          "lm_head 2048x512x8000": (2048, 512, 8000)}


def _median_seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(repeats: int) -> dict:
    import numpy as np
    import paddle

    from ppo.models import cpu_gemm

    notice = cpu_gemm.activate("onednn")
    rng = np.random.default_rng(0)
    out = {"notice": notice, "onednn_threads": cpu_gemm.STATE.threads, "forward": {}, "update": {}}
    for name, (m, k, n) in SHAPES.items():
        a_np, b_np = rng.normal(size=(m, k)).astype("float32"), rng.normal(size=(k, n)).astype("float32")
        a, b = paddle.to_tensor(a_np), paddle.to_tensor(b_np)
        ref = a_np @ b_np
        bf = lambda t: t.astype("bfloat16").astype("float32").numpy()  # noqa: E731
        ref_bf = bf(a) @ bf(b)
        row = {}
        for path, call, expected in (
                ("paddle", lambda: paddle.matmul(a, b), ref),
                ("onednn_fp32", lambda: cpu_gemm.matmul(a, b), ref),
                ("onednn_bf16", lambda: cpu_gemm.matmul(a, b), ref_bf)):
            if path == "onednn_bf16" and not cpu_gemm.cpu_has_bf16():
                continue
            cpu_gemm.STATE.bf16 = path == "onednn_bf16"
            got = call().numpy()
            error = float(np.abs(got - expected).max() / np.abs(expected).max())
            seconds = _median_seconds(lambda: call().numpy(), repeats)
            row[path] = {"gflops": round(2 * m * k * n / seconds / 1e9, 1), "rel_error": float(f"{error:.2g}")}
        out["forward"][name] = row
        if name == "2048^3":
            continue
        # forward + both backward products through autograd (3x the forward's work)
        x = paddle.to_tensor(a_np, stop_gradient=False)
        w = paddle.to_tensor(b_np, stop_gradient=False)
        row = {}
        for path in ("paddle", "onednn_fp32", "onednn_bf16"):
            if path == "onednn_bf16" and not cpu_gemm.cpu_has_bf16():
                continue
            cpu_gemm.STATE.bf16 = path == "onednn_bf16"

            def step():
                y = paddle.matmul(x, w) if path == "paddle" else cpu_gemm.matmul(x, w)
                y.backward(paddle.ones_like(y))
                x.clear_gradient(), w.clear_gradient()

            seconds = _median_seconds(step, max(3, repeats // 2))
            row[path] = {"gflops": round(6 * m * k * n / seconds / 1e9, 1)}
        out["update"][name] = row
    cpu_gemm.deactivate()
    return out


def peak_gflops(ghz: float, cores: int) -> float:
    from ppo.models.cpu_gemm import cpu_flags

    lanes = 16 if "avx512f" in cpu_flags() else 8
    return round(cores * 2 * lanes * 2 * ghz, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ghz", type=float, default=2.6, help="base clock for the fp32 peak")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.repeats)))
        return
    cores = len(os.sched_getaffinity(0))
    result = {"cpu": cpu_name(), "cores": cores, "fp32_peak_gflops": peak_gflops(args.ghz, cores),
              "ghz_assumed": args.ghz, "load_average_before": os.getloadavg()[0], "threads": {}}
    for threads in (1, cores):
        env = worker_env(ROOT)
        env["MKL_NUM_THREADS"] = str(threads)
        proc = subprocess.run([sys.executable, __file__, "--worker", "--repeats", str(args.repeats)], env=env,
                              capture_output=True, text=True, check=True)
        result["threads"][str(threads)] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
