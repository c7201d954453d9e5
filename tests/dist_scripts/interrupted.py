"""Run an entry point that a test interrupts at chosen moments: pauses (the test signals the run
there) and a SIGKILL inside a save.

    PAUSE_DIR=/tmp/p PAUSE_AT=step:2,save:4 python tests/dist_scripts/interrupted.py ppo/run_sft.py ARGS...

(or as the script of ``paddle.distributed.launch``).  At each moment of ``PAUSE_AT`` every rank
that reaches it creates ``PAUSE_DIR/<moment>.rank<R>`` (``step:2`` -> ``step2.rank0``) and waits
until ``PAUSE_DIR/<moment>.go`` exists (120 s at most), then carries on:

* ``step:N``: inside step N, before its logging, evaluation and cadence save;
* ``save:N``: inside the save of ``checkpoint-N`` (main rank), after every rank wrote its files and
  before the manifest: the ``.tmp-checkpoint-N`` folder is complete but for the manifest.

``KILL_IN_SAVE=1``: every rank kills itself (SIGKILL) in its first checkpoint save, once every
rank has written its files and before the manifest (a crash at the last moment of a save).

The product code has no test hooks; they are patched in here, the entry point then runs as
``python <script>`` would (its own ``__main__`` block, ``run_entry``).
"""

import os
import runpy
import signal
import sys
import time

from _common import ROOT  # noqa: F401  (puts the worktree first on sys.path)

from ppo.stages.entry import quiet_libraries

quiet_libraries()  # before paddlenlp loads, as the entry points do

from ppo.core import metrics  # noqa: E402

from ppo.distributed import parallel

from ppo.storage import checkpoint

MOMENTS = {tuple(m.split(":")) for m in os.environ.get("PAUSE_AT", "").split(",") if m}


def pause(kind: str, number: int) -> None:
    if (kind, str(number)) not in MOMENTS:
        return
    folder, rank = os.environ["PAUSE_DIR"], os.environ.get("PADDLE_TRAINER_ID", "0")
    with open(os.path.join(folder, f"{kind}{number}.rank{rank}"), "w"):
        pass
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(folder, f"{kind}{number}.go")) and time.monotonic() < deadline:
        time.sleep(0.02)


end_of_step, finalize, write_rank_state = metrics.StepCadence.end_of_step, checkpoint.finalize, \
    checkpoint.write_rank_state


def paused_end_of_step(self, step, *args, **kwargs):
    pause("step", step)
    return end_of_step(self, step, *args, **kwargs)


def paused_finalize(tmp, target, state):
    pause("save", int(state["global_step"]))
    return finalize(tmp, target, state)


def killed_after_write_rank_state(*args, **kwargs):
    write_rank_state(*args, **kwargs)
    parallel.barrier()  # every rank's files are written
    os.kill(os.getpid(), signal.SIGKILL)


metrics.StepCadence.end_of_step = paused_end_of_step
checkpoint.finalize = paused_finalize
if os.environ.get("KILL_IN_SAVE"):
    checkpoint.write_rank_state = killed_after_write_rank_state

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
