"""PaddleNLP's own argument files run unchanged; its keys are honoured or noticed; paths resolve from the root."""

import json
import os
import subprocess
import sys

import pytest
from trained_weights import assert_no_pickles

from ppo.args import PADDLENLP_KEYS, PROJECT_ROOT, NoEffect, PPOArgs, RewardArgs, SFTArgs, parse_args
from ppo.core.errors import UserError

DATA = os.path.join(PROJECT_ROOT, "tests", "data", "paddlenlp")


def paddlenlp_file(name: str) -> dict:
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


def write(tmp_path, name: str, config: dict) -> str:
    path = str(tmp_path / name)
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def shrunk(config: dict, tiny_dir, out, **sizes) -> dict:
    """The file's own keys and values, with model and data paths on the tiny example and sizes cut."""
    config = dict(config)
    for key in ("model_name_or_path", "actor_model_name_or_path", "reward_model_name_or_path"):
        if key in config:
            config[key] = str(tiny_dir / "base")
    data = {"train_datasets": "tiny-prompts/train", "eval_datasets": "tiny-prompts/eval", "ptx_datasets": "tiny-sft"} \
        if "actor_model_name_or_path" in config else {"train_datasets": "tiny-preference/train",
                                                       "eval_datasets": "tiny-preference/test",
                                                       "dataset_name_or_path": "tiny-sft"}
    config.update({k: v for k, v in data.items() if k in config})
    config.update(output_dir=str(out), max_length=64, max_steps=1, tensor_parallel_degree=1,
                  sharding_parallel_degree=1, **sizes)
    return config


# ---------------------------------------------------------------------------------------------
# One step of every entry point on PaddleNLP's files


def run_main(module: str, path: str):
    import importlib

    return importlib.import_module(module).main([path])


def test_sft_file_runs(tiny_dir, tmp_path, capsys):
    config = shrunk(paddlenlp_file("sft_argument.json"), tiny_dir, tmp_path / "sft", eval_split_ratio=0.05)
    run_main("ppo.run_sft", write(tmp_path, "sft.json", config))
    assert os.path.isfile(tmp_path / "sft" / "model.safetensors")
    assert_no_pickles(tmp_path / "sft")  # nothing the run wrote runs code when read
    err = capsys.readouterr().err
    for key in ("fp16_opt_level", "src_length", "zero_padding", "unified_checkpoint", "load_best_model_at_end"):
        assert f"argument '{key}' (PaddleNLP) has no effect here" in err, key


def test_reward_file_runs(tiny_dir, tmp_path):
    config = shrunk(paddlenlp_file("rm_argument.json"), tiny_dir, tmp_path / "rm", per_device_eval_batch_size=100)
    run_main("rm.run_reward", write(tmp_path, "rm.json", config))
    assert os.path.isfile(tmp_path / "rm" / "model.safetensors")
    assert_no_pickles(tmp_path / "rm")  # nothing the run wrote runs code when read
    with open(tmp_path / "rm" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    # eval_steps > 0: the starting point, then (one step, shorter than an epoch) the final evaluation
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 1]
    assert [r["step"] for r in records if r["split"] == "train"] == [1]


