"""Exact resume: k steps + resume to N equals N steps straight (bitwise on one CPU process), and
crashes (SIGKILL during training, during a checkpoint write) lose only the work since the last
complete checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ppo.args import PPOArgs, RewardArgs, SFTArgs
from ppo.storage.checkpoint import is_complete, list_checkpoints
from ppo.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}


from trained_weights import weights  # noqa: E402,F401  (re-exported to the other resume tests)


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_same_metrics(straight, resumed, steps, skip=("time/",)):
    for step in steps:
        for key, value in straight[step].items():
            if not key.startswith(skip):
                assert resumed[step][key] == value, (step, key, value, resumed[step][key])


@pytest.mark.parametrize("stage", ["reward", "sft", "dpo-precompute", "dpo-lora"])
def test_single_model_stage_resume_is_bitwise(stage, tiny_dir, tmp_path):
    """The resumed run computes DPO's precomputed reference table again in its own output_dir,
    from the reference model (not the resumed policy)."""
    from ppo.args import DPOArgs
    from ppo.stages.dpo.trainer import DPOTrainer
    from ppo.stages.sft.trainer import SFTTrainer
    from rm.reward_trainer import RewardTrainer

    cls, args_cls = {"reward": (RewardTrainer, RewardArgs), "sft": (SFTTrainer, SFTArgs)}.get(
        stage, (DPOTrainer, DPOArgs))
    data = "tiny-sft" if stage == "sft" else "tiny-preference/train"
    common = dict(model_name_or_path=str(tiny_dir / "base"), train_datasets=data, max_length=64, max_steps=6,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
                  warmup_steps=2, logging_steps=1, disable_tqdm=True, seed=5)
    if stage == "reward":
        common.update(normalizer_type="RunningMeanStd")
    if stage == "dpo-precompute":
        common.update(reference_mode="precompute", train_datasets="tiny-preference/train:0.1")
    if stage == "dpo-lora":
        common.update(lora=True, lora_rank=4, loss_type="sigmoid,ipo", loss_weights="1,0.1")
    cls(args_cls(output_dir=str(tmp_path / "straight"), save_steps=3, **common)).train()
    ckpt = tmp_path / "straight" / "checkpoint-3"
    assert is_complete(str(ckpt))
    cls(args_cls(output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(ckpt), **common)).train()
    assert_bitwise_equal(weights(tmp_path / "straight"),
                         weights(tmp_path / "resumed"))
    straight, resumed = train_metrics(tmp_path / "straight"), train_metrics(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    assert_same_metrics(straight, resumed, [4, 5, 6])
    if stage == "reward":
        a = json.load(open(tmp_path / "straight" / "config.json"))
        b = json.load(open(tmp_path / "resumed" / "config.json"))
        assert (a["norm_mean"], a["norm_var"], a["norm_count"]) == (b["norm_mean"], b["norm_var"], b["norm_count"])


@pytest.mark.parametrize("family", ["llama", "qwen2-tied", "qwen3-tied", "ernie4_5-tied"])
def test_ppo_resume_is_bitwise(family, request, tmp_path):
    """For LLaMA and for tied-embedding Qwen2 (q/k/v biases), Qwen3 (q/k norms) and ERNIE 4.5 (one
    weight is embedding and LM head)."""
    from ppo.stages.ppo.trainer import PPOTrainer

    models = request.getfixturevalue("tiny_dir" if family == "llama" else f"{family.split('-')[0]}_tied_dir")
    common = dict(actor_model_name_or_path=str(models / "base"), reward_model_name_or_path=str(models / "score"),
                  train_datasets="tiny-prompts/train", ptx_datasets="tiny-sft", ptx_coeff=0.3, max_length=48,
                  max_new_tokens=6, per_device_prompt_batch_size=4, per_device_train_batch_size=2, update_iters=2,
                  learning_rate=1e-3, critic_learning_rate=1e-3, adaptive_kl=True, kl_target=0.1, kl_horizon=50,
                  max_steps=4, logging_steps=1, disable_tqdm=True, seed=9)
    PPOTrainer(PPOArgs(output_dir=str(tmp_path / "straight"), save_steps=2, **common)).train()
    ckpt = tmp_path / "straight" / "checkpoint-2"
    PPOTrainer(PPOArgs(output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(ckpt), **common)).train()
    for sub in ("policy", "value"):
        assert_bitwise_equal(weights(tmp_path / "straight" / sub),
                             weights(tmp_path / "resumed" / sub))
    straight, resumed = train_metrics(tmp_path / "straight"), train_metrics(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    assert_same_metrics(straight, resumed, [3, 4])  # sampled responses, rewards, KL coefficient, losses


def test_resume_rejects_incompatible_arguments_and_non_checkpoints(tiny_dir, tmp_path):
    from rm.reward_trainer import RewardTrainer

    common = dict(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-preference/train", max_length=64,
                  per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True)
    RewardTrainer(RewardArgs(output_dir=str(tmp_path / "a"), max_steps=2, save_steps=1, **common)).train()
    ckpt = str(tmp_path / "a" / "checkpoint-1")
    changed = dict(common, per_device_train_batch_size=8)
    with pytest.raises(UserError, match="'per_device_train_batch_size' was 4 there and is 8 now"):
        RewardTrainer(RewardArgs(output_dir=str(tmp_path / "b"), max_steps=2, resume_from_checkpoint=ckpt, **changed))
    with pytest.raises(UserError, match="is not a checkpoint folder"):
        RewardTrainer(RewardArgs(output_dir=str(tmp_path / "b"), max_steps=2,
                                 resume_from_checkpoint=str(tiny_dir / "base"), **common))


# ---------------------------------------------------------------------------------------------
# crashes, through the real entry point


CRASH_RUNS = {
    # name: (script, config, arguments, ranks, saved model folders)
    "reward-1-rank": ("rm/run_reward.py", "config/tiny/rm_argument.json",
                      ["--max_steps", "12", "--save_steps", "3", "--per_device_train_batch_size", "8"], 1, [""]),
    "ppo-1-rank": ("ppo/run_ppo.py", "config/tiny/ppo_argument.json",
                   ["--max_steps", "8", "--save_steps", "2", "--per_device_prompt_batch_size", "4",
                    "--per_device_train_batch_size", "2", "--max_new_tokens", "6", "--eval_datasets", "",
                    "--eval_steps", "0"], 1, ["policy", "value"]),
    "sft-1-rank": ("ppo/run_sft.py", "config/tiny/sft_argument.json",
                   ["--max_steps", "12", "--save_steps", "3", "--per_device_train_batch_size", "8",
                    "--eval_split_ratio", "0"], 1, [""]),
    "ppo-2-ranks-tensor-parallel": ("ppo/run_ppo.py", "config/tiny/ppo_argument.json",
                                    ["--max_steps", "8", "--save_steps", "2", "--per_device_prompt_batch_size", "4",
                                     "--per_device_train_batch_size", "2", "--max_new_tokens", "6",
                                     "--eval_datasets", "", "--eval_steps", "0", "--tensor_parallel_degree", "2"],
                                    2, ["policy", "value"]),
    "reward-2-ranks-sharding": ("rm/run_reward.py", "config/tiny/rm_argument.json",
                                ["--max_steps", "12", "--save_steps", "3", "--per_device_train_batch_size", "4",
                                 "--sharding_parallel_degree", "2", "--sharding", "stage1"], 2, [""]),
}


INTERRUPTED = os.path.join(ROOT, "tests", "dist_scripts", "interrupted.py")  # the entry point with fault hooks


def crash_cmd(name, tiny_dir, out, *extra, interrupted=False):
    script, config, args, ranks, _ = CRASH_RUNS[name]
    base = str(tiny_dir / "base")
    model = ["--actor_model_name_or_path", base, "--reward_model_name_or_path", str(tiny_dir / "score")] if script.endswith("run_ppo.py") \
        else ["--model_name_or_path", base]
    launcher = ["-m", "paddle.distributed.launch", "--nproc_per_node", str(ranks), "--log_dir",
                str(out) + "-logs"] if ranks > 1 else []
    return [sys.executable, *launcher, *([INTERRUPTED] if interrupted else []), os.path.join(ROOT, script),
            os.path.join(ROOT, config), *model,
            "--output_dir", str(out), "--save_total_limit", "2", "--logging_steps", "1", "--disable_tqdm", "true",
            *args, *extra]


def logs_of(out, proc_output: str) -> str:
    """What the run printed: its own output, plus every rank's log under the launcher."""
    text = proc_output
    folder = str(out) + "-logs"
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith("workerlog."):
                with open(os.path.join(folder, name)) as f:
                    text += f.read()
    return text


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the launcher starts its ranks in their own process groups)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it, the parent first (a launcher would restart ranks)."""
    below = descendants(pid)
    for p in [pid, *below]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CRASH_RUNS))
def test_sigkill_during_training_and_during_a_save(name, tiny_dir, tmp_path):
    subs = CRASH_RUNS[name][4]
    straight = tmp_path / "straight"
    subprocess.run(crash_cmd(name, tiny_dir, straight), check=True, capture_output=True, cwd=ROOT)

    # 1. SIGKILL (the launcher and every rank) in the middle of training, once a checkpoint is complete
    out = tmp_path / "killed"
    proc = subprocess.Popen(crash_cmd(name, tiny_dir, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list_checkpoints(str(out)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    time.sleep(0.5)  # the killed ranks' file handles are gone before the next run starts
    assert list_checkpoints(str(out)), "no checkpoint was written before the kill"
    final = out / subs[0] / "model.safetensors"
    assert not final.exists(), "the run finished before it was killed"

    # 2. killed again while writing the next checkpoint (fault injection at the last moment of a save)
    shutil.rmtree(str(out) + "-logs", ignore_errors=True)
    env = dict(os.environ, KILL_IN_SAVE="1")
    crashed = subprocess.run(crash_cmd(name, tiny_dir, out, "--resume_from_checkpoint", "auto", interrupted=True),
                             cwd=ROOT, env=env, capture_output=True)
    assert crashed.returncode != 0
    if CRASH_RUNS[name][3] == 1:
        assert crashed.returncode == -signal.SIGKILL
    partial = [d for d in os.listdir(out) if d.startswith(".tmp-checkpoint-")]
    assert partial, "the kill should have left an unfinished checkpoint write"
    last_complete = list_checkpoints(str(out))[-1][0]

    # 3. resume: the partial write is removed, training continues from the last complete checkpoint
    shutil.rmtree(str(out) + "-logs", ignore_errors=True)
    done = subprocess.run(crash_cmd(name, tiny_dir, out, "--resume_from_checkpoint", "auto"), cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {out / f'checkpoint-{last_complete}'}" in logs_of(out, done.stderr + done.stdout)
    assert not [d for d in os.listdir(out) if d.startswith(".tmp-")]
    for sub in subs:
        assert_bitwise_equal(weights(straight / sub), weights(out / sub))
    assert_same_metrics(train_metrics(straight), train_metrics(out), [max(train_metrics(straight))])
    assert len(list_checkpoints(str(out))) <= 2  # save_total_limit
    shutil.rmtree(out)
