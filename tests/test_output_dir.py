"""Output folders are never destroyed: a new run into another run's folder is refused unless it
resumes or overwrites, the final save keeps the run's checkpoints and metrics, and one run holds a
folder at a time (``.run.lock``; the lock of a dead process is taken over)."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from ppo.args import SFTArgs
from ppo.storage.checkpoint import list_checkpoints
from ppo.core.errors import UserError
from test_bad_inputs import snapshot  # {relative path: sha256} of every file under a folder
from ppo.storage.output_dir import LOCK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft(tiny_dir, out, **kw):
    from ppo.stages.sft.trainer import SFTTrainer

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
    assert os.path.isfile(finished / "config.json") and os.path.isfile(finished / "model.safetensors")
    assert not [n for n in os.listdir(finished) if n.startswith((".tmp-", ".old-"))]
    assert not os.path.exists(finished / LOCK)  # released at the end of the run


def test_final_save_into_finished_folder_keeps_other_files(finished, tmp_path):
    # the final save of a resumed run writes over the model files only (before: the folder was renamed away)
    import shutil

    from ppo.storage.checkpoint import publish

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
    with pytest.raises(UserError, match="already holds another run's results .*checkpoint-1.*metrics.jsonl.*"
                                        "--resume_from_checkpoint auto.*--overwrite_output_dir true"):
        sft(tiny_dir, finished, seed=6)
    assert snapshot(finished) == before
    assert not os.path.exists(finished / LOCK)


def test_ppo_new_run_into_a_ppo_folder_is_refused(tiny_dir, tiny_tokenizer, tmp_path):
    from ppo.args import PPOArgs
    from ppo.models import load_score_model
    from ppo.stages.ppo.trainer import PPOTrainer

    rm = load_score_model(str(tiny_dir / "base"))
    rm.save_pretrained(str(tmp_path / "rm"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "rm"))
    out = tmp_path / "ppo"
    (out / "policy").mkdir(parents=True)  # an earlier PPO run's final policy
    (out / "policy" / "config.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(UserError, match="already holds another run's results \\(policy\\)"):
        PPOTrainer(PPOArgs(actor_model_name_or_path=str(tiny_dir / "base"), reward_model_name_or_path=str(tmp_path / "rm"),
                           train_datasets="tiny-prompts/train", max_length=48, max_new_tokens=4,
                           per_device_prompt_batch_size=2, per_device_train_batch_size=2, max_steps=1,
                           disable_tqdm=True, output_dir=str(out)))
    assert snapshot(out) == before and sorted(os.listdir(out)) == ["policy"]


def test_refusal_through_the_entry_point(tiny_dir, finished):
    before = snapshot(finished)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "ppo", "run_sft.py"), "--model_name_or_path",
                        str(tiny_dir / "base"), "--train_datasets", "tiny-sft", "--output_dir", str(finished),
                        "--max_steps", "1", "--max_length", "64"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already holds another run's results" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert snapshot(finished) == before


def test_bad_input_is_reported_before_the_refusal(tiny_dir, finished):
    # every input check comes first: the user sees the mistake in the arguments, not the folder
    with pytest.raises(UserError, match="not a model folder"):
        sft(tiny_dir, finished, model_name_or_path=str(finished / "no-such-model"))


def test_overwrite_output_dir_starts_afresh(tiny_dir, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "notes.txt").write_text("mine")  # not a run output: kept
    sft(tiny_dir, out, overwrite_output_dir=True, max_steps=1, save_steps=0).train()
    assert list_checkpoints(str(out)) == []  # the earlier run's checkpoint-1 is gone
    assert train_steps(out) == [1]  # this run's metrics only
    assert (out / "notes.txt").read_text() == "mine"
    # the final model is this run's (written over the earlier one)
    assert snapshot(out)["model.safetensors"] != snapshot(finished)["model.safetensors"]


def test_resume_keeps_earlier_checkpoints_and_metrics(tiny_dir, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    # continue the finished 2-step run (its newest checkpoint is 1) to 4 steps
    sft(tiny_dir, out, resume_from_checkpoint="auto", max_steps=4, save_total_limit=10).train()
    assert [n for n, _ in list_checkpoints(str(out))] == [1, 2, 3]
    assert train_steps(out) == [1, 2, 3, 4]  # step 2 (after checkpoint-1) once: the earlier row dropped
    before, after = snapshot(finished), snapshot(out)
    kept = [rel for rel in before if rel.startswith("checkpoint-1")]
    assert kept and all(after[rel] == before[rel] for rel in kept)


def _write_lock(folder, pid, host=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00"}, f)


def test_lock_of_a_running_process_refuses_then_a_dead_ones_is_taken_over(tiny_dir, tmp_path, caplog):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        _write_lock(out, holder.pid)
        before = snapshot(out)
        with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} on {socket.gethostname()}, "
                                            "started 2026-01-01T00:00:00\\)"):
            sft(tiny_dir, out)
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over with a warning, and released at the end
    trainer = sft(tiny_dir, out, max_steps=1, save_steps=0)
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.load(open(out / LOCK))["pid"] == os.getpid()
    trainer.train()
    assert not os.path.exists(out / LOCK)
    assert train_steps(out) == [1]


def test_lock_of_another_host_is_never_taken_over(tiny_dir, tmp_path):
    out = tmp_path / "run"
    _write_lock(out, 1, host="some-other-host")
    with pytest.raises(UserError, match=f"pid 1 on some-other-host.*delete '{out / LOCK}'"):
        sft(tiny_dir, out)


@pytest.mark.distributed
def test_two_ranks_refuse_together(tiny_dir, finished, tmp_path):
    # rank 0 decides, both ranks stop with its line; the folder is unchanged
    before = snapshot(finished)
    log_dir = tmp_path / "logs"
    r = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                        str(log_dir), os.path.join(ROOT, "ppo", "run_sft.py"), "--model_name_or_path",
                        str(tiny_dir / "base"), "--train_datasets", "tiny-sft", "--output_dir", str(finished),
                        "--max_steps", "1", "--max_length", "64", "--per_device_train_batch_size", "2"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    assert r.returncode != 0
    for rank in (0, 1):
        log = (log_dir / f"workerlog.{rank}").read_text()
        assert "Traceback" not in log, log[-2000:]
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "already holds another run's results" in errors[0], log[-2000:]
    assert snapshot(finished) == before
