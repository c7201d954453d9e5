"""Never write non-finite weights: a checkpoint or a final model whose weights are not all finite
is refused with one line, and the last saved checkpoint stays intact."""

from __future__ import annotations

import numpy as np
import paddle

from ppo.core.errors import UserError
from ppo.distributed.parallel import unwrap


class TrainingDiverged(UserError):
    """Too many non-finite updates in a row, or non-finite weights to save: training stops, the
    last checkpoint is left as it was."""


def all_finite(value) -> bool:
    array = value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value, dtype=np.float64)
    return bool(np.all(np.isfinite(array)))


def check_weights_finite(models: dict, what: str = "a checkpoint") -> None:
    """Refuse to write ``what`` (a checkpoint, the final model) with non-finite weights."""
    for name, model in models.items():
        for pname, p in unwrap(model).named_parameters():
            if not all_finite(p):
                raise TrainingDiverged(f"refusing to save {what}: {name or 'model'} parameter {pname} "
                                       "is not finite (the last saved checkpoint is intact)")
