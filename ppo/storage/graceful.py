"""Graceful stop: SIGTERM (what schedulers and preemptible machines send) and SIGINT (Ctrl-C) end
a run after the current step with a checkpoint, and the run exits saying how to resume.

A handler only records the signal; the loop calls ``after_step`` at the end of every step, where
the ranks agree through a max-reduce of the recorded signal (one rank signalled stops every rank
at the same step).  A signal during a checkpoint save lets the save complete first.  The handlers
stay until the final model is written (``close`` after the final save), so a signal during the
final evaluation or save lets the run finish.  A second signal (2 s or more after the first)
stops the process at once with one line: a save it interrupts is left as a ``.tmp-*`` folder
without a manifest, never taken for a checkpoint and removed on the next start.  Only the few
renames that publish a finished final model (``uninterruptible``) make it wait until they end.
Under ``paddle.distributed.launch`` the checkpoint must be written within 30 s of the launcher's
SIGTERM: the launcher then kills its ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

from ppo.distributed import parallel
from ppo.storage.output_dir import release_output_dir

logger = logging.getLogger("ppo")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 2.0  # signals this soon after the first are repeats of it
_held = {"depth": 0, "signum": 0}  # an open ``uninterruptible`` section, and a stop it holds back


@contextlib.contextmanager
def uninterruptible():
    """A short section a stop-at-once must not cut in half (moving a finished final model's files
    into ``output_dir``): a second signal inside it takes effect when it ends."""
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if not _held["depth"] and _held["signum"]:
            _stop_at_once(_held["signum"])


def _stop_at_once(signum: int) -> None:
    # os.write, not logging: the handler may have interrupted a log call of this thread
    os.write(2, (f"second {signal.Signals(signum).name}: stopping at once; a checkpoint being written is left "
                 "unfinished (never taken for a checkpoint, removed on the next start): continue from the "
                 "last complete one with --resume_from_checkpoint auto\n").encode())
    # the default action: the parent sees a process killed by the signal
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class StopRequested(Exception):
    """Raised out of a training loop once the stop checkpoint is written; ``run_entry`` prints the
    message and exits with 128 + the signal number (the shell's convention for a signalled stop)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


class GracefulStop:
    """Signal handlers of one training loop, installed at construction (main thread only).
    ``on_stop()`` runs after the stop checkpoint (e.g. removing offload files)."""

    def __init__(self, on_stop=None):
        self.signum, self.on_stop = 0, on_stop
        self.finishing = False  # past the last step: the final evaluation and save
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            # paddle's launcher repeats its SIGTERM to every rank 3 times 0.2 s apart: that is
            # one request; a signal after REPEAT_S is the second one, the default action, now
            if time.monotonic() - self.first < REPEAT_S:
                return
            if _held["depth"]:
                _held["signum"] = signum
            else:
                _stop_at_once(signum)
            return
        self.signum, self.first = signum, time.monotonic()
        then = "finishing the run first (the final model)" if self.finishing else \
            "stopping after this step with a checkpoint"
        logger.warning("%s received: %s (send it again to stop at once)", signal.Signals(signum).name, then)

    def finish(self) -> None:
        """The last step is done: a signal from now on lets the final evaluation and save complete
        (the run then ends as finished); call ``close`` after the final save."""
        self.finishing = True

    def close(self) -> None:
        if self.finishing and self.signum:
            logger.warning("%s received while finishing: the run is complete", signal.Signals(self.signum).name)
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def after_step(self, step: int, cadence, output_dir: str) -> None:
        """End of step ``step``: when any rank was signalled, write ``checkpoint-<step>`` (unless the
        cadence just did), close the metrics, release the folder and raise ``StopRequested``.  The
        last step is left to finish the run as usual (its final model is the save)."""
        signum = parallel.max_over_ranks(self.signum)
        if not signum or step >= cadence.total_steps:
            return
        if not cadence.saves_at(step):
            cadence.save(step)
        cadence.metrics.close()
        if self.on_stop is not None:
            self.on_stop()
        self.close()
        release_output_dir(output_dir)
        name = signal.Signals(signum).name
        raise StopRequested(f"stopped by {name} after step {step} of {cadence.total_steps}; checkpoint "
                            f"'{os.path.join(output_dir, f'checkpoint-{step}')}' is written: continue with the same "
                            "arguments and --resume_from_checkpoint auto", signum)
