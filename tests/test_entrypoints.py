"""The real entry points on the built-in example: training moves what it should, bad input fails cleanly."""

import json
import os
import subprocess
import sys

import pytest
from trained_weights import assert_trained_weights_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, nproc=1, check=True, log_dir=None):
    cmd = [sys.executable]
    if nproc > 1:
        # the launcher's logs go next to the run's outputs, not into the checkout
        log_dir = log_dir or os.path.join(str(args[args.index("--output_dir") + 1]), "launch-logs")
        cmd += ["-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir", log_dir]
    cmd += [os.path.join(ROOT, script), *map(str, args), "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def metrics(output_dir, split):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.mark.slow
def test_reward_model_learns_the_gold_rule(tiny_dir, tmp_path):
    out = tmp_path / "rm"
    run("rm/run_reward.py", "config/tiny/rm_argument.json", "--model_name_or_path", tiny_dir / "base",
        "--output_dir", out, "--max_steps", "40", "--eval_steps", "40", "--logging_steps", "10")
    evals = metrics(out, "eval")
    before, after = evals[0], evals[-1]
    # observed: about 0.5 before training and 0.98-1.0 held-out after 40 steps on the unseen template
    assert 0.3 < before["accuracy"] < 0.7
    assert after["accuracy"] >= 0.9
    assert after["better_mean"] > after["worse_mean"] + 1.0
    config = json.load(open(out / "config.json"))
    assert config["score_type"] == "reward" and config["normalizer_type"] == "RunningMeanStd"
    assert config["norm_count"] == 40 * 16 * 2  # every end score of every step went into the statistics
    from ppo.models import load_score_model

    assert load_score_model(str(out)).normalizer.count == 40 * 16 * 2


@pytest.mark.slow
def test_sft_lowers_answer_loss(tiny_dir, tmp_path):
    out = tmp_path / "sft"
    run("ppo/run_sft.py", "config/tiny/sft_argument.json", "--model_name_or_path", tiny_dir / "base",
        "--output_dir", out, "--max_steps", "60", "--eval_steps", "60", "--logging_steps", "20")
    evals = metrics(out, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    # observed: 5.8 (random init, ln 320) -> about 1.6 after 60 steps
    assert evals[0]["loss"] > 5.0
    assert evals[-1]["loss"] < 0.5 * evals[0]["loss"]
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "tokenizer_config.json")


LAYOUTS = {
    # name: (arguments, per-device batch giving the same global batch of 16 pairs on 2 ranks)
    "data-parallel": ([], 8),
    "sharding-stage1": (["--sharding_parallel_degree", "2", "--sharding", "stage1"], 8),
    "tensor-parallel": (["--tensor_parallel_degree", "2"], 16),
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reward_model_two_ranks_match_one(tiny_dir, tmp_path, layout):
    args, per_device = LAYOUTS[layout]
    common = ["config/tiny/rm_argument.json", "--model_name_or_path", tiny_dir / "base", "--max_steps", "6",
              "--logging_steps", "1", "--eval_steps", "6"]
    run("rm/run_reward.py", *common, "--output_dir", tmp_path / "one", "--per_device_train_batch_size", "16")
    run("rm/run_reward.py", *common, "--output_dir", tmp_path / "two", "--per_device_train_batch_size",
        str(per_device), *args, nproc=2)
    one, two = metrics(tmp_path / "one", "train"), metrics(tmp_path / "two", "train")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        # same global batch of 16 pairs; reductions in another order (all-reduce, split matmuls): ~1e-7 apart
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert a["accuracy"] == b["accuracy"]
        # the norm of the averaged gradient (under sharding: after the optimizer's reduction)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"]), (a, b)
    ea, eb = metrics(tmp_path / "one", "eval")[-1], metrics(tmp_path / "two", "eval")[-1]
    assert ea["pairs"] == eb["pairs"] == 200 and abs(ea["accuracy"] - eb["accuracy"]) < 1e-9
    assert abs(ea["reward_mean"] - eb["reward_mean"]) < 1e-4
    # the saved model is one full checkpoint whatever the layout, equal to the single-process one

    # over the 121k weights after 6 steps at lr 1e-3: at most 9 beyond 1e-5, the largest 1.7e-4
    assert_trained_weights_match(tmp_path / "one", tmp_path / "two", lr=1e-3, steps=6)


@pytest.mark.slow
@pytest.mark.distributed
def test_sft_tensor_parallel_matches_one_rank(tiny_dir, tmp_path):
    common = ["config/tiny/sft_argument.json", "--model_name_or_path", tiny_dir / "base", "--max_steps", "4",
              "--logging_steps", "1", "--per_device_train_batch_size", "8"]
    run("ppo/run_sft.py", *common, "--output_dir", tmp_path / "one")
    run("ppo/run_sft.py", *common, "--output_dir", tmp_path / "tp", "--tensor_parallel_degree", "2", nproc=2)
    one, tp = metrics(tmp_path / "one", "train"), metrics(tmp_path / "tp", "train")
    for a, b in zip(one, tp):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, a["loss"]), (a, b)
    from paddlenlp.transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "tp"))  # merged: loads in one process


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, nothing written


