"""The numeric guard: skip an update whose loss, gradient norm, reward or KL is not finite, and stop
after too many in a row (non-finite weights are never written: ``ppo.storage.finite``)."""

from __future__ import annotations

import logging

from ppo.distributed import parallel
from ppo.storage.finite import TrainingDiverged, all_finite

logger = logging.getLogger("ppo")


class NonFiniteGuard:
    """Skips an update whose loss, gradient norm, reward or KL is not finite, and counts it.

    Every data rank takes the same decision (a non-finite value on any rank skips the update
    everywhere).  After more than ``limit`` bad updates in a row, training stops with one line
    naming the step and the quantity.
    """

    def __init__(self, limit: int, stage: str, mean=None):
        self.limit, self.stage = limit, stage
        self.mean = mean or parallel.mean_over_data  # the mean over the ranks that decide together
        self.consecutive = 0
        self.skipped = 0

    def ok(self, step: int, **quantities) -> bool:

        bad = [name for name, value in quantities.items() if not all_finite(value)]
        if self.mean(1.0 if bad else 0.0) == 0.0:
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
