"""Output folders are never destroyed: a second run into a finished folder is refused unless it
resumes or overwrites, the final save keeps the run's checkpoints and metrics, and one run holds
a folder at a time (``.run.lock``; stale locks of dead processes are taken over)."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest

from ppo.args import SFTArgs
from ppo.checkpoint import list_checkpoints
from ppo.entry import LOCK
from ppo.errors import UserError


def snapshot(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def sft(tiny_dir, out, **kw):
    from ppo.sft_trainer import SFTTrainer

    common = dict(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-sft", max_length=64, max_steps=2,
                  per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_steps=1,
                  disable_tqdm=True, seed=5, output_dir=str(out))
    return SFTTrainer(SFTArgs(**{**common, **kw}))


def train_steps(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """A finished 2-step SFT run with checkpoint-1 (the last step is the final model; never modified)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    sft(tiny_dir, out).train()
    return out


def test_final_save_keeps_checkpoints_metrics_and_loads_from_output_dir(finished):
    assert [n for n, _ in list_checkpoints(str(finished))] == [1]
    assert train_steps(finished) == [1, 2]
    assert os.path.isfile(finished / "config.json") and os.path.isfile(finished / "model_state.pdparams")
    assert not [n for n in os.listdir(finished) if n.startswith((".tmp-", ".old-"))]
    assert not os.path.exists(finished / LOCK)  # released at the end of the run


def test_final_save_into_finished_folder_keeps_other_files(finished, tmp_path):
    # the final save of a resumed run writes over the model files only (before: the folder was renamed away)
    import shutil

    from ppo.checkpoint import publish

    target = tmp_path / "run"
    shutil.copytree(finished, target)
    tmp = tmp_path / ".tmp-run"
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    publish(str(tmp), str(target))
    after = snapshot(target)
    before = snapshot(finished)
    assert after["config.json"] == hashlib.sha256(b"{}").hexdigest()
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items()
                                                                     if k != "config.json"}
    assert not tmp.exists()


def test_new_run_into_finished_folder_is_refused_and_changes_nothing(tiny_dir, finished):
    before = snapshot(finished)
    with pytest.raises(UserError, match="already holds another run's results.*resume_from_checkpoint auto"
                                        ".*overwrite_output_dir true"):
        sft(tiny_dir, finished)
    assert snapshot(finished) == before
    assert sorted(os.listdir(finished)) == sorted(os.listdir(finished))


def test_refusal_through_the_entry_point(tiny_dir, finished):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = snapshot(finished)
    r = subprocess.run([sys.executable, os.path.join(root, "ppo", "run_sft.py"), "--model_name_or_path",
                        str(tiny_dir / "base"), "--train_datasets", "tiny-sft", "--output_dir", str(finished),
                        "--max_steps", "1"], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already holds another run's results" in errors[0], r.stderr
    assert snapshot(finished) == before


def test_overwrite_output_dir_starts_afresh(tiny_dir, finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")  # not a run output: kept
    sft(tiny_dir, out, overwrite_output_dir=True, max_steps=1, save_steps=0).train()
    assert list_checkpoints(str(out)) == []  # the earlier run's checkpoints are gone
    assert train_steps(out) == [1]  # metrics of this run only
    assert (out / "notes.txt").read_text() == "mine"
    assert os.path.isfile(out / "model_state.pdparams")


def test_resume_keeps_earlier_checkpoints_and_metrics(tiny_dir, finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    # continue the finished 2-step run to 4 steps
    sft(tiny_dir, out, resume_from_checkpoint="auto", max_steps=4, save_total_limit=10).train()
    assert [n for n, _ in list_checkpoints(str(out))][:3] == [1, 2, 3]
    # the earlier rows stay (resume from checkpoint-1 logs step 2 again: dropping such rows is separate work)
    assert train_steps(out)[:2] == [1, 2] and sorted(set(train_steps(out))) == [1, 2, 3, 4]
    before = snapshot(finished)
    after = snapshot(out)
    for rel in before:
        if rel.startswith("checkpoint-1"):
            assert after[rel] == before[rel], rel


def _write_lock(folder, pid, host=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00"}, f)


def test_lock_refuses_a_second_run(tiny_dir, tmp_path):
    # a live process (the test runner's parent) holds the folder
    out = tmp_path / "run"
    _write_lock(out, os.getppid())
    before = snapshot(out)
    with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getppid()} on {socket.gethostname()}"):
        sft(tiny_dir, out)
    assert snapshot(out) == before


def test_lock_held_by_a_running_process(tiny_dir, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(out, holder.pid)
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            sft(tiny_dir, out)
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and is taken over
    trainer = sft(tiny_dir, out, max_steps=1, save_steps=0)
    assert json.load(open(out / LOCK))["pid"] == os.getpid()
    trainer.train()
    assert not os.path.exists(out / LOCK)
    assert train_steps(out) == [1]
