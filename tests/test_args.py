"""Argument parsing, batching over data ranks and the learning-rate schedule."""

import json
import os

import numpy as np
import pytest

from ppo.args import RewardArgs, parse_args
from ppo.core.batching import GlobalBatchSampler
from ppo.core.errors import UserError
from ppo.stages.optim import lr_lambda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, data, name="c.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


def test_json_then_command_line_overrides(tmp_path):
    path = write(tmp_path, {"train_datasets": "tiny-sft", "learning_rate": 0.01, "bf16": False})
    args = parse_args(RewardArgs, [path, "--learning_rate", "3e-4", "--bf16", "--max_steps=7"])
    assert args.learning_rate == 3e-4 and args.bf16 is True and args.max_steps == 7
    assert args.train_datasets == "tiny-sft"


def test_unknown_key_suggests_nearest(tmp_path):
    path = write(tmp_path, {"train_datasets": "x", "learnig_rate": 0.1})
    with pytest.raises(UserError, match=r"unknown argument 'learnig_rate' \(did you mean 'learning_rate'\?\)"):
        parse_args(RewardArgs, [path])


@pytest.mark.parametrize("override,pattern", [
    (["--per_device_train_batch_size", "two"], "must be int"),
    (["--learning_rate", "-1"], "'learning_rate' must be > 0"),
    (["--loss_type", "pairwise"], "must be one of"),
    (["--cpu_gemm", "mkl"], "'cpu_gemm' must be one of 'auto', 'onednn', 'paddle', got 'mkl'"),
    (["--warmup_ratio", "1.5"], r"must be in \[0, 1\)"),
    (["--sharding_parallel_degree", "2"], "'sharding' must be 'stage1' or 'stage2'"),
    (["stray"], "unexpected command-line argument"),
])
def test_bad_values(tmp_path, override, pattern):
    path = write(tmp_path, {"train_datasets": "x"})
    with pytest.raises(UserError, match=pattern):
        parse_args(RewardArgs, [path] + override)


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "train_datasets": "x",\n  "seed": 1,,\n}')
    with pytest.raises(UserError, match="line 3 column"):
        parse_args(RewardArgs, [path])


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_args(RewardArgs, [str(tmp_path / "none.json")])


def test_sampler_ranks_partition_the_single_rank_batch():
    one = GlobalBatchSampler(103, per_device_batch=8, accumulation=2, data_world=1, seed=3)
    two = [GlobalBatchSampler(103, per_device_batch=4, accumulation=2, data_world=2, data_rank=r, seed=3)
           for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 6
    for step in range(14):  # crosses epochs
        single = sum(one.micro_batches(step), [])
        split = sum(two[0].micro_batches(step), []) + sum(two[1].micro_batches(step), [])
        assert sorted(single) == sorted(split) and len(set(single)) == 16
    # each epoch visits distinct samples; epochs differ in order
    e0 = sum((sum(one.micro_batches(s), []) for s in range(6)), [])
    e1 = sum((sum(one.micro_batches(s), []) for s in range(6, 12)), [])
    assert len(set(e0)) == 96 and e0 != e1
    with pytest.raises(UserError, match="fewer than one global batch"):
        GlobalBatchSampler(10, per_device_batch=8, accumulation=1, data_world=2)


def test_lr_schedule_values():
    f = lr_lambda("cosine", total=10, warmup=2)
    np.testing.assert_allclose([f(0), f(1)], [0.5, 1.0])
    np.testing.assert_allclose(f(2), 1.0)
    np.testing.assert_allclose(f(6), 0.5 * (1 + np.cos(np.pi * 4 / 8)))
    assert lr_lambda("linear", 10, 0)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 10, 3)(9) == 1.0


@pytest.mark.parametrize("path", sorted(
    os.path.relpath(os.path.join(d, f), ROOT)
    for d, _, files in os.walk(os.path.join(ROOT, "config")) for f in files if f.endswith(".json")))
def test_shipped_configs_parse(path):
    """Every preset parses and validates (keys, types, ranges) with its stage's arguments."""
    from ppo.args import DPOArgs, PPOArgs, SFTArgs

    cls = {"rm_argument.json": RewardArgs, "sft_argument.json": SFTArgs, "dpo_argument.json": DPOArgs,
           "online_dpo_argument.json": DPOArgs,
           "ppo_argument.json": PPOArgs, "arithmetic_sft_argument.json": SFTArgs,
           "grpo_argument.json": PPOArgs}[os.path.basename(path)]
    args = parse_args(cls, [os.path.join(ROOT, path)])
    with open(os.path.join(ROOT, path)) as f:
        for key, value in json.load(f).items():
            assert getattr(args, key) == value, key


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "ernie4_5"])
def test_family_presets_parse_with_their_stage_arguments(family):
    """config/<family>/*.json: every preset is a valid argument file of its stage (the models they
    name are the user's: not checked here)."""
    from ppo.args import DPOArgs, PPOArgs, RewardArgs, SFTArgs

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", family)
    stages = {"sft": SFTArgs, "rm": RewardArgs, "dpo": DPOArgs, "ppo": PPOArgs}
    files = sorted(os.listdir(root))
    assert files == sorted(f"{stage}_argument.json" for stage in stages)
    for stage, cls in stages.items():
        args = parse_args(cls, [os.path.join(root, f"{stage}_argument.json")])
        assert family in args.output_dir
