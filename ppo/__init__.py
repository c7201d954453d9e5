"""PaddlePaddle-native RLHF: supervised fine-tuning, reward modelling and PPO."""

import os

# The MKL bundled with the paddle CPU wheel takes a slow generic path on AMD processors unless
# this is set before paddle loads it (3x faster matmuls measured; no effect on Intel or GPU).
os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

__version__ = "0.1.0"
