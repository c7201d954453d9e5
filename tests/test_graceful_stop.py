"""Graceful stop: SIGTERM / SIGINT finish the current step, write a checkpoint and exit saying how
to resume; the resumed run ends exactly where a straight run does, with one metrics row per step."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ppo.storage.checkpoint import MANIFEST, damage, list_checkpoints
from ppo.storage.graceful import REPEAT_S
from ppo.storage.output_dir import LOCK, drop_metrics_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(folder, split="train"):
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


from trained_weights import weights  # noqa: E402


def sft_cmd(tiny_dir, out, *extra):
    return [sys.executable, os.path.join(ROOT, "ppo", "run_sft.py"), "--model_name_or_path", str(tiny_dir / "base"),
            "--train_datasets", "tiny-sft", "--output_dir", str(out), "--max_length", "64", "--max_steps", "150",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_steps", "0", "--eval_split_ratio", "0", "--disable_tqdm", "true", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def straight_150(tiny_dir, tmp_path_factory):
    """The 150-step SFT run without a signal, once for both signals."""
    straight = tmp_path_factory.mktemp("straight")
    subprocess.run(sft_cmd(tiny_dir, straight), check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": ROOT})
    return straight


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_training_checkpoints_and_resumes_exactly(sig, tiny_dir, tmp_path, straight_150):
    env = {**os.environ, "PYTHONPATH": ROOT}
    straight = straight_150
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
    assert not (out / "model.safetensors").exists() and not (out / LOCK).exists()

    done = subprocess.run(sft_cmd(tiny_dir, out, "--resume_from_checkpoint", "auto"), capture_output=True, text=True,
                          cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
    assert [r["step"] for r in rows(out)] == list(range(1, 151))  # each step once
    assert rows(out) == rows(straight)


def test_ppo_loop_stops_after_the_signalled_step(tiny_dir, tiny_tokenizer, tmp_path):
    # in process: SIGTERM arrives inside the update of step 2
    from ppo.args import PPOArgs
    from ppo.storage.graceful import StopRequested
    from ppo.models import load_score_model
    from ppo.stages.ppo.trainer import PPOTrainer

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
    from ppo.storage.graceful import StopRequested
    from ppo.stages.sft.trainer import SFTTrainer

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


def test_signal_during_the_final_save_lets_the_run_finish(tiny_dir, tmp_path, caplog):
    # the handlers stay until the final model is written: a SIGTERM then lets the save complete
    # and the run end as finished (without them the default action would kill it mid-save)
    from ppo.args import SFTArgs
    from ppo.stages.sft.trainer import SFTTrainer

    out = tmp_path / "run"
    trainer = SFTTrainer(SFTArgs(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-sft", max_length=64,
                                 max_steps=2, per_device_train_batch_size=4, logging_steps=1, save_steps=0,
                                 eval_split_ratio=0.0, disable_tqdm=True, output_dir=str(out)))
    save, before = trainer.save, signal.getsignal(signal.SIGTERM)

    def save_with_signal(target, step):
        assert signal.getsignal(signal.SIGTERM) is not before, "no handler of the run during the final save"
        os.kill(os.getpid(), signal.SIGTERM)
        save(target, step)

    trainer.save = save_with_signal
    with caplog.at_level("WARNING", logger="ppo"):
        trainer.train()
    assert (out / "model.safetensors").exists() and not (out / LOCK).exists()
    assert not list_checkpoints(str(out)) and [r["step"] for r in rows(out)] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is before
    assert [r.getMessage() for r in caplog.records if "SIGTERM" in r.getMessage()] == [
        "SIGTERM received: finishing the run first (the final model) (send it again to stop at once)",
        "SIGTERM received while finishing: the run is complete"]


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
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
    assert [r["step"] for r in rows(out)] == list(range(1, 41))
    assert rows(out) == rows(straight)


# ---------------------------------------------------------------------------------------------
# Signals at chosen moments of a real run: tests/dist_scripts/interrupted.py holds the run there
# (inside a step, or inside a save before its manifest) until the test has signalled it


PAUSED = os.path.join(ROOT, "tests", "dist_scripts", "interrupted.py")


def ppo_cmd(tiny_dir, out, *extra):
    return [sys.executable, os.path.join(ROOT, "ppo", "run_ppo.py"), os.path.join(ROOT, "config", "tiny",
            "ppo_argument.json"), "--actor_model_name_or_path", str(tiny_dir / "base"), "--reward_model_name_or_path",
            str(tiny_dir / "score"), "--output_dir", str(out), "--max_steps", "4", "--save_steps", "0",
            "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "2", "--max_new_tokens", "6",
            "--eval_datasets", "", "--eval_steps", "0", "--logging_steps", "1", "--disable_tqdm", "true", *extra]


def launched(cmd, ranks, out, paused=False):
    """``cmd`` (python, script, args) through interrupted.py and, for 2 ranks, the launcher."""
    script = [PAUSED, cmd[1]] if paused else [cmd[1]]
    launcher = ["-m", "paddle.distributed.launch", "--nproc_per_node", str(ranks), "--log_dir",
                f"{out}-logs"] if ranks > 1 else []
    return [cmd[0], *launcher, *script, *cmd[2:]]


class Run:
    """A run started with pauses; its stderr (one process) or rank logs (launcher) kept to read."""

    def __init__(self, cmd, ranks, out, tmp_path, pause_at):
        self.ranks, self.out, self.pauses = ranks, out, tmp_path / "pauses"
        self.pauses.mkdir()
        self.err = tmp_path / "stderr.txt"
        env = {**os.environ, "PYTHONPATH": ROOT, "PAUSE_DIR": str(self.pauses), "PAUSE_AT": pause_at}
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(launched(cmd, ranks, out, paused=True), cwd=ROOT, env=env,
                                         stdout=subprocess.DEVNULL, stderr=err)

    def logs(self) -> list[str]:
        if self.ranks == 1:
            return [self.err.read_text()]
        return [open(f"{self.out}-logs/workerlog.{r}").read() for r in range(self.ranks)]

    def wait_until(self, condition, what):
        deadline = time.time() + 300
        while not condition():
            assert self.proc.poll() is None, f"the run ended ({self.proc.returncode}) before {what}:\n" + \
                "\n".join(log[-2000:] for log in self.logs())
            assert time.time() < deadline, f"no {what} after 300 s"
            time.sleep(0.02)

    def paused_at(self, moment, ranks=(0,)):
        self.wait_until(lambda: all((self.pauses / f"{moment}.rank{r}").exists() for r in ranks), f"pause {moment}")

    def signal(self, sig=signal.SIGTERM):
        """Send ``sig`` (to the launcher, which forwards it to every rank) and wait until rank 0,
        the paused one, logged it: the signal is in before the run goes on.  (Another rank may sit
        in a collective, where its handler runs only later; the ranks stop on any rank's signal.)"""
        count = self.logs()[0].count(f"{sig.name} received")
        os.kill(self.proc.pid, sig)
        self.wait_until(lambda: self.logs()[0].count(f"{sig.name} received") > count, f"the {sig.name} in the log")

    def go(self, moment):
        (self.pauses / f"{moment}.go").touch()


@pytest.fixture
def start_run(tmp_path):
    """``start_run(cmd, ranks, out, pause_at)`` -> a ``Run``; a run still alive when the test ends
    (a failed test) is killed with its ranks."""
    runs = []

    def start(cmd, ranks, out, pause_at):
        runs.append(Run(cmd, ranks, out, tmp_path, pause_at))
        return runs[-1]

    yield start
    for run in runs:
        if run.proc.poll() is None:
            for pid in [run.proc.pid, *rank_pids(run.proc.pid).values()]:
                os.kill(pid, signal.SIGKILL)
            run.proc.wait()


@pytest.fixture(scope="module")
def straight_sft(tiny_dir, tmp_path_factory):
    """A straight 4-step SFT run in one process (checkpoints do not change the figures: the
    stopped runs below save at other steps and must still end equal to it)."""
    out = tmp_path_factory.mktemp("straight") / "sft"
    straight_run(sft_cmd(tiny_dir, out, "--max_steps", "4"), 1, out)
    return out


def straight_run(cmd, ranks, out):
    subprocess.run(launched(cmd, ranks, out), check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": ROOT})


def assert_stopped_with_checkpoint(run, k, total):
    """The run stopped after step ``k`` with an intact ``checkpoint-k`` and said so, nothing else left."""
    out = run.out
    if run.ranks == 1:
        assert run.proc.returncode == 128 + signal.SIGTERM, run.logs()[0][-2000:]
    for log in run.logs():
        assert "Traceback" not in log, log[-2000:]
        assert log.strip().splitlines()[-1] == (
            f"stopped by SIGTERM after step {k} of {total}; checkpoint '{out / f'checkpoint-{k}'}' is written: "
            "continue with the same arguments and --resume_from_checkpoint auto"), log[-2000:]
    assert [n for n, _ in list_checkpoints(str(out))] == [k]
    assert damage(str(out / f"checkpoint-{k}")) is None
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert [r["step"] for r in rows(out)] == list(range(1, k + 1))
    assert not (out / LOCK).exists()


def resume_and_compare(cmd, ranks, out, straight, models=("",)):
    """Resume ``out`` with 'auto': the final weights equal the straight run's bit for bit, and
    metrics.jsonl has every step once with the straight run's figures (timings aside)."""
    done = subprocess.run(launched(cmd, ranks, out) + ["--resume_from_checkpoint", "auto"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-2000:]
    for sub in models:
        a, b = weights(straight / sub), weights(out / sub)
        assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a), sub
    untimed = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(out)]
    assert untimed == [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(straight)]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.distributed)], ids=["1-process", "2-ranks"])
