"""Checkpoint integrity: the manifest's CRC-32C of every file, verified on resume.  A damaged
checkpoint is detected, never deleted; resuming it by path stops with one line naming the file,
``auto`` skips it (warning) and resumes from the newest intact one."""

import json
import re
import os
import shutil
import subprocess
import sys

import pytest

from ppo.args import SFTArgs
from ppo.storage.checkpoint import MANIFEST, clean_partial, list_checkpoints
from ppo.core.errors import UserError
from test_bad_inputs import snapshot  # {relative path: sha256} of every file under a folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def naive_crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def sft(tiny_dir, out, **kw):
    from ppo.stages.sft.trainer import SFTTrainer

    common = dict(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-sft", max_length=64, max_steps=3,
                  per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_steps=1,
                  save_total_limit=5, disable_tqdm=True, seed=5, output_dir=str(out))
    return SFTTrainer(SFTArgs(**{**common, **kw}))


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """A finished 3-step SFT run with checkpoint-1 and checkpoint-2 (never modified)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    sft(tiny_dir, out).train()
    assert [n for n, _ in list_checkpoints(str(out))] == [1, 2]
    return out


def flip_byte(path, offset=None):
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    open(path, "wb").write(bytes(data))


def truncate(path, n=100):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-n])


DAMAGE = {
    "truncated-weights": ("model.safetensors", truncate),
    "flipped-byte-in-weights": ("model.safetensors", flip_byte),
    "flipped-byte-in-optimizer": ("optimizer.rank0.safetensors", flip_byte),
    "damaged-trainer-state": ("trainer_state.json", lambda p: flip_byte(p, 0)),
    "damaged-rng": ("rng.rank0.json", flip_byte),
    "missing-optimizer": ("optimizer.rank0.safetensors", os.remove),
}


def test_manifest_records_crc32c_of_every_file(finished):
    folder = finished / "checkpoint-2"
    files = json.load(open(folder / MANIFEST))["files"]
    on_disk = {os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names}
    assert set(files) == on_disk - {MANIFEST}
    small = "trainer_state.json"
    assert files[small]["size"] == os.path.getsize(folder / small)
    assert int(files[small]["crc32c"], 16) == naive_crc32c(open(folder / small, "rb").read())


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_detected_kept_and_skipped(kind, tiny_dir, finished, tmp_path, caplog):
    name, hurt = DAMAGE[kind]
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    bad = out / "checkpoint-2"
    hurt(str(bad / name))
    damaged = snapshot(bad)

    # by path: one line naming the file; nothing removed
    with pytest.raises(UserError, match=f"resume_from_checkpoint '{bad}' is damaged: file '{name}' "):
        sft(tiny_dir, out, resume_from_checkpoint=str(bad))
    assert snapshot(bad) == damaged

    # auto: warns naming it, resumes from the newest intact one, leaves it in place
    trainer = sft(tiny_dir, out, resume_from_checkpoint="auto")
    assert trainer.start_step == 1
    assert f"skipping the damaged checkpoint {bad}: file '{name}'" in caplog.text
    assert snapshot(bad) == damaged
    assert [n for n, _ in list_checkpoints(str(out))] == [1, 2]


def test_auto_without_an_intact_checkpoint_keeps_the_folder(tiny_dir, finished, tmp_path):
    """Every checkpoint damaged: 'auto' has nothing to resume, and a fresh start would write over
    the damaged checkpoints (the warning says they are left in place) and the finished model; one
    line, nothing touched.  A folder with only the metrics of a run that never saved (a job
    restarted before its first checkpoint) starts afresh under 'auto', as before."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for n in (1, 2):
        flip_byte(str(out / f"checkpoint-{n}" / "optimizer.rank0.safetensors"))
    before = snapshot(out)
    with pytest.raises(UserError, match=r"'auto' found no intact checkpoint .*\(checkpoint-1, "
                                        "checkpoint-2, config.json") as info:
        sft(tiny_dir, out, resume_from_checkpoint="auto")
    assert "\n" not in str(info.value) and "--overwrite_output_dir true" in str(info.value)
    assert snapshot(out) == before
    # overwrite_output_dir: asked for, the earlier run's checkpoints go
    assert sft(tiny_dir, out, resume_from_checkpoint="auto", overwrite_output_dir=True).start_step == 0
    assert list_checkpoints(str(out)) == []

    restarted = tmp_path / "restarted"
    restarted.mkdir()
    shutil.copy(finished / "metrics.jsonl", restarted / "metrics.jsonl")
    assert sft(tiny_dir, restarted, resume_from_checkpoint="auto").start_step == 0


