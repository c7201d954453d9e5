"""Score normalisers whose statistics travel with the score model's config.

Pure state objects on numpy: the trainer gathers scores across ranks before calling ``update``,
so every rank holds identical statistics.
"""

from __future__ import annotations

import numpy as np

NORMALIZER_TYPES = ("RunningMeanStd", "ExponentialMovingAverage", "none")


class Normalizer:
    """mean/var/count of the scores seen so far; ``normalize(x) = (x - mean) / sqrt(var + eps)``."""

    def __init__(self, kind: str = "RunningMeanStd", momentum: float = 0.9, mean: float = 0.0,
                 var: float = 1.0, count: int = 0, eps: float = 1e-6):
        if kind not in NORMALIZER_TYPES:
            raise ValueError(f"normalizer type must be one of {NORMALIZER_TYPES}, got {kind!r}")
        self.kind, self.momentum, self.eps = kind, float(momentum), float(eps)
        self.mean, self.var, self.count = float(mean), float(var), int(count)

    def update(self, values) -> None:
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if x.size == 0 or self.kind == "none":
            return
        batch_mean, batch_var, n = float(x.mean()), float(x.var()), int(x.size)
        if self.kind == "RunningMeanStd":
            # Chan et al. parallel merge of (mean, population var, count)
            total = self.count + n
            delta = batch_mean - self.mean
            m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
            self.mean = self.mean + delta * n / total
            self.var = m2 / total
        elif self.count == 0:
            self.mean, self.var = batch_mean, batch_var
        else:
            m = self.momentum
            self.mean = m * self.mean + (1 - m) * batch_mean
            self.var = m * self.var + (1 - m) * batch_var
        self.count += n

    def normalize(self, scores):
        if self.kind == "none":
            return scores
        return (scores - self.mean) / float(np.sqrt(self.var + self.eps))

    def to_config(self) -> dict:
        return {"normalizer_type": self.kind, "normalizer_momentum": self.momentum,
                "norm_mean": self.mean, "norm_var": self.var, "norm_count": self.count}

    @classmethod
    def from_config(cls, config) -> "Normalizer":
        get = (config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d))
        return cls(get("normalizer_type", "none") or "none", get("normalizer_momentum", 0.9),
                   get("norm_mean", 0.0), get("norm_var", 1.0), get("norm_count", 0))
