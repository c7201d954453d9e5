"""Graceful stop: SIGTERM / SIGINT finish the current step, write a checkpoint and exit saying how
to resume; the resumed run ends exactly where a straight run does, with one metrics row per step."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest

from ppo.checkpoint import damage, list_checkpoints
from ppo.output_dir import LOCK, drop_metrics_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(folder, split="train"):
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def weights(path):
    return {k: np.asarray(v) for k, v in paddle.load(str(path)).items()}


def sft_cmd(tiny_dir, out, *extra):
    return [sys.executable, os.path.join(ROOT, "ppo", "run_sft.py"), "--model_name_or_path", str(tiny_dir / "base"),
            "--train_datasets", "tiny-sft", "--output_dir", str(out), "--max_length", "64", "--max_steps", "150",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_steps", "0", "--eval_split_ratio", "0", "--disable_tqdm", "true", "--seed", "3", *extra]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_training_checkpoints_and_resumes_exactly(sig, tiny_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    straight = tmp_path / "straight"
    subprocess.run(sft_cmd(tiny_dir, straight), check=True, capture_output=True, cwd=ROOT, env=env)

    out = tmp_path / "stopped"
    proc = subprocess.Popen(sft_cmd(tiny_dir, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(rows(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    stopped = [n for n, _ in list_checkpoints(str(out))]
    assert len(stopped) == 1, os.listdir(out)
    k = stopped[0]
    assert 3 <= k < 150
    assert last == (f"stopped by {signal.Signals(sig).name} after step {k} of 150; checkpoint "
                    f"'{out / f'checkpoint-{k}'}' is written: continue with the same arguments and "
                    "--resume_from_checkpoint auto"), last
    assert damage(str(out / f"checkpoint-{k}")) is None
    assert [r["step"] for r in rows(out)] == list(range(1, k + 1))
    assert not (out / "model_state.pdparams").exists() and not (out / LOCK).exists()

    done = subprocess.run(sft_cmd(tiny_dir, out, "--resume_from_checkpoint", "auto"), capture_output=True, text=True,
                          cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = weights(straight / "model_state.pdparams"), weights(out / "model_state.pdparams")
    assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
    assert [r["step"] for r in rows(out)] == list(range(1, 151))  # each step once
    assert rows(out) == rows(straight)


def test_ppo_loop_stops_after_the_signalled_step(tiny_dir, tiny_tokenizer, tmp_path):
    # in process: SIGTERM arrives inside the update of step 2
    from ppo.args import PPOArgs
    from ppo.graceful import StopRequested
    from ppo.models import load_score_model
    from ppo.trainer import PPOTrainer

    rm = load_score_model(str(tiny_dir / "base"))
    rm.save_pretrained(str(tmp_path / "rm"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "rm"))
    out = tmp_path / "ppo"
    trainer = PPOTrainer(PPOArgs(
        actor_model_name_or_path=str(tiny_dir / "base"), reward_model_name_or_path=str(tmp_path / "rm"),
        train_datasets="tiny-prompts/train", max_length=48, max_new_tokens=4, per_device_prompt_batch_size=2,
        per_device_train_batch_size=2, max_steps=5, save_steps=0, logging_steps=1, disable_tqdm=True,
        output_dir=str(out)))
    update = trainer.update

    def update_and_signal(exp, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return update(exp, step)

    trainer.update = update_and_signal
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopRequested, match="stopped by SIGTERM after step 2 of 5") as info:
        trainer.train()
    assert info.value.exit_status == 128 + signal.SIGTERM
    assert [n for n, _ in list_checkpoints(str(out))] == [2]
    assert [r["step"] for r in rows(out)] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are the caller's again
    assert not (out / LOCK).exists() and not (out / "policy").exists()


def test_signal_during_a_checkpoint_save_stops_after_it(tiny_dir, tmp_path):
    # SIGTERM while the cadence writes checkpoint-2: the save completes, no second save, stop
    from ppo.args import SFTArgs
    from ppo.graceful import StopRequested
    from ppo.sft_trainer import SFTTrainer

    out = tmp_path / "run"
    trainer = SFTTrainer(SFTArgs(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-sft", max_length=64,
                                 max_steps=6, per_device_train_batch_size=4, logging_steps=1, save_steps=2,
                                 eval_split_ratio=0.0, disable_tqdm=True, output_dir=str(out)))
    save, calls = trainer.save_checkpoint, []

    def save_with_signal(step):
        calls.append(step)
        os.kill(os.getpid(), signal.SIGTERM)
        save(step)

    trainer.save_checkpoint = save_with_signal
    with pytest.raises(StopRequested, match="stopped by SIGTERM after step 2 of 6"):
        trainer.train()
    assert calls == [2]
    assert [n for n, _ in list_checkpoints(str(out))] == [2] and damage(str(out / "checkpoint-2")) is None
    assert [r["step"] for r in rows(out)] == [1, 2]


def test_drop_metrics_after(tmp_path):
    lines = [{"split": "eval", "step": 0}, {"split": "train", "step": 1}, {"split": "train", "step": 2},
             {"split": "eval", "step": 2}, {"split": "train", "step": 3}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"split": "train", "st'  # a row cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    assert drop_metrics_after(str(tmp_path), 2) == 2
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines[:4]
    assert drop_metrics_after(str(tmp_path), 0) == 4  # resuming from nothing: the run starts over
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def rank_pids(launcher_pid: int) -> dict:
    """{rank: pid} of the ranks a launcher started (from each process's PADDLE_TRAINER_ID)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"PADDLE_TRAINER_ID" in env:
            out[int(env[b"PADDLE_TRAINER_ID"])] = int(entry)
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("target", ["launcher", "rank1"])
def test_sigterm_on_two_ranks(target, tiny_dir, tmp_path):
    # the launcher (a scheduler's SIGTERM; it forwards SIGTERM to every rank) or one rank alone:
    # every rank stops after the same step, the checkpoint is complete, the resume is exact
    env = {**os.environ, "PYTHONPATH": ROOT}

    def cmd(out, *extra):
        base = sft_cmd(tiny_dir, out, "--max_steps", "40", *extra)
        return [base[0], "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                str(out) + "-logs", *base[1:]]

    straight = tmp_path / "straight"
    subprocess.run(cmd(straight), check=True, capture_output=True, cwd=ROOT, env=env)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(cmd(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(rows(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid if target == "launcher" else rank_pids(proc.pid)[1], signal.SIGTERM)
    proc.wait(timeout=300)
    stopped = [n for n, _ in list_checkpoints(str(out))]
    logs = [open(f"{out}-logs/workerlog.{r}").read() for r in (0, 1)]
    assert len(stopped) == 1, logs[0][-2000:] + logs[1][-2000:]
    k = stopped[0]
    for log in logs:
        assert "Traceback" not in log, log[-2000:]
        assert f"stopped by SIGTERM after step {k} of 40;" in log, log[-2000:]
    assert damage(str(out / f"checkpoint-{k}")) is None
    assert [r["step"] for r in rows(out)] == list(range(1, k + 1))
    assert not (out / LOCK).exists()

    done = subprocess.run(cmd(out, "--resume_from_checkpoint", "auto"), capture_output=True, text=True, cwd=ROOT,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = weights(straight / "model_state.pdparams"), weights(out / "model_state.pdparams")
    assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
    assert [r["step"] for r in rows(out)] == list(range(1, 41))
    assert rows(out) == rows(straight)