@pytest.mark.parametrize("name,what", [("trainer_state.json", "trainer state"), ("rng.rank0.json", "random state"),
                                       ("optimizer.rank0.safetensors", "optimizer state"),
                                       ("model.safetensors", "weights")])
def test_unreadable_file_with_a_size_only_manifest_is_one_line(name, what, tiny_dir, finished, tmp_path):
    # a manifest without checksums (written before they existed): damage surfaces when the file is
    # read, as one line naming it
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ckpt = out / "checkpoint-2"
    size = os.path.getsize(ckpt / name)
    with open(ckpt / name, "wb") as f:
        f.write(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    manifest = json.load(open(ckpt / MANIFEST))
    manifest["files"] = {k: v["size"] for k, v in manifest["files"].items()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    # one line that names the file and says it is unreadable (the shared reader's wording)
    with pytest.raises(UserError, match=f"'{re.escape(str(ckpt / name))}' (cannot be read|is not valid JSON)") as info:
        sft(tiny_dir, out, resume_from_checkpoint=str(ckpt))
    assert "\n" not in str(info.value)


def test_damaged_checkpoint_through_the_entry_point(tiny_dir, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    flip_byte(str(out / "checkpoint-2" / "optimizer.rank0.safetensors"))
    before = snapshot(out)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "ppo", "run_sft.py"), "--model_name_or_path",
                        str(tiny_dir / "base"), "--train_datasets", "tiny-sft", "--output_dir", str(out),
                        "--max_steps", "3", "--max_length", "64", "--per_device_train_batch_size", "4",
                        "--learning_rate", "1e-3", "--seed", "5", "--resume_from_checkpoint",
                        str(out / "checkpoint-2")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "file 'optimizer.rank0.safetensors' does not match its checksum" in errors[0]
    assert snapshot(out) == before


def test_cleanup_removes_unfinished_writes_only(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / ".tmp-checkpoint-3").mkdir()
    (out / ".tmp-checkpoint-3" / "model.safetensors").write_bytes(b"partial")
    truncate(str(out / "checkpoint-2" / "model.safetensors"))  # complete (manifest) but damaged
    (out / "checkpoint-7").mkdir()  # no manifest: not ours to judge, left alone
    assert clean_partial(str(out)) == [".tmp-checkpoint-3"]
    assert (out / "checkpoint-2" / "model.safetensors").exists() and (out / "checkpoint-7").is_dir()


def test_rotation_killed_midway_leaves_no_half_deleted_checkpoint(finished, tmp_path, monkeypatch):
    # a kill while save_total_limit removes checkpoint-1: it is renamed to .tmp-removed-* first, so
    # no checkpoint-1 with its manifest but fewer files is left; the next start removes the rest
    from ppo.storage import checkpoint

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    rmtree = shutil.rmtree

    def killed_after_one_file(path, ignore_errors=False):
        if not os.path.isdir(path):
            return
        for name in sorted(os.listdir(path), reverse=True):  # manifest.json before model_state.pdparams
            file = os.path.join(path, name)
            if os.path.isfile(file):
                os.remove(file)
                raise KeyboardInterrupt("killed")
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.rotate(str(out), 1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    assert not (out / "checkpoint-1").exists() and [n for n, _ in list_checkpoints(str(out))] == [2]
    assert clean_partial(str(out)) == [".tmp-removed-checkpoint-1"]