def test_sigterm_during_a_save_lets_the_save_complete(ranks, tiny_dir, tmp_path, start_run, request):
    # SIGTERM while checkpoint-2 is being written (every file but the manifest): the save
    # completes, no second save, the run stops after step 2; the resume is exact
    cmd = sft_cmd(tiny_dir, tmp_path / "stopped", "--max_steps", "4", "--save_steps", "2")
    if ranks == 1:
        straight = request.getfixturevalue("straight_sft")
    else:
        straight = tmp_path / "straight"
        straight_run(sft_cmd(tiny_dir, straight, "--max_steps", "4"), ranks, straight)

    run = start_run(cmd, ranks, tmp_path / "stopped", "save:2")
    run.paused_at("save2")
    assert (run.out / ".tmp-checkpoint-2").is_dir() and not list_checkpoints(str(run.out))
    run.signal()
    run.go("save2")
    run.proc.wait(timeout=300)
    assert_stopped_with_checkpoint(run, 2, 4)
    assert not (run.out / "model.safetensors").exists()
    resume_and_compare(cmd, ranks, run.out, straight)


@pytest.mark.slow
def test_second_signal_stops_at_once(tiny_dir, tmp_path, start_run, straight_sft):
    # SIGTERM while checkpoint-2 is written, then SIGTERM again: the process ends at once, with one
    # line; the unfinished .tmp-checkpoint-2 (no manifest) is never taken for a checkpoint, the
    # next start removes it and resumes from checkpoint-1, exactly
    cmd = sft_cmd(tiny_dir, tmp_path / "stopped", "--max_steps", "4", "--save_steps", "1")
    run = start_run(cmd, 1, tmp_path / "stopped", "save:2")
    run.paused_at("save2")
    run.signal()
    time.sleep(REPEAT_S + 0.5)  # closer signals count as the first one (the launcher repeats it)
    os.kill(run.proc.pid, signal.SIGTERM)
    run.proc.wait(timeout=60)  # never released from the pause: only the second signal ends it
    assert run.proc.returncode == -signal.SIGTERM
    err = run.logs()[0]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "second SIGTERM: stopping at once; a checkpoint being written is left unfinished (never taken for a "
        "checkpoint, removed on the next start): continue from the last complete one with "
        "--resume_from_checkpoint auto")
    out = run.out
    assert [n for n, _ in list_checkpoints(str(out))] == [1] and damage(str(out / "checkpoint-1")) is None
    assert not (out / "checkpoint-2").exists() and not (out / ".tmp-checkpoint-2" / MANIFEST).exists()
    assert (out / ".tmp-checkpoint-2" / "model.safetensors").exists()  # it was killed mid-save
    assert [r["step"] for r in rows(out)] == [1, 2]

    done = resume_and_compare(cmd, 1, out, straight_sft)
    assert f"resumed from {out / 'checkpoint-1'}" in done.stderr + done.stdout
    assert "removed the unfinished checkpoint write" in done.stderr + done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.distributed)],
                         ids=["1-process", "2-ranks-tensor-parallel"])
