"""Checkpoint folders on disk: the manifest (every file with its size and CRC-32C, written last),
the atomic publish of a finished write, and finding, checking, cleaning and rotating folders.

A folder with a manifest is complete by definition and never deleted by cleanup (only
``save_total_limit`` rotation removes checkpoints); only ``.tmp-*`` folders, writes that never
finished, are removed on the next start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import crc32c

from ppo.core.errors import UserError

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
logger = logging.getLogger("ppo")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def tmp_folder(target: str) -> str:
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".tmp-{name}")


CHUNK = 8 << 20  # checksums stream files in 8 MiB pieces (memory stays flat on multi-GB files)


def file_crc32c(path: str) -> str:
    """CRC-32C of the file at ``path`` as 8 hex digits (hardware-accelerated: see docs/checkpoints.md for its cost)."""
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = crc32c.crc32c(chunk, value)
    return f"{value:08x}"


def finalize(tmp: str, target: str, state: dict) -> None:
    """Main rank, after every rank wrote: trainer state (``state``), manifest (last), then the atomic rename."""
    with open(os.path.join(tmp, STATE), "w") as f:
        json.dump(state, f, indent=1, default=str)
    files = {}
    for root, _, names in os.walk(tmp):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, tmp)] = {"size": os.path.getsize(path), "crc32c": file_crc32c(path)}
    with open(os.path.join(tmp, MANIFEST + ".part"), "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(tmp, MANIFEST + ".part"), os.path.join(tmp, MANIFEST))
    if os.path.exists(target):
        discard(target)
    os.replace(tmp, target)


def discard(folder: str) -> None:
    """Delete the checkpoint ``folder``, renamed to ``.tmp-removed-<name>`` first: a kill during the
    deletion leaves an unfinished-write folder (removed on the next start), never a half-deleted
    ``checkpoint-N`` that still has its manifest."""
    parent, name = os.path.split(os.path.abspath(folder))
    trash = os.path.join(parent, f".tmp-removed-{name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)



# ---------------------------------------------------------------------------------------------
# finding


def is_complete(folder: str) -> bool:
    """Whether ``folder`` is a finished checkpoint write: it has a manifest (the last file written).
    Complete is not intact: ``damage`` checks the files."""
    return os.path.isfile(os.path.join(folder, MANIFEST))


def damage(folder: str) -> str | None:
    """What is wrong with the complete checkpoint ``folder`` (one phrase naming the file), or None
    when every file has its manifest's size and checksum."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
        assert isinstance(files, dict)
    except FileNotFoundError:
        return f"{MANIFEST} is missing (a write that never finished)"
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST} is unreadable"
    for rel, entry in sorted(files.items()):
        path = os.path.join(folder, rel)
        # manifests before checksums hold the size alone
        size, crc = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("crc32c"))
        if not os.path.isfile(path):
            return f"file '{rel}' is {'a folder, not a file' if os.path.isdir(path) else 'missing'}"
        if os.path.getsize(path) != size:
            return f"file '{rel}' has {os.path.getsize(path)} bytes, {size} were written"
        if crc is not None and file_crc32c(path) != crc:
            return f"file '{rel}' does not match its checksum (changed or damaged after it was written)"
    return None


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete ``checkpoint-N`` folders of ``output_dir`` (with a manifest; intact or not) as
    (N, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        if m and is_complete(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def clean_partial(output_dir: str) -> list[str]:
    """Remove unfinished writes (``.tmp-*`` folders) and nothing else: a checkpoint with a manifest
    is complete, and a damaged one stays for the user to inspect."""
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(".tmp-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def rotate(output_dir: str, limit: int) -> None:
    """Keep the newest ``limit`` complete checkpoints; never delete the only complete one."""
    complete = list_checkpoints(output_dir)
    for _, path in complete[:max(0, len(complete) - max(1, limit))]:
        discard(path)


def resolve_resume(value: str, output_dir: str) -> str | None:
    """The checkpoint folder to resume from, its files verified: a path, 'auto' (the newest intact
    one, damaged ones skipped with a warning and left in place; None when there is none), or ''."""
    if not value:
        return None
    if value == "auto":
        for _, folder in reversed(list_checkpoints(output_dir)):
            problem = damage(folder)
            if problem is None:
                return folder
            logger.warning("skipping the damaged checkpoint %s: %s (left in place)", folder, problem)
        return None
    if not os.path.isdir(value) or not any(os.path.isfile(os.path.join(value, n)) for n in (STATE, MANIFEST)):
        raise UserError(f"resume_from_checkpoint '{value}' is not a checkpoint folder (no {STATE}); "
                        f"give a checkpoint-N folder or 'auto'")
    problem = damage(value)
    if problem is not None:
        raise UserError(f"resume_from_checkpoint '{value}' is damaged: {problem}; resume from another "
                        "checkpoint, or 'auto' (the newest intact one)")
    return value
