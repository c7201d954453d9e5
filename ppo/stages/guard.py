"""The numeric guard: skip an update whose loss, gradient norm, reward or KL is not finite, stop
after too many in a row, and never write a checkpoint with non-finite weights."""

from __future__ import annotations

import logging

import numpy as np
import paddle

from ppo.distributed import parallel
from ppo.core.errors import UserError
from ppo.distributed.parallel import unwrap

logger = logging.getLogger("ppo")


class TrainingDiverged(UserError):
    """Too many non-finite updates in a row: training stops, the last checkpoint is left as it was."""


def all_finite(value) -> bool:
    array = value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value, dtype=np.float64)
    return bool(np.all(np.isfinite(array)))


class NonFiniteGuard:
    """Skips an update whose loss, gradient norm, reward or KL is not finite, and counts it.

    Every data rank takes the same decision (a non-finite value on any rank skips the update
    everywhere).  After more than ``limit`` bad updates in a row, training stops with one line
    naming the step and the quantity.
    """

    def __init__(self, limit: int, stage: str):
        self.limit, self.stage = limit, stage
        self.consecutive = 0
        self.skipped = 0

    def ok(self, step: int, **quantities) -> bool:

        bad = [name for name, value in quantities.items() if not all_finite(value)]
        if parallel.mean_over_data(1.0 if bad else 0.0) == 0.0:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        what = bad[0] if bad else "value on another rank"
        if self.consecutive > self.limit:
            raise TrainingDiverged(
                f"non-finite {what} at {self.stage} step {step} ({self.consecutive} bad update(s) in a row, "
                f"max_nonfinite_steps={self.limit}); stopping, the last saved checkpoint is intact")
        logger.warning("non-finite %s at %s step %d: update skipped (%d in a row)", what, self.stage, step,
                       self.consecutive)
        return False


def check_weights_finite(models: dict, what: str = "a checkpoint") -> None:
    """Refuse to write ``what`` (a checkpoint, the final model) with non-finite weights."""
    for name, model in models.items():
        for pname, p in unwrap(model).named_parameters():
            if not all_finite(p):
                raise TrainingDiverged(f"refusing to save {what}: {name or 'model'} parameter {pname} "
                                       "is not finite (the last saved checkpoint is intact)")
