"""PaddlePaddle-native RLHF: supervised fine-tuning, reward modelling and PPO."""

import logging
import os

# The MKL bundled with the paddle CPU wheel takes a slow generic path on AMD processors unless
# this is set before paddle loads it (3x faster matmuls measured; no effect on Intel or GPU).
os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


def _mkl_threads() -> str:
    """This process's share of the cores: the cores it may run on over the launcher's ranks on
    this machine (``PADDLE_LOCAL_SIZE``), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("PADDLE_LOCAL_SIZE") or 1)
    return str(max(1, cores // max(local_ranks, 1)))


# Without it paddle's CPU matmuls run on one MKL thread: on 2 cores a 2048^2 fp32 matmul measured
# 92 GFLOP/s on one thread and 168 on two, a decode step's 16-row matmuls 13.1 against 7.8 ms
# (benchmarks/rollout_speed.py).  OMP_NUM_THREADS is left alone: paddle's own kernels slowed down.
os.environ.setdefault("MKL_NUM_THREADS", _mkl_threads())

# paddlenlp sets the root logger to INFO before it imports ``datasets``, whose library logger is still
# unset then: its import-time notes ("PyTorch version ... available" where torch is installed) would
# reach every console.  Its warnings still do.
logging.getLogger("datasets").setLevel(logging.WARNING)

__version__ = "0.1.0"
