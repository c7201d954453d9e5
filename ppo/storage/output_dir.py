"""One run per ``output_dir``, and another run's results never written over unasked.

The main rank holds ``output_dir/.run.lock`` (pid, host, start time) from the moment the run passed
every input check until it exits; a lock whose process is gone (same host, pid not alive) is taken
over with a warning.  A new run (no ``resume_from_checkpoint``) in a folder holding another run's
results stops with one line unless ``overwrite_output_dir`` is set.  Nothing here writes before
those decisions, so a refused run leaves the folder byte-identical.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time

from ppo.core.errors import UserError

LOCK = ".run.lock"
# what a run leaves in its output_dir: final SFT/RM/DPO model, PPO's policy/ and value/, logs, DPO's
# precomputed reference log-probs and online DPO's record of its rounds
_RESULTS = ("config.json", "model.safetensors", "model.safetensors.index.json", "model_state.pdparams", "metrics.jsonl",
            "vdl", "eval_samples", "policy", "value", "reference_log_probs", "online.json")
# removed by overwrite_output_dir so the new run's checkpoints and metrics are not mixed with the
# earlier run's ('auto' would otherwise pick an old checkpoint); final models are written over
_CLEARED_BY_OVERWRITE = ("metrics.jsonl", "vdl", "eval_samples", "reference_log_probs")
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")  # finished checkpoints (.tmp-* writes are not results)
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")  # a large final model's weight shards
logger = logging.getLogger("ppo")


def read_lock(path: str) -> dict | None:
    """The lock of the output folder ``path`` as {pid, host, started}; None when there is none."""
    try:
        with open(os.path.join(path, LOCK)) as f:
            held = json.load(f)
        return held if isinstance(held, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _alive(held: dict) -> bool:
    """Whether the run that wrote ``held`` may still be running (another host's pid cannot be checked)."""
    pid = held.get("pid")
    if held.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(held: dict | None) -> bool:
    return bool(held) and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname()


def earlier_results(path: str) -> list[str]:
    """Entries of ``path`` that a run wrote (final models, checkpoints, metrics, logs), sorted."""
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if n in _RESULTS or _CHECKPOINT.match(n) or _SHARD.match(n))


def check_output_dir(path: str, resuming: bool, overwrite: bool) -> dict | None:
    """Main rank, writing nothing: raise ``UserError`` when a live run holds ``path`` or when a new
    run would mix with another run's results; returns the stale lock to take over (or None)."""
    held = read_lock(path)
    if held is not None and not _ours(held):
        lock = os.path.join(path, LOCK)
        if not held:
            raise UserError(f"output_dir '{path}' has an unreadable lock {LOCK}; if no run uses this folder, "
                            f"delete '{lock}'")
        if _alive(held):
            raise UserError(f"output_dir '{path}' is in use by another run (pid {held.get('pid')} on "
                            f"{held.get('host')}, started {held.get('started')}); wait for it to finish or choose "
                            f"another output_dir (if that run is gone, delete '{lock}')")
    found = earlier_results(path)
    if found and not resuming and not overwrite:
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise UserError(f"output_dir '{path}' already holds another run's results ({listed}); continue that run "
                        "with --resume_from_checkpoint auto, start afresh over it with --overwrite_output_dir true, "
                        "or choose another output_dir")
    return held if held and not _ours(held) else None


def check_fresh_start_after_auto(path: str) -> None:
    """Main rank: ``resume_from_checkpoint auto`` found no intact checkpoint in ``path``.  A fresh
    start is right where the folder holds at most the metrics and logs of a run that never saved
    (a job restarted before its first checkpoint), not over checkpoints (damaged ones are kept for
    the user to look at) or final models: those need ``overwrite_output_dir``."""
    kept = [n for n in earlier_results(path) if n not in _CLEARED_BY_OVERWRITE]
    if kept:
        listed = ", ".join(kept[:4]) + (", ..." if len(kept) > 4 else "")
        raise UserError(f"resume_from_checkpoint 'auto' found no intact checkpoint in output_dir '{path}', which "
                        f"holds another run's results ({listed}); resume from a checkpoint by its path to see what "
                        "is wrong with it, start afresh over them with --overwrite_output_dir true, or choose "
                        "another output_dir")


def take_lock(path: str, stale: dict | None) -> None:
    """Main rank: hold ``path``'s lock until exit (``stale``: a dead run's lock to replace)."""
    lock = os.path.join(path, LOCK)
    if stale is not None:
        logger.warning("taking over the lock of %s: pid %s on %s (started %s) is no longer running", path,
                       stale.get("pid"), stale.get("host"), stale.get("started"))
        with contextlib.suppress(OSError):
            os.remove(lock)
    part = f"{lock}.{socket.gethostname()}.{os.getpid()}"
    with open(part, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                  f)
    try:
        if not _ours(read_lock(path)):
            os.link(part, lock)  # atomic: of two runs starting together, exactly one gets the lock
    except FileExistsError:
        held = read_lock(path) or {}
        raise UserError(f"output_dir '{path}' is in use by another run (pid {held.get('pid')} on "
                        f"{held.get('host')}); wait for it to finish or choose another output_dir") from None
    finally:
        os.remove(part)
    atexit.register(release_output_dir, path)


def release_output_dir(path: str) -> None:
    """Remove this process's lock of ``path`` (nothing when the lock is not ours)."""
    if _ours(read_lock(path)):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(path, LOCK))


def clear_earlier_run(path: str) -> list[str]:
    """Main rank, ``overwrite_output_dir``: the earlier run's checkpoints, metrics and logs removed."""
    removed = []
    for name in sorted(os.listdir(path)):
        if name in _CLEARED_BY_OVERWRITE or _CHECKPOINT.match(name):
            target = os.path.join(path, name)
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
            removed.append(name)
    return removed


def drop_metrics_after(path: str, step: int) -> int:
    """Main rank, resuming at ``step``: remove the rows of ``path``'s metrics.jsonl that the resumed
    run logs again (every row after ``step``; from step 0 all of them) and unreadable lines (a row
    cut by a kill), so each step appears once.  Returns how many rows were removed."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        return 0
    kept, dropped = [], 0
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                row_step = None
            if row_step is not None and step > 0 and row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with open(metrics + ".part", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(metrics + ".part", metrics)
    return dropped
