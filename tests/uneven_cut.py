"""Loaded into launched ranks with ``--extra_modules``: data rank 1 cuts every optimizer step into
one micro-batch per row, rank 0 keeps the cheapest cut, so the ranks take different numbers of
micro-steps per optimizer step.  Each rank writes its counts to ``<$UNEVEN_CUT_DIR>/rank<R>``."""

import os

from ppo.core import batching

from ppo.stages.ppo import trainer

FOLDER = os.environ["UNEVEN_CUT_DIR"]
RANK = int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def uneven(rows, lengths, max_rows, count, free=True):
    if lengths is not None and free and RANK == 1:
        cut = batching.length_micro_batches(rows, lengths, 1)
    else:
        cut = batching.step_micro_batches(rows, lengths, max_rows, count, free)
    with open(os.path.join(FOLDER, f"rank{RANK}"), "a") as f:
        f.write(f"{len(cut)}\n")
    return cut


trainer.step_micro_batches = uneven