def bad_config(tmp_path, tiny_dir, **changes):
    config = json.load(open(os.path.join(ROOT, "config/tiny/rm_argument.json")))
    config.update(model_name_or_path=str(tiny_dir / "base"), output_dir=str(tmp_path / "out"), max_steps=1)
    config.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("changes,expected", [
    ({"learning_rat": 0.1}, "unknown argument 'learning_rat' (did you mean 'learning_rate'?)"),
    ({"train_datasets": "tiny-preferences/train"}, "tiny-preference/train"),
    ({"train_datasets": "tiny-preference/train:abc"}, "tiny-preference/train:abc"),
    ({"train_datasets": "tiny-preference/train:1:/no/such/file.jsonl"}, "/no/such/file.jsonl"),
    ({"train_datasets": "tiny-preference/train:1:{DATA}/bad/empty.jsonl"}, "empty.jsonl"),
    ({"train_datasets": "tiny-preference/train:1:{DATA}/bad/missing_field.jsonl"}, "missing_field.jsonl"),
    ({"model_name_or_path": "/no/model/here"}, "not a model folder"),
    ({"max_length": 100000}, "exceeds the position limit"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_dir, capsys, changes, expected):
    from ppo.stages.entry import run_entry
    from rm.run_reward import main

    data = os.path.join(ROOT, "tests", "data")
    changes = {k: v.replace("{DATA}", data) if isinstance(v, str) else v for k, v in changes.items()}
    path = bad_config(tmp_path, tiny_dir, **changes)
    with pytest.raises(SystemExit) as exit_info:
        run_entry(main, [str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_bad_input_through_the_real_process(tmp_path, tiny_dir):
    path = bad_config(tmp_path, tiny_dir, train_datasets="no-such-dataset")
    proc = run("rm/run_reward.py", path, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no-such-dataset" in last and "tiny-preference/train" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_main_job_quick_aligns_the_policy(tmp_path):
    """SFT -> reward model -> PPO, and SFT -> DPO, on the built-in example (shortened): both beat SFT
    on the gold rule, the strict one too."""
    from ppo.tiny.pipeline import main

    report = main(["--output_dir", str(tmp_path / "tiny"), "--quick"])
    # observed (quick run): SFT 0.49 / 0.45 sampled gold (lenient / strict), PPO 0.90-0.94 / 0.65-0.80 after 20 steps
    assert 0.35 < report["sft_gold_sampled"] < 0.65
    assert report["ppo_gold_sampled"] > report["sft_gold_sampled"] + 0.2
    assert report["ppo_strict_gold_sampled"] > report["sft_strict_gold_sampled"] + 0.1
    assert report["reward_model_heldout_accuracy"] >= 0.9
    # observed: DPO 0.80 / 0.71 (lenient / strict) after one epoch over the pairs
    assert report["dpo_gold_sampled"] > report["sft_gold_sampled"] + 0.15
    assert report["dpo_strict_gold_sampled"] > report["sft_strict_gold_sampled"] + 0.1
    assert report["dpo_heldout_pair_accuracy"] > 0.7
    assert os.path.getsize(tmp_path / "tiny" / "ppo_curves.png") > 10000
    steps = [s for s, _ in report["gold_curve"]]
    assert steps == [0, 10, 20]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_lora_stage_under_tensor_parallel_matches_one_process(stage, tiny_dir, tmp_path):
    """SFT and reward-model training with LoRA adapters under tensor parallel 2 (paddlenlp's
    column/row-parallel LoRA layers, adapters drawn whole from ``seed`` and split): the same losses
    as one process, the same merged final model and the same gathered ``lora/`` adapters."""
    import numpy as np
    from test_resume import weights

    script, config = {"sft": ("ppo/run_sft.py", "config/tiny/sft_argument.json"),
                      "reward": ("rm/run_reward.py", "config/tiny/rm_argument.json")}[stage]
    common = [config, "--model_name_or_path", tiny_dir / "base", "--max_steps", "4", "--logging_steps", "1",
              "--per_device_train_batch_size", "8", "--lora", "true", "--lora_rank", "4", "--learning_rate", "0.01"]
    run(script, *common, "--output_dir", tmp_path / "one")
    run(script, *common, "--output_dir", tmp_path / "tp", "--tensor_parallel_degree", "2", nproc=2)
    one, tp = metrics(tmp_path / "one", "train"), metrics(tmp_path / "tp", "train")
    assert len(one) == len(tp) == 4
    for a, b in zip(one, tp):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, a["loss"]), (a, b)
    base = weights(tiny_dir / "base")
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "tp")
    assert not [k for k in wa if "lora" in k]  # whole, merged
    assert_trained_weights_match(wa, wb, lr=0.01, steps=4)
    # the adapters moved the merged projections by far more than the tolerance
    moved = [k for k in base if k in wa and float(np.abs(wa[k] - base[k]).max()) > 1e-3]
    assert any("q_proj" in k for k in moved), moved
    la = weights(tmp_path / "one" / "lora" / "peft_model.safetensors")
    lb = weights(tmp_path / "tp" / "lora" / "peft_model.safetensors")
    assert la.keys() == lb.keys() and la
    assert_trained_weights_match(la, lb, lr=0.01, steps=4)  # gathered from the shards: whole shapes