def test_ppo_sigterm_checkpoints_and_resumes_exactly(ranks, tiny_dir, tmp_path, start_run):
    # ppo/run_ppo.py as a user runs it: SIGTERM (to the launcher for 2 ranks) inside step 2 ->
    # checkpoint-2 (written by the stop, save_steps is 0), exit 143; the resume ends where a
    # straight run ends, bit for bit
    layout = ("--tensor_parallel_degree", "2") if ranks == 2 else ()
    cmd = ppo_cmd(tiny_dir, tmp_path / "stopped", *layout)
    straight = tmp_path / "straight"
    straight_run(ppo_cmd(tiny_dir, straight, *layout), ranks, straight)

    run = start_run(cmd, ranks, tmp_path / "stopped", "step:2")
    run.paused_at("step2", ranks=range(ranks))
    run.signal()
    run.go("step2")
    run.proc.wait(timeout=300)
    assert_stopped_with_checkpoint(run, 2, 4)
    assert not (run.out / "policy").exists() and not (run.out / "value").exists()
    resume_and_compare(cmd, ranks, run.out, straight, models=("policy", "value"))


HELD = r"""
import os, signal, sys, time
import ppo.storage.graceful as g
g.REPEAT_S = 0.0
stop = g.GracefulStop()
os.kill(os.getpid(), signal.SIGTERM)  # the first: recorded, the run would finish its step
time.sleep(0.1)
with g.uninterruptible():
    os.kill(os.getpid(), signal.SIGTERM)  # the second, inside the section: held back
    time.sleep(0.2)
    print("section finished", flush=True)
print("after the section", flush=True)
"""


def test_second_signal_waits_for_an_uninterruptible_section():
    # the renames publishing a final model are never cut in half: the stop-at-once comes right
    # after the section ends, not inside it and not never
    done = subprocess.run([sys.executable, "-c", HELD], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert done.stdout.splitlines() == ["section finished"]
    assert done.stderr.strip().splitlines()[-1].startswith("second SIGTERM: stopping at once")