def test_dpo_file_runs(tiny_dir, tmp_path, capsys):
    """PaddleNLP's llama dpo_argument.json on two files in its DPO layout (src/tgt/response/sort,
    a multi-turn record among them): its dataset paths, max_seq_len and DPO keys are honoured."""
    import ppo.args.paddlenlp

    from ppo.data import RawDataset

    ppo.args.paddlenlp._noticed.clear()  # each notice is printed once per process
    records = []
    for i, s in enumerate(RawDataset.load("tiny-preference/train")):
        if i == 40:
            break
        good, bad = (s["answer"], s["other_answer"]) if s["better"] else (s["other_answer"], s["answer"])
        turns = {"src": [s["input"], "And more?"], "tgt": [good]} if i % 5 == 0 else {"src": s["input"], "tgt": []}
        records.append({**turns, "response": [bad, good], "sort": [0, 1]})
    for name in ("train.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    config = shrunk(paddlenlp_file("dpo_argument.json"), tiny_dir, tmp_path / "dpo", gradient_accumulation_steps=2,
                    per_device_eval_batch_size=8)
    del config["max_length"]
    config.update(train_dataset_path=str(tmp_path / "train.jsonl"), dev_dataset_path=str(tmp_path / "dev.jsonl"),
                  max_seq_len=64)
    from ppo.args import DPOArgs

    args = parse_args(DPOArgs, [write(tmp_path, "dpo.json", config)])
    assert args.train_datasets == f"paddlenlp-dpo:1:{tmp_path / 'train.jsonl'}" and args.max_length == 64
    assert args.eval_datasets == f"paddlenlp-dpo:1:{tmp_path / 'dev.jsonl'}"
    run_main("dpo.run_dpo", write(tmp_path, "dpo.json", config))
    assert os.path.isfile(tmp_path / "dpo" / "model.safetensors")
    assert_no_pickles(tmp_path / "dpo")  # nothing the run wrote runs code when read
    with open(tmp_path / "dpo" / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert evals[-1]["pairs"] == 40 and "rewards/accuracies" in evals[-1]
    err = capsys.readouterr().err
    for key in ("max_prompt_len", "flash_mask", "lazy", "benchmark", "fp16_opt_level"):
        assert f"argument '{key}' (PaddleNLP) has no effect here" in err, key


def test_dpo_file_paths_resolve_from_the_project_root(tmp_path):
    from ppo.args import DPOArgs

    args = parse(DPOArgs, {"train_dataset_path": "tests/data/bad/dpo/missing_sort.jsonl"}, tmp_path)
    spec = args.train_datasets.split(":", 2)
    assert spec[:2] == ["paddlenlp-dpo", "1"]
    assert os.path.samefile(spec[2], os.path.join(PROJECT_ROOT, "tests", "data", "bad", "dpo", "missing_sort.jsonl"))


@pytest.mark.parametrize("name", ["ppo_argument.json", "ppo_config.json"])
def test_ppo_files_run(tiny_dir, tmp_path, name):
    config = paddlenlp_file(name)
    sizes = {"per_device_prompt_batch_size": 4, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8}
    sizes.update({"max_dec_len": 6} if "max_dec_len" in config else {"max_new_tokens": 6})
    config = shrunk(config, tiny_dir, tmp_path / "ppo", **sizes)
    config.pop("normalize_reward", None)  # the tiny base model carries no reward statistics to normalise with
    # the reward model must carry a score head (a causal LM is refused): the base with a fresh head, saved
    from paddlenlp.transformers import AutoTokenizer

    from ppo.models import load_score_model
    load_score_model(str(tiny_dir / "base")).save_pretrained(str(tmp_path / "score"))
    AutoTokenizer.from_pretrained(str(tiny_dir / "base")).save_pretrained(str(tmp_path / "score"))
    config["reward_model_name_or_path"] = str(tmp_path / "score")
    run_main("ppo.run_ppo", write(tmp_path, name, config))
    assert os.path.isfile(tmp_path / "ppo" / "policy" / "model.safetensors")
    assert_no_pickles(tmp_path / "ppo")  # nothing the run wrote runs code when read


# ---------------------------------------------------------------------------------------------
# The mapping itself


def parse(cls, config: dict, tmp_path, *argv):
    return parse_args(cls, [write(tmp_path, "c.json", config), *argv])


BASE = {"train_datasets": "tiny-prompts/train"}
PPO_BASE = {**BASE, "reward_model_name_or_path": "some/rm"}  # PPO needs a reward to validate


def test_renamed_keys_set_their_fields(tmp_path):
    args = parse(PPOArgs, {**PPO_BASE, "use_fusemt": 0, "max_dec_len": 7, "rollout_n": 3}, tmp_path)
    assert args.use_inference_model is False and args.max_new_tokens == 7 and args.num_return_sequences == 3
    assert parse(SFTArgs, {"dataset_name_or_path": "tiny-sft"}, tmp_path).train_datasets == "tiny-sft"
    with pytest.raises(UserError, match="'use_fusemt' is PaddleNLP's name of 'use_inference_model'"):
        parse(PPOArgs, {**PPO_BASE, "use_fusemt": 0, "use_inference_model": True}, tmp_path)
    # a PPO key in an SFT file is as unknown as any other
    with pytest.raises(UserError, match="unknown argument 'use_fusemt'"):
        parse(SFTArgs, {**BASE, "use_fusemt": 1}, tmp_path)


def test_strategies_and_switches_change_the_parsed_args(tmp_path):
    args = parse(SFTArgs, {**BASE, "eval_datasets": "x", "eval_split_ratio": 0.1, "eval_steps": 5,
                           "evaluation_strategy": "no"}, tmp_path)
    assert (args.eval_datasets, args.eval_split_ratio, args.eval_steps) == ("", 0.0, 0)
    args = parse(SFTArgs, {**BASE, "eval_datasets": "x", "eval_steps": 5, "do_eval": False}, tmp_path)
    assert (args.eval_datasets, args.eval_steps) == ("", 0)
    args = parse(RewardArgs, {**BASE, "eval_datasets": "x", "eval_steps": 5, "do_eval": True}, tmp_path)
    assert (args.eval_datasets, args.eval_steps) == ("x", 5)
    args = parse(PPOArgs, {**PPO_BASE, "recompute": 1, "recompute_granularity": "core_attn", "critic_recompute": True,
                           "dataloader_drop_last": 0, "overwrite_output_dir": True}, tmp_path)
    assert args.recompute and args.recompute_granularity == "core_attn" and args.critic_recompute
    assert args.dataloader_drop_last is False and args.overwrite_output_dir is True
    with pytest.raises(UserError, match="'do_train' is false"):
        parse(SFTArgs, {**BASE, "do_train": False}, tmp_path)
    with pytest.raises(UserError, match="'recompute_granularity' must be one of"):
        parse(SFTArgs, {**BASE, "recompute_granularity": "selective"}, tmp_path)


def test_step_cadence_follows_the_strategies():
    from types import SimpleNamespace

    from ppo.core.metrics import StepCadence

    def events(**kw):
        args = SimpleNamespace(logging_steps=100, eval_steps=3, save_steps=2, num_train_epochs=2, max_steps=-1,
                               evaluation_strategy="steps", save_strategy="steps")
        spe = kw.pop("spe", 4)
        vars(args).update(kw)
        seen = []
        cadence = StepCadence(args, 10, None, lambda step, echo: seen.append(("eval", step)),
                              lambda step: seen.append(("save", step)), steps_per_epoch=spe)
        for done in range(1, 11):
            cadence.end_of_step(done, None, print)
        return seen

    assert events() == [("save", 2), ("eval", 3), ("save", 4), ("eval", 6), ("save", 6), ("save", 8), ("eval", 9)]
    assert events(evaluation_strategy="epoch", save_strategy="no") == [("eval", 4), ("eval", 8)]
    assert events(evaluation_strategy="no", save_strategy="epoch", spe=5) == [("save", 5)]


def test_drop_last_false_completes_the_last_batch():
    from ppo.core.batching import GlobalBatchSampler

    kept = GlobalBatchSampler(10, per_device_batch=4, seed=1, drop_last=False)
    assert kept.steps_per_epoch == 3
    steps = [kept.micro_batches(s)[0] for s in range(3)]
    seen = [i for b in steps for i in b]
    assert sorted(set(seen)) == list(range(10))  # every sample of the epoch is trained on
    assert seen[10:] == seen[:2]  # the last batch completed with the epoch's first samples
    assert GlobalBatchSampler(10, per_device_batch=4, seed=1).steps_per_epoch == 2


def test_no_effect_keys_notice_once_each(tmp_path, capsys):
    import ppo.args.paddlenlp

    ppo.args.paddlenlp._noticed.clear()
    ignored = {k: 1 for k, v in PADDLENLP_KEYS.items() if isinstance(v, NoEffect)}
    parse(PPOArgs, {**PPO_BASE, **ignored}, tmp_path)
    parse(PPOArgs, {**PPO_BASE, **ignored}, tmp_path)
    lines = capsys.readouterr().err.splitlines()
    for key, entry in PADDLENLP_KEYS.items():
        if isinstance(entry, NoEffect):
            assert lines.count(f"notice: argument '{key}' (PaddleNLP) has no effect here: {entry.why}") == 1, key


def test_unknown_key_still_stops(tmp_path):
    with pytest.raises(UserError, match=r"unknown argument 'recompute_granularty' \(did you mean 'recompute_granularity'\?\)"):
        parse(SFTArgs, {**BASE, "recompute_granularty": "full"}, tmp_path)
    with pytest.raises(UserError, match="unknown argument 'dpop_lambda'"):  # PaddleNLP's, not honoured here
        parse(SFTArgs, {**BASE, "dpop_lambda": 50}, tmp_path)


# ---------------------------------------------------------------------------------------------
# Relative paths


def test_config_paths_resolve_from_the_project_root(tmp_path, monkeypatch):
    preset = os.path.join(PROJECT_ROOT, "config", "tiny", "ppo_argument.json")
    monkeypatch.chdir(PROJECT_ROOT)
    at_root = parse_args(PPOArgs, [preset])
    monkeypatch.chdir(os.path.join(PROJECT_ROOT, "ppo"))
    in_ppo = parse_args(PPOArgs, [os.path.relpath(preset), "--offload_dir", "here"])
    assert at_root.actor_model_name_or_path == "output/tiny/sft"
    assert in_ppo.actor_model_name_or_path == os.path.join("..", "output", "tiny", "sft")
    assert in_ppo.output_dir == os.path.join("..", "output", "tiny", "ppo")
    assert in_ppo.offload_dir == "here"  # the command line resolves against the current folder
    assert in_ppo.train_datasets == "tiny-prompts/train"  # names are not paths
    config = {**BASE, "reward_functions": "math_exact", "adv_estimator": "grpo", "num_return_sequences": 2,
              "train_datasets": "a:0.5:data/x.jsonl,b", "extra_modules": "json,my/data.py",
              "resume_from_checkpoint": "auto"}
    args = parse(PPOArgs, config, tmp_path)
    up = os.path.join("..", "")
    assert args.train_datasets == f"a:0.5:{up}data/x.jsonl,b" and args.extra_modules == f"json,{up}my/data.py"
    assert args.resume_from_checkpoint == "auto"


@pytest.mark.parametrize("folder", [".", "ppo"])
def test_missing_preset_model_names_the_command(folder, tmp_path):
    env = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
    script = os.path.join(PROJECT_ROOT, "ppo", "run_sft.py")
    preset = os.path.relpath(os.path.join(PROJECT_ROOT, "config", "tiny", "sft_argument.json"),
                             os.path.join(PROJECT_ROOT, folder))
    # an output folder of its own: the checkout's output/ may hold a built example
    proc = subprocess.run([sys.executable, script, preset, "--model_name_or_path",
                           os.path.relpath(os.path.join(PROJECT_ROOT, "output", "tiny", "no-such-model"),
                                           os.path.join(PROJECT_ROOT, folder))],
                          cwd=os.path.join(PROJECT_ROOT, folder), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 'model_name_or_path' folder") and "python -m ppo.tiny.pipeline" in last


@pytest.mark.distributed
def test_the_seed_command_from_inside_ppo_runs_through_the_launcher(tmp_path):
    """``cd ppo && python -m paddle.distributed.launch run_ppo.py ../config/...``, the seed's own
    command, still finds the package from inside its folder (its subpackages do not shadow other
    modules): the whole import chain of the PPO stage loads and a missing preset is one line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--log_dir", str(tmp_path / "logs"),
                           "run_ppo.py", "../config/tiny/ppo_argument.json",
                           "--actor_model_name_or_path", "../output/tiny/no-such-model"],
                          cwd=os.path.join(PROJECT_ROOT, "ppo"), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = (tmp_path / "logs" / "workerlog.0").read_text().strip().splitlines()[-1]
    assert last.startswith("error: 'actor_model_name_or_path' folder '../output/tiny/no-such-model' does not exist")
