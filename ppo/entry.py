"""Entry-point plumbing shared by ``run_ppo.py``, ``run_sft.py`` and ``rm/run_reward.py``: quiet
start-up, the one-line ``UserError`` exit, seeding and the output-folder check (one run per folder, another run's results never overwritten
unasked)."""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import time
import warnings

import numpy as np
import paddle

from ppo import parallel
from ppo.errors import UserError


def quiet_libraries() -> None:
    """Keep paddle / paddlenlp start-up chatter out of the console."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    try:
        from paddlenlp.utils.log import logger as nlp_logger

        nlp_logger.set_level("WARNING")
    except Exception:  # pragma: no cover - logging only
        pass
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_entry(main, argv=None) -> None:
    """Run ``main(argv)``; a ``UserError`` becomes one line on stderr and exit status 2."""
    try:
        main(argv)
        if parallel.context().distributed:
            parallel.exit_together()  # every output is written and closed at this point
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def prepare_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output_dir '{path}' is not writable: {e.strerror}") from None


LOCK = ".run.lock"
# what a finished or interrupted run leaves in its output_dir (SFT/RM final model, PPO's policy/value)
_RESULTS = ("config.json", "model_state.pdparams", "metrics.jsonl", "policy", "value")
# removed by overwrite_output_dir: the earlier run's outputs that the new run would otherwise mix
# with its own (resume 'auto' would pick an old checkpoint, metrics.jsonl would hold both runs)
_CLEARED_BY_OVERWRITE = ("metrics.jsonl", "vdl", "policy", "value", "training_state.json")
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
logger = logging.getLogger("ppo")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: str) -> dict | None:
    """The lock of ``path`` (an output_dir) as {pid, host, started}, or None when there is none."""
    lock = os.path.join(path, LOCK)
    try:
        with open(lock) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "started": None}


def _holder_alive(held: dict) -> bool:
    """Whether the run that wrote ``held`` may still run (another host's pid cannot be checked)."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return True
    return held["pid"] == os.getpid() or _pid_alive(held["pid"])


def earlier_results(path: str) -> list[str]:
    """Entries of ``path`` that another run wrote (final model, checkpoints, metrics), sorted."""
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if n in _RESULTS or _CHECKPOINT.match(n))


def release_output_dir(path: str) -> None:
    """Remove this process's lock of ``path`` (a no-op when it is not ours)."""
    held = read_lock(path)
    if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        try:
            os.remove(os.path.join(path, LOCK))
        except OSError:
            pass


def _claim(args) -> None:
    """Main rank: refuse a folder in use or holding another run's results, then take the lock."""
    path = args.output_dir
    held = read_lock(path)
    if held and held.get("pid") != os.getpid() and _holder_alive(held):
        if held.get("pid") is None:
            raise UserError(f"output_dir '{path}' has an unreadable lock file {LOCK}; if no run uses this "
                            "folder, delete that file")
        raise UserError(f"output_dir '{path}' is in use by another run (pid {held['pid']} on {held['host']}, "
                        f"started {held.get('started')}); wait for it or choose another output_dir")
    found = earlier_results(path)
    if found and not args.resume_from_checkpoint:
        if not getattr(args, "overwrite_output_dir", False):
            raise UserError(f"output_dir '{path}' already holds another run's results ({', '.join(found[:4])}"
                            f"{', ...' if len(found) > 4 else ''}); continue it with --resume_from_checkpoint auto, "
                            "write over it with --overwrite_output_dir true, or choose another output_dir")
        for name in os.listdir(path):
            if name in _CLEARED_BY_OVERWRITE or _CHECKPOINT.match(name):
                target = os.path.join(path, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        logger.warning("overwrite_output_dir: removed the earlier run's checkpoints and metrics from %s", path)
    if held and held.get("pid") != os.getpid():
        logger.warning("taking over the stale lock of %s (pid %s on %s is not running)", path, held.get("pid"),
                       held.get("host"))
    lock = os.path.join(path, LOCK)
    with open(lock + f".{os.getpid()}", "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
    os.replace(lock + f".{os.getpid()}", lock)
    atexit.register(release_output_dir, path)


def claim_output_dir(args) -> None:
    """Every rank, before any write: output_dir writable, not used by a live run, and free of another
    run's results unless resuming or ``overwrite_output_dir``; rank 0 then holds ``.run.lock`` until
    exit.  All ranks raise the same ``UserError`` when rank 0 refuses."""
    ctx = parallel.context()
    message = None
    if ctx.is_main:
        try:
            prepare_output_dir(args.output_dir)
            _claim(args)
        except UserError as e:
            message = str(e)
    if ctx.distributed:
        # the other ranks wait for rank 0's decision and stop with its message
        import paddle.distributed as dist

        shared = [message]
        dist.broadcast_object_list(shared, src=0)
        message = shared[0]
    if message is not None:
        raise UserError(message)
