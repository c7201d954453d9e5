"""Bad input through the real entry points: exit status 2, one ``error: ...`` line, checkpoints untouched.

Every case runs an entry point (SFT ``ppo/run_sft.py``, reward model ``rm/run_reward.py``, PPO
``ppo/run_ppo.py``, DPO ``dpo/run_dpo.py``) on one mistake and checks that

* the process exits with status 2;
* the last stderr line starts with ``error: `` and is the only line that mentions the problem
  (no traceback anywhere on stderr);
* that line names the offending input and what is accepted;
* ``output_dir`` already holds a finished reward-model run with a complete ``checkpoint-1``
  (written once by a real tiny training run): afterwards every file it held is byte-identical,
  the checkpoint is still complete and no new checkpoint folder appeared.

Most cases call the entry point in-process (``run_entry(main, argv)``) and read file descriptor 2
with ``capfd``, so log lines written by paddle/paddlenlp handlers count as well.  A few cases run
the scripts as real processes, and the world-size case goes through ``paddle.distributed.launch``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_DATA = os.path.join(ROOT, "tests", "data", "bad")
SCRIPTS = {"sft": "ppo/run_sft.py", "rm": "rm/run_reward.py", "ppo": "ppo/run_ppo.py", "dpo": "dpo/run_dpo.py"}


# ---------------------------------------------------------------------------------------------
# Configs of the three stages (small settings; every bad input fails before training)


def base_config(stage: str) -> dict:
    """The stage's tiny example config pointed at the fixture models, with placeholders for paths."""
    with open(os.path.join(ROOT, "config", "tiny", f"{stage}_argument.json")) as f:
        config = json.load(f)
    config.update(output_dir="{OUT}", logging_steps=1, disable_tqdm=True)
    if stage == "sft":
        config.update(model_name_or_path="{BASE}", max_steps=1, per_device_train_batch_size=4, eval_split_ratio=0.0)
    elif stage == "dpo":
        config.update(model_name_or_path="{BASE}", max_steps=1, per_device_train_batch_size=4, eval_datasets="")
    elif stage == "rm":
        # the same arguments as the run that wrote checkpoint-1 (resume compares them)
        config.update(model_name_or_path="{BASE}", max_steps=2, save_steps=1, eval_datasets="",
                      per_device_train_batch_size=16)
    else:
        config.update(actor_model_name_or_path="{BASE}", reward_model_name_or_path="{RM}", max_steps=1,
                      max_new_tokens=4, per_device_prompt_batch_size=4, per_device_train_batch_size=4,
                      per_device_eval_batch_size=4, eval_datasets="", eval_steps=0)
    return config


def fill(value, paths: dict):
    """``value`` with every ``{NAME}`` placeholder of ``paths`` replaced (strings, lists, dicts)."""
    if isinstance(value, str):
        for key, path in paths.items():
            value = value.replace("{" + key + "}", str(path))
        return value
    if isinstance(value, dict):
        return {k: fill(v, paths) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fill(v, paths) for v in value)
    return value


def entry_main(stage: str):
    if stage == "sft":
        from ppo.run_sft import main
    elif stage == "rm":
        from rm.run_reward import main
    elif stage == "dpo":
        from dpo.run_dpo import main
    else:
        from ppo.run_ppo import main
    return main


# ---------------------------------------------------------------------------------------------
# Shared models and the finished run whose checkpoint must survive every case


@pytest.fixture(scope="module")
def workspace(tiny_dir, tmp_path_factory):
    """Paths of the fixture models: {BASE}, {RM} (a finished reward-model run with checkpoint-1),
    {SCORE2} (a score model with a 2-dim head), {NOPAD} (a model whose tokenizer has neither pad nor
    eos), {VOCAB200} (a model with another tokenizer) and damaged copies of models, tokenizers and
    checkpoints (see below)."""
    from paddlenlp.transformers import AutoTokenizer

    from ppo.storage import checkpoint
    from ppo.models import load_score_model
    from ppo.tiny.build import build_llama, build_tokenizer
    from ppo.tiny.task import corpus
    from ppo.stages.entry import run_entry

    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {"BASE": tiny_dir / "base", "RM": root / "rm_run", "SCORE2": root / "score2",
             "NOPAD": root / "nopad", "VOCAB200": root / "vocab200", "BAD": BAD_DATA}

    # a real reward-model run: checkpoint-1 (resumable) and the final model in the same folder
    config = fill(base_config("rm"), {**paths, "OUT": paths["RM"]})
    (root / "rm_run.json").write_text(json.dumps(config))
    run_entry(entry_main("rm"), [str(root / "rm_run.json")])
    assert checkpoint.list_checkpoints(str(paths["RM"])) == [(1, str(paths["RM"] / "checkpoint-1"))]
    assert json.load(open(paths["RM"] / "config.json"))["score_dim"] == 1

    # a score model whose head has two outputs
    score2 = load_score_model(str(tiny_dir / "base"), score_dim=2)
    score2.save_pretrained(str(paths["SCORE2"]))
    AutoTokenizer.from_pretrained(str(tiny_dir / "base")).save_pretrained(str(paths["SCORE2"]))
    assert json.load(open(paths["SCORE2"] / "config.json"))["score_dim"] == 2

    # the tiny model with a tokenizer that has no pad token and no eos token
    shutil.copytree(tiny_dir / "base", paths["NOPAD"])
    tokenizer = build_tokenizer(str(paths["NOPAD"]), with_pad=False)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(str(paths["NOPAD"]))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = paths["NOPAD"] / name
        data = json.load(open(file))
        data.pop("pad_token", None)
        data["eos_token"] = None
        file.write_text(json.dumps(data))
    reloaded = AutoTokenizer.from_pretrained(str(paths["NOPAD"]))
    assert reloaded.pad_token is None and reloaded.eos_token is None

    # a model with a smaller vocabulary (another tokenizer)
    other = build_tokenizer(str(paths["VOCAB200"]), vocab_size=200, texts=list(corpus())[:800])
    build_llama(str(paths["VOCAB200"]), other)
    assert len(other) != len(AutoTokenizer.from_pretrained(str(tiny_dir / "base")))
    # damaged copies: a model missing one trained tensor, one with truncated weights, one whose
    # config.json is not JSON, and a finished run whose checkpoint state files are garbage of the
    # right size (the manifest still matches, so only reading them finds the damage)
    import paddle

    for name in ("PARTIAL", "TRUNC", "BADCONFIG"):
        paths[name] = root / name.lower()
        shutil.copytree(tiny_dir / "base", paths[name])
    # a model folder with its config but without any weights file
    paths["NOWEIGHTS"] = root / "noweights"
    shutil.copytree(tiny_dir / "base", paths["NOWEIGHTS"], ignore=shutil.ignore_patterns("*.pdparams", "*.safetensors"))
    from ppo.storage.tensors import read_tensors, save_tensors

    weights = paths["PARTIAL"] / "model.safetensors"
    state = read_tensors(str(weights))
    del state[next(k for k in state if "layers.0." in k)]
    save_tensors(state, str(weights), {"format": "np"})
    blob = (paths["TRUNC"] / "model.safetensors").read_bytes()
    (paths["TRUNC"] / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    (paths["BADCONFIG"] / "config.json").write_text('{"model_type": "llama",')
    # damaged tokenizer files: tokenizer_config.json cut in half, a tokenizer.json (a fast tokenizer's,
    # beside the model) cut in half, the sentencepiece model replaced by bytes of the same length
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    for name in ("TOKCONFIG", "TOKJSON", "SPM"):
        paths[name] = root / name.lower()
        shutil.copytree(tiny_dir / "base", paths[name])
    text = (paths["TOKCONFIG"] / "tokenizer_config.json").read_text()
    (paths["TOKCONFIG"] / "tokenizer_config.json").write_text(text[:len(text) // 2])
    fast = Tokenizer(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.Whitespace()
    fast.train_from_iterator(list(corpus())[:200], trainers.BpeTrainer(vocab_size=100))
    text = fast.to_str()
    (paths["TOKJSON"] / "tokenizer.json").write_text(text[:len(text) // 2])
    paths["RM_SPM"] = root / "rm_spm"
    shutil.copytree(paths["RM"], paths["RM_SPM"])
    for key in ("SPM", "RM_SPM"):
        model = paths[key] / "sentencepiece.bpe.model"
        model.write_bytes(bytes(range(256)) * (model.stat().st_size // 256))
    for key, name in (("DAMAGED", "trainer_state.json"), ("DAMAGED_RNG", "rng.rank0.json")):
        paths[key] = root / key.lower()
        shutil.copytree(paths["RM"], paths[key])
        file = paths[key] / "checkpoint-1" / name
        file.write_bytes(b"#" * file.stat().st_size)
        assert checkpoint.list_checkpoints(str(paths[key]))
    paths["session_stderr"] = sys.stderr  # see route_log_handlers_to_stderr
    return paths


def route_log_handlers_to_stderr(monkeypatch, session_stderr) -> None:
    """Log handlers made at import time hold the stream ``sys.stderr`` was then (pytest's session
    capture); point them at the current ``sys.stderr`` so their lines are checked like the rest."""
    import logging

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
                continue
            stream = getattr(handler, "stream", None)
            if stream is session_stderr or stream is sys.__stderr__ or getattr(stream, "name", None) == "<stderr>":
                monkeypatch.setattr(handler, "stream", sys.stderr)


def make_output_dir(workspace, target) -> tuple[str, dict]:
    """A copy of the finished run (final model + complete checkpoint-1) and its file hashes."""
    shutil.copytree(workspace["RM"], target)
    return str(target), snapshot(str(target))


def snapshot(folder: str) -> dict:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_untouched(folder: str, before: dict) -> None:
    from ppo.storage import checkpoint

    after = snapshot(folder)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"files of the previous run changed or vanished: {changed}"
    tops = {p.split(os.sep)[0] for p in before}
    new = sorted(n for n in os.listdir(folder) if n not in tops
                 and (n.startswith(("checkpoint-", ".tmp-", ".old-")) or n in ("model.safetensors", "model_state.pdparams")))
    assert not new, f"new checkpoint/model files in output_dir: {new}"
    assert checkpoint.list_checkpoints(folder) == [(1, os.path.join(folder, "checkpoint-1"))]


def assert_one_line_error(code, err: str, expect, needle: str) -> None:
    """Exit 2; the last stderr line is ``error: ...`` holding every ``expect`` fragment; ``needle``
    (the problem) appears on no other line; no traceback."""
    tail = "\n".join(err.splitlines()[-15:])
    assert code == 2, f"exit status {code}, expected 2; stderr tail:\n{tail}"
    assert "Traceback" not in err, f"traceback on stderr:\n{tail}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith("error: "), f"last stderr line is not 'error: ...':\n{tail}"
    assert sum(line.startswith("error:") for line in lines) == 1, tail
    missing = [frag for frag in expect if frag not in last]
    assert not missing, f"error line lacks {missing}:\n{last}"
    others = [line for line in lines[:-1] if needle.lower() in line.lower()]
    assert not others, f"{needle!r} is also mentioned on other stderr lines:\n" + "\n".join(others)


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    id: str
    stage: str                      # sft | rm | ppo
    expect: tuple                   # fragments of the error line: the offending input and what is accepted
    needle: str                     # the problem, mentioned by the error line only
    changes: dict = field(default_factory=dict)   # config file entries
    argv: tuple = ()                # command-line overrides after the config file
    env: dict = field(default_factory=dict)
    config_text: str | None = None  # raw config file text (instead of base config + changes)
    config_path: str | None = None  # a config path that is not written


JSON_WITH_SYNTAX_ERROR = '{\n  "model_name_or_path": "{BASE}",\n  "max_steps": 1,,\n  "output_dir": "{OUT}"\n}\n'

CASES = [
    # -- arguments: names, types, ranges ---------------------------------------------------
    Case("unknown-key-in-json", "rm", changes={"learning_rat": 0.001},
         expect=("config file '{CONFIG}'", "unknown argument 'learning_rat'", "(did you mean 'learning_rate'?)", "--help"),
         needle="'learning_rat'"),
    Case("unknown-key-on-command-line", "sft", argv=("--per_device_train_batchsize", "4"),
         expect=("unknown argument 'per_device_train_batchsize'", "(did you mean 'per_device_train_batch_size'?)"),
         needle="batchsize"),
    Case("unknown-key-ppo", "ppo", argv=("--kl_coef", "0.1"),
         expect=("unknown argument 'kl_coef'", "(did you mean 'kl_coeff'?)"), needle="kl_coef'"),
    Case("wrong-type-int", "rm", changes={"per_device_train_batch_size": "sixteen"},
         expect=("'per_device_train_batch_size'", "must be int", "'sixteen'"), needle="sixteen"),
    Case("wrong-type-bool", "ppo", argv=("--do_sample", "maybe"),
         expect=("'do_sample'", "must be bool", "'maybe'"), needle="maybe"),
    Case("unknown-choice", "sft", changes={"lr_scheduler_type": "cosin"},
         expect=("'lr_scheduler_type'", "'constant'", "'linear'", "'cosine'", "'cosin'"), needle="cosin'"),
    Case("negative-learning-rate", "sft", argv=("--learning_rate", "-0.001"),
         expect=("'learning_rate'", "must be > 0", "-0.001"), needle="learning_rate"),
    Case("negative-critic-learning-rate", "ppo", changes={"critic_learning_rate": -5e-6},
         expect=("'critic_learning_rate'", "must be > 0", "-5e-06"), needle="critic_learning_rate"),
    Case("clip-range-ratio-zero", "ppo", changes={"clip_range_ratio": 0},
         expect=("'clip_range_ratio'", "must be > 0", "got 0"), needle="clip_range_ratio"),
    Case("clip-range-value-negative", "ppo", argv=("--clip_range_value", "-1"),
         expect=("'clip_range_value'", "must be > 0", "-1"), needle="clip_range_value"),
    Case("clip-range-score-zero", "ppo", changes={"clip_range_score": 0.0},
         expect=("'clip_range_score'", "must be > 0", "got 0"), needle="clip_range_score"),
    Case("top-p-out-of-range", "ppo", argv=("--top_p", "1.5"),
         expect=("'top_p'", "(0, 1]", "1.5"), needle="top_p"),
    Case("rollout-micro-batch-negative", "ppo", argv=("--rollout_micro_batch_size", "-1"),
         expect=("'rollout_micro_batch_size'", "must be >= 0", "got -1"), needle="rollout_micro_batch_size"),
    Case("eval-samples-negative", "ppo", argv=("--eval_samples_to_write", "-2"),
         expect=("'eval_samples_to_write'", "must be >= 0", "got -2"), needle="eval_samples_to_write"),
    Case("grpo-needs-two-samples", "ppo", changes={"adv_estimator": "grpo", "num_return_sequences": 1},
         expect=("adv_estimator 'grpo'", "num_return_sequences must be >= 2", "got 1"), needle="num_return_sequences"),
    # -- config file ------------------------------------------------------------------------
    Case("json-syntax-error", "rm", config_text=JSON_WITH_SYNTAX_ERROR,
         expect=("config file '{CONFIG}'", "not valid JSON", "at line 3 column 18"), needle="JSON"),
    Case("missing-config-file", "ppo", config_path="{MISSING}/ppo_argument.json",
         expect=("config file '{MISSING}/ppo_argument.json'", "does not exist"), needle="ppo_argument.json"),
    # -- parallel layout ----------------------------------------------------------------------
    Case("degree-does-not-divide-one-process", "sft", argv=("--tensor_parallel_degree", "2"),
         expect=("tensor_parallel_degree (2)", "does not divide the world size 1"), needle="divide"),
    # the launcher sets PADDLE_TRAINERS_NUM in every rank; the check runs before fleet starts
    Case("sharding-stage2-with-tensor-parallel", "rm", env={"PADDLE_TRAINERS_NUM": "4"},
         argv=("--sharding_parallel_degree", "2", "--sharding", "stage2", "--tensor_parallel_degree", "2"),
         expect=("sharding 'stage2' shards over all data ranks alone", "world size 4", "'stage1'"),
         needle="stage2"),
    Case("pipeline-for-the-reward-model", "rm", env={"PADDLE_TRAINERS_NUM": "2"},
         argv=("--pipeline_parallel_degree", "2"),
         expect=("pipeline_parallel_degree > 1 is supported for PPO", "tensor parallel, sharding and data parallel"),
         needle="pipeline"),
    Case("pipeline-with-sharding-stage2", "ppo", env={"PADDLE_TRAINERS_NUM": "4"},
         argv=("--pipeline_parallel_degree", "2", "--sharding_parallel_degree", "2", "--sharding", "stage2"),
         expect=("sharding 'stage2' shards over all data ranks alone", "'stage1'"), needle="stage2"),
    Case("unknown-eval-mode", "ppo", argv=("--eval_mode", "pipeline"),
         expect=("'eval_mode' must be one of", "'single'", "'tensor_parallel'"), needle="eval_mode"),
    Case("train-model-offload-with-sharding-stage2", "ppo",
         argv=("--sharding_parallel_degree", "2", "--sharding", "stage2", "--offload_level", "freeze_model train_model"),
         expect=("offload_level 'train_model' does not combine with sharding 'stage2'", "'stage1'"),
         needle="train_model"),
    Case("batch-sizes-not-divisible", "ppo", argv=("--per_device_train_batch_size", "3"),
         expect=("per_device_prompt_batch_size x num_return_sequences = 4",
                 "per_device_train_batch_size x gradient_accumulation_steps = 3", "divisible"),
         needle="divisible"),
    # -- datasets -----------------------------------------------------------------------------
    Case("unknown-dataset-name", "rm", changes={"train_datasets": "tiny-preferences/train"},
         expect=("unknown dataset 'tiny-preferences/train'", "(did you mean 'tiny-preference/train'?)",
                 "registered", "tiny-preference/test", "PKU-SafeRLHF/train", "alpaca"),
         needle="tiny-preferences"),
    Case("unknown-ptx-dataset-name", "ppo", changes={"ptx_datasets": "tiny-sftt"},
         expect=("unknown dataset 'tiny-sftt'", "(did you mean 'tiny-sft'?)", "registered"), needle="tiny-sftt"),
    Case("malformed-dataset-spec", "sft", changes={"train_datasets": "tiny-sft:abc"},
         expect=("'tiny-sft:abc'", "proportion 'abc'", "not a number", "NAME[:PROPORTION[:PATH]]"), needle="abc"),
    Case("negative-dataset-proportion", "rm", changes={"train_datasets": "tiny-preference/train:-1"},
         expect=("'tiny-preference/train:-1'", "must be a number > 0", "NAME[:PROPORTION[:PATH]]"), needle=":-1"),
    Case("missing-data-path", "rm", changes={"train_datasets": "tiny-preference/train:1:{MISSING}/pairs.jsonl"},
         expect=("'{MISSING}/pairs.jsonl'", "does not exist", ".jsonl", "folder"), needle="pairs.jsonl"),
    Case("data-with-wrong-schema", "sft", changes={"train_datasets": "tiny-sft:1:{BAD}/missing_field.jsonl"},
         expect=("missing_field.jsonl", "record 0", "missing field(s) 'answer'", "expected fields: prompt, answer"),
         needle="missing field"),
    Case("data-not-json", "rm", changes={"train_datasets": "tiny-preference/train:1:{BAD}/not_json.jsonl"},
         expect=("not_json.jsonl", "could not be read as json records"), needle="not_json.jsonl"),
    Case("empty-data-file", "ppo", changes={"train_datasets": "tiny-prompts/train:1:{BAD}/empty.jsonl"},
         expect=("'{BAD}/empty.jsonl'", "is empty", "json records"), needle="empty.jsonl"),
    Case("preference-pairs-all-identical", "rm",
         changes={"train_datasets": "tiny-preference/train:1:{BAD}/identical_pairs.jsonl"},
         expect=("all 6 pairs", "identical_pairs.jsonl", "identical answers", "answers differ"),
         needle="identical answers"),
    # -- models and tokenizers ------------------------------------------------------------------
    Case("model-path-missing", "sft", changes={"model_name_or_path": "{MISSING}/model"},
         expect=("'model_name_or_path'", "'{MISSING}/model'", "not a model folder", "config.json"),
         needle="not a model folder"),
    Case("actor-path-missing", "ppo", changes={"actor_model_name_or_path": "{MISSING}/sft"},
         expect=("'actor_model_name_or_path'", "'{MISSING}/sft'", "not a model folder", "config.json"),
         needle="not a model folder"),
    Case("score-head-dim-mismatch", "ppo", changes={"reward_model_name_or_path": "{SCORE2}"},
         expect=("'reward_model_name_or_path'", "'{SCORE2}'", "score head of dim 2", "score_dim=1"),
         needle="score head"),
    Case("tokenizer-without-pad-and-eos", "sft", changes={"model_name_or_path": "{NOPAD}"},
         expect=("'{NOPAD}'", "neither a pad nor an eos token", "pad_token"), needle="not set"),
    Case("critic-vocabulary-mismatch", "ppo", changes={"reward_critic_model_name_or_path": "{VOCAB200}"},
         expect=("'{VOCAB200}'", "must share the actor's vocabulary"), needle="vocabulary"),
    Case("max-length-above-position-limit", "rm", changes={"max_length": 1000},
         expect=("max_length=1000", "exceeds the position limit 256", "'{BASE}'"), needle="position limit"),
    Case("offload-level-unknown-word", "ppo", changes={"offload_level": "freeze_models optimizer"},
         expect=("offload_level", "unknown word 'freeze_models'", "(did you mean 'freeze_model'?)",
                 "freeze_model, optimizer, train_model"), needle="freeze_models"),
    # -- output folder and resume ---------------------------------------------------------------
    Case("output-dir-under-a-file", "sft", changes={"output_dir": "{FILE}/out"},
         expect=("output_dir '{FILE}/out'", "not writable", "Not a directory"), needle="writable"),
    Case("resume-from-a-model-not-a-checkpoint", "rm", changes={"resume_from_checkpoint": "{BASE}"},
         expect=("resume_from_checkpoint '{BASE}'", "not a checkpoint folder", "trainer_state.json",
                 "checkpoint-N", "'auto'"), needle="not a checkpoint"),
    Case("resume-with-another-batch-size", "rm",
         changes={"resume_from_checkpoint": "{OUT}/checkpoint-1", "per_device_train_batch_size": 8},
         expect=("cannot resume from '{OUT}/checkpoint-1'", "'per_device_train_batch_size' was 16 there and is 8 now"),
         needle="cannot resume"),
    Case("resume-auto-with-another-seed", "rm", changes={"resume_from_checkpoint": "auto", "seed": 7},
         expect=("cannot resume from '{OUT}/checkpoint-1'", "'seed' was 42 there and is 7 now"),
         needle="cannot resume"),
]


# -- the systematic sweep, by class (issue 13): every argument's declared range and finiteness, --
# -- every file read through ppo/storage/files.py, every model checked for its role ------------------

# (stage, key, bad value, the range the error line must state): one per kind of argument
RANGE_SWEEP = [
    ("rm", "seed", -1, "in [0, 4294967296)"),
    ("sft", "seed", 2**32, "in [0, 4294967296)"),
    ("ppo", "temperature", float("nan"), "a finite number > 0"),
    ("ppo", "temperature", float("inf"), "a finite number > 0"),
    ("sft", "learning_rate", float("nan"), "a finite number > 0"),
    ("ppo", "missing_eos_penalty", float("-inf"), "a finite number"),
    ("ppo", "repetition_penalty", 0.0, "> 0"),
    ("ppo", "top_k", -1, ">= 0"),
    ("ppo", "kl_horizon", 0, ">= 1"),
    ("ppo", "kl_target", -6.0, "> 0"),
    ("ppo", "max_new_tokens", 0, ">= 1"),
    ("rm", "logging_steps", 0, ">= 1"),
    ("rm", "eval_steps", -1, ">= 0"),
    ("sft", "save_steps", -5, ">= 0"),
    ("rm", "save_total_limit", 0, ">= 1"),
    ("rm", "normalizer_momentum", 1.0, "in [0, 1)"),
    ("ppo", "gamma", 1.5, "in [0, 1]"),
    ("ppo", "ptx_coeff", -1.0, ">= 0"),
    ("sft", "max_grad_norm", -1.0, ">= 0"),
    ("rm", "tensor_parallel_degree", 0, ">= 1"),
]
CASES += [Case(f"range-{stage}-{key}-{value}", stage, changes={key: value},
               expect=(f"'{key}' must be {accepted}", f"got {value}"), needle=f"'{key}'")
          for stage, key, value, accepted in RANGE_SWEEP]

CASES += [
    # arguments that only fail together
    Case("length-budget-holds-no-prompt", "ppo", changes={"max_length": 64, "max_new_tokens": 64},
         expect=("'max_new_tokens' (64) must be < 'max_length' (64)", "prompt + response"), needle="no prompt"),
    Case("dataset-proportion-exhausts-memory", "sft", changes={"train_datasets": "tiny-sft:1e6"},
         expect=("'tiny-sft:1e6'", "must be at most 100", "NAME[:PROPORTION[:PATH]]"), needle="at most 100"),
    # files: every read goes through ppo/storage/files.py and fails with one line naming the file
    Case("config-duplicate-key", "sft", config_text='{"model_name_or_path": "{BASE}", "max_steps": 1, '
                                                    '"max_steps": 2, "output_dir": "{OUT}"}',
         expect=("config file '{CONFIG}'", "key 'max_steps' appears twice", "give each key once"),
         needle="twice"),
    Case("model-config-not-json", "sft", changes={"model_name_or_path": "{BADCONFIG}"},
         expect=("model config '{BADCONFIG}/config.json'", "not valid JSON"), needle="not valid JSON"),
    Case("model-weights-truncated", "sft", changes={"model_name_or_path": "{TRUNC}"},
         expect=("'{TRUNC}/model.safetensors'", "cannot be read (damaged, truncated or not safetensors?)"),
         needle="damaged"),
    Case("checkpoint-state-damaged", "rm", changes={"resume_from_checkpoint": "{DAMAGED}/checkpoint-1"},
         expect=("'{DAMAGED}/checkpoint-1' is damaged: file 'trainer_state.json' does not match its checksum",),
         needle="trainer_state.json"),
    Case("checkpoint-random-state-damaged", "rm", changes={"resume_from_checkpoint": "{DAMAGED_RNG}/checkpoint-1"},
         expect=("'{DAMAGED_RNG}/checkpoint-1' is damaged: file 'rng.rank0.json' does not match its checksum",),
         needle="rng.rank0.json"),
    Case("tokenizer-config-truncated", "sft", changes={"model_name_or_path": "{TOKCONFIG}"},
         expect=("tokenizer config '{TOKCONFIG}/tokenizer_config.json' is not valid JSON",), needle="not valid JSON"),
    Case("tokenizer-json-truncated", "ppo", changes={"actor_model_name_or_path": "{TOKJSON}"},
         expect=("tokenizer file '{TOKJSON}/tokenizer.json' is not valid JSON",), needle="not valid JSON"),
    Case("sentencepiece-model-garbage", "rm", changes={"model_name_or_path": "{SPM}"},
         expect=("sentencepiece model '{SPM}/sentencepiece.bpe.model' cannot be read (damaged or truncated?)",),
         needle="damaged"),
    # models of the wrong kind for their role
    Case("score-model-as-actor", "ppo", changes={"actor_model_name_or_path": "{RM}"},
         expect=("'actor_model_name_or_path' = '{RM}'", "is a score model", "give a causal LM"),
         needle="is a score model"),
    Case("score-model-as-sft-base", "sft", changes={"model_name_or_path": "{RM}"},
         expect=("'model_name_or_path' = '{RM}'", "is a score model", "give a causal LM"),
         needle="is a score model"),
    Case("causal-lm-as-reward-model", "ppo", changes={"reward_model_name_or_path": "{BASE}"},
         expect=("'reward_model_name_or_path' = '{BASE}'", "causal LM without a trained score head",
                 "rm/run_reward.py"), needle="trained score head"),
    Case("actor-missing-a-trained-tensor", "ppo", changes={"actor_model_name_or_path": "{PARTIAL}"},
         expect=("'actor_model_name_or_path' = '{PARTIAL}'", "lacks 1 trained tensor(s)", "layers.0."),
         needle="trained tensor"),
    Case("model-folder-without-weights", "sft", changes={"model_name_or_path": "{NOWEIGHTS}"},
         expect=("'model_name_or_path' = '{NOWEIGHTS}'", "has a config.json but no weights"), needle="no weights"),
    Case("reference-folder-without-weights", "dpo", changes={"ref_model_name_or_path": "{NOWEIGHTS}"},
         expect=("'ref_model_name_or_path' = '{NOWEIGHTS}'", "has a config.json but no weights"), needle="no weights"),
    Case("data-file-not-utf8", "sft", changes={"train_datasets": "tiny-sft:1:{BAD}/latin1.jsonl"},
         expect=("dataset file '{BAD}/latin1.jsonl' is not UTF-8 text (byte ",), needle="UTF-8"),
    Case("sft-base-missing-a-trained-tensor", "sft", changes={"model_name_or_path": "{PARTIAL}"},
         expect=("'model_name_or_path' = '{PARTIAL}'", "lacks 1 trained tensor(s)"), needle="trained tensor"),
]

# the DPO stage: every new argument, every preference layout's damaged forms, the reference model
DPO_DATA = "{BAD}/dpo"
CASES += [
    Case("dpo-unknown-loss-type", "dpo", changes={"loss_type": "sigmoid,dpop"},
         expect=("'loss_type' names unknown loss 'dpop'", "sigmoid, ipo, hinge, simpo, orpo, kto"), needle="dpop"),
    Case("dpo-empty-loss-type", "dpo", argv=("--loss_type", ","),
         expect=("'loss_type'", "must name one or more comma-separated losses"), needle="comma-separated losses"),
    Case("dpo-loss-named-twice", "dpo", changes={"loss_type": "ipo,ipo"},
         expect=("'loss_type' = 'ipo,ipo' names a loss twice",), needle="twice"),
    Case("dpo-loss-weight-not-finite", "dpo", changes={"loss_type": "sigmoid,ipo", "loss_weights": "1,nan"},
         expect=("'loss_weights' = '1,nan'", "finite numbers >= 0"), needle="finite"),
    Case("dpo-loss-weight-not-a-number", "dpo", changes={"loss_weights": "one"},
         expect=("'loss_weights' = 'one'", "comma-separated numbers"), needle="comma-separated numbers"),
    Case("dpo-loss-weights-count", "dpo", changes={"loss_type": "sigmoid,ipo", "loss_weights": "1"},
         expect=("'loss_weights' gives 1 weights for the 2 losses",), needle="weights for"),
    Case("dpo-kto-combined", "dpo", changes={"loss_type": "kto,sigmoid"},
         expect=("kto reads unpaired data and cannot be combined",), needle="combined"),
    Case("dpo-beta-zero", "dpo", changes={"beta": 0},
         expect=("'beta' must be > 0", "got 0"), needle="'beta'"),
    Case("dpo-beta-infinite", "dpo", argv=("--beta", "inf"),
         expect=("'beta' must be a finite number > 0", "got inf"), needle="'beta'"),
    Case("dpo-label-smoothing-half", "dpo", changes={"label_smoothing": 0.5},
         expect=("'label_smoothing' must be in [0, 0.5)", "got 0.5"), needle="label_smoothing"),
    Case("dpo-simpo-gamma-negative", "dpo", changes={"simpo_gamma": -1.0},
         expect=("'simpo_gamma' must be >= 0",), needle="simpo_gamma"),
    Case("dpo-unknown-reference-mode", "dpo", changes={"reference_mode": "copy"},
         expect=("'reference_mode' must be one of", "'model'", "'lora'", "'precompute'"), needle="'copy'"),
    Case("dpo-lora-reference-without-lora", "dpo", changes={"reference_mode": "lora"},
         expect=("'reference_mode' is 'lora'", "needs lora true"), needle="needs lora"),
    Case("dpo-pipeline-kto", "dpo", changes={"pipeline_parallel_degree": 2, "loss_type": "kto"},
         expect=("'pipeline_parallel_degree' > 1 trains packed pairs", "kto's unpaired"), needle="packed pairs"),
    Case("dpo-pipeline-lora", "dpo", changes={"pipeline_parallel_degree": 2, "lora": True},
         expect=("'lora' needs pipeline_parallel_degree 1",), needle="pipeline_parallel_degree 1"),
    Case("dpo-reference-missing", "dpo", changes={"ref_model_name_or_path": "{MISSING}/ref"},
         expect=("'ref_model_name_or_path' = '{MISSING}/ref'", "not a model folder"), needle="not a model folder"),
    Case("dpo-reference-is-a-score-model", "dpo", changes={"ref_model_name_or_path": "{RM}"},
         expect=("'ref_model_name_or_path' = '{RM}'", "is a score model"), needle="is a score model"),
    Case("dpo-reference-other-vocabulary", "dpo", changes={"ref_model_name_or_path": "{VOCAB200}"},
         expect=("'ref_model_name_or_path' = '{VOCAB200}'", "must share the policy's vocabulary"),
         needle="vocabulary"),
    Case("dpo-policy-is-a-score-model", "dpo", changes={"model_name_or_path": "{RM}"},
         expect=("'model_name_or_path' = '{RM}'", "is a score model"), needle="is a score model"),
    Case("dpo-identical-answers", "dpo", changes={"train_datasets": f"paddlenlp-dpo:1:{DPO_DATA}/identical_pair.jsonl"},
         expect=("identical_pair.jsonl", "record 0", "identical chosen and rejected answers"), needle="identical"),
    Case("dpo-empty-answer", "dpo",
         changes={"train_datasets": f"prompt-chosen-rejected:1:{DPO_DATA}/empty_answer.jsonl"},
         expect=("empty_answer.jsonl", "record 0 has an empty chosen answer"), needle="empty chosen"),
    Case("dpo-missing-field", "dpo", changes={"train_datasets": f"paddlenlp-dpo:1:{DPO_DATA}/missing_sort.jsonl"},
         expect=("missing_sort.jsonl", "missing field(s) 'sort'", "src, tgt, response, sort"), needle="'sort'"),
    Case("dpo-turns-do-not-match", "dpo",
         changes={"train_datasets": f"paddlenlp-dpo:1:{DPO_DATA}/turns_mismatch.jsonl"},
         expect=("turns_mismatch.jsonl", "2 user turns (src) and 0 assistant turns (tgt)", "expected 1"),
         needle="assistant turns"),
    Case("dpo-kto-label-not-boolean", "dpo", changes={"loss_type": "kto",
                                                      "train_datasets": f"prompt-completion-label:1:{DPO_DATA}/kto_bad_label.jsonl"},
         expect=("kto_bad_label.jsonl", "field 'label' is 'good'", "expected true"), needle="'label'"),
    Case("dpo-layout-without-path", "dpo", changes={"train_datasets": "paddlenlp-dpo"},
         expect=("dataset 'paddlenlp-dpo' reads a local file",), needle="local file"),
    Case("dpo-online-without-ranking", "dpo", changes={"online_rounds": 2},
         expect=("'online_rounds' > 0 needs a ranking", "online_reward_model_name_or_path"), needle="ranking"),
    Case("dpo-online-unknown-reward-function", "dpo", changes={"online_rounds": 1, "online_reward_functions": "tiny_gard"},
         expect=("unknown reward function 'tiny_gard'", "registered"), needle="tiny_gard"),
    Case("dpo-online-causal-lm-as-reward-model", "dpo",
         changes={"online_rounds": 1, "online_reward_model_name_or_path": "{BASE}"},
         expect=("'online_reward_model_name_or_path' = '{BASE}'", "without a trained score head"),
         needle="trained score head"),
    Case("dpo-online-kto", "dpo", changes={"online_rounds": 1, "online_reward_functions": "format", "loss_type": "kto"},
         expect=("'online_rounds' builds pairs", "not kto"), needle="builds pairs"),
    Case("dpo-online-no-room-for-the-prompt", "dpo",
         changes={"online_rounds": 1, "online_reward_functions": "format", "max_new_tokens": 64},
         expect=("'max_new_tokens' (64) must be < 'max_length' (64)",), needle="room"),
    Case("dpo-online-one-sample", "dpo", changes={"online_rounds": 1, "online_samples": 1},
         expect=("'online_samples' must be >= 2", "got 1"), needle="online_samples"),
    Case("dpo-data-not-json", "dpo", changes={"train_datasets": "paddlenlp-dpo:1:{BAD}/not_json.jsonl"},
         expect=("not_json.jsonl", "could not be read as json records"), needle="not_json.jsonl"),
]

assert len({c.id for c in CASES}) == len(CASES)


def case_paths(workspace, tmp_path) -> dict:
    file = tmp_path / "a_regular_file"
    file.write_text("not a folder\n")
    workspace = {k: v for k, v in workspace.items() if k != "session_stderr"}
    return {**workspace, "OUT": tmp_path / "out", "MISSING": tmp_path / "no-such-folder", "FILE": file}


def write_case_config(case: Case, paths: dict, tmp_path) -> str:
    if case.config_path is not None:
        return fill(case.config_path, paths)
    path = tmp_path / "config.json"
    if case.config_text is not None:
        path.write_text(fill(case.config_text, paths))
    else:
        config = base_config(case.stage)
        config.update(case.changes)
        path.write_text(json.dumps(fill(config, paths), indent=1))
    return str(path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_process(case, workspace, tmp_path, capfd, monkeypatch):
    from ppo.stages.entry import run_entry

    paths = case_paths(workspace, tmp_path)
    out, before = make_output_dir(workspace, paths["OUT"])
    config = write_case_config(case, paths, tmp_path)
    paths["CONFIG"] = config
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    route_log_handlers_to_stderr(monkeypatch, workspace["session_stderr"])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_entry(entry_main(case.stage), [config, *fill(case.argv, paths)])
    err = capfd.readouterr().err
    assert_one_line_error(exit_info.value.code, err, fill(case.expect, paths), case.needle)
    assert_untouched(out, before)


# ---------------------------------------------------------------------------------------------
# Real processes: the scripts as a user runs them


PROCESS_CASES = [
    Case("process-rm-json-syntax-error", "rm", config_text='{\n  "max_steps": 1,\n}\n',
         expect=("config file '{CONFIG}'", "not valid JSON", "at line 3 column 1"), needle="JSON"),
    Case("process-sft-unknown-dataset", "sft", changes={"train_datasets": "tiny-sfft"},
         expect=("unknown dataset 'tiny-sfft'", "(did you mean 'tiny-sft'?)", "registered"), needle="tiny-sfft"),
    Case("process-sft-tokenizer-without-pad-and-eos", "sft", changes={"model_name_or_path": "{NOPAD}"},
         expect=("'{NOPAD}'", "neither a pad nor an eos token", "pad_token"), needle="not set"),
    Case("process-ppo-score-head-dim-mismatch", "ppo", changes={"reward_model_name_or_path": "{SCORE2}"},
         expect=("'reward_model_name_or_path'", "'{SCORE2}'", "score head of dim 2", "score_dim=1"),
         needle="score head"),
    Case("process-ppo-causal-lm-as-reward-model", "ppo", changes={"reward_model_name_or_path": "{BASE}"},
         expect=("'reward_model_name_or_path' = '{BASE}'", "causal LM without a trained score head"),
         needle="trained score head"),
    Case("process-ppo-reward-sentencepiece-model-garbage", "ppo", changes={"reward_model_name_or_path": "{RM_SPM}"},
         expect=("sentencepiece model '{RM_SPM}/sentencepiece.bpe.model' cannot be read (damaged or truncated?)",),
         needle="damaged"),
    Case("process-rm-margin-nan", "rm", argv=("--margin", "nan"),
         expect=("'margin' must be a finite number >= 0", "got nan"), needle="'margin'"),
    Case("process-dpo-unknown-loss-type", "dpo", changes={"loss_type": "sigmod"},
         expect=("'loss_type' names unknown loss 'sigmod'", "(did you mean 'sigmoid'?)"), needle="sigmod"),
]


@pytest.mark.parametrize("case", PROCESS_CASES, ids=[c.id for c in PROCESS_CASES])
def test_bad_input_real_process(case, workspace, tmp_path):
    # one at a time: paddle's start-up is CPU bound, parallel processes are not faster on 2 cores
    paths = case_paths(workspace, tmp_path)
    out, before = make_output_dir(workspace, paths["OUT"])
    paths["CONFIG"] = write_case_config(case, paths, tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, SCRIPTS[case.stage]), paths["CONFIG"], *fill(case.argv, paths)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, fill(case.expect, paths), case.needle)
    assert_untouched(out, before)


# ---------------------------------------------------------------------------------------------
# Parallel layouts a real two-rank launch cannot run


LAUNCH_CASES = [
    ("rm", ("--sharding_parallel_degree", "3", "--sharding", "stage1"),
     ("sharding_parallel_degree (3)", "= 3 does not divide the world size 2"), "divide"),
    ("rm", ("--pipeline_parallel_degree", "2"),
     ("pipeline_parallel_degree > 1 is supported for PPO",), "pipeline"),
    ("ppo", ("--pipeline_parallel_degree", "2", "--per_device_prompt_batch_size", "3"),
     ("per_device_prompt_batch_size = 3 must be divisible by the 2 ranks that share its rollout",), "divisible"),
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage,argv,expect,needle", LAUNCH_CASES,
                         ids=["degrees-do-not-divide-world-size", "pipeline-for-the-reward-model",
                              "prompt-batch-not-divisible-over-the-pipeline"])
def test_bad_parallel_layout_two_ranks(workspace, tmp_path, stage, argv, expect, needle):
    paths = case_paths(workspace, tmp_path)
    out, before = make_output_dir(workspace, paths["OUT"])
    config = write_case_config(Case("launch", stage, expect=(), needle=""), paths, tmp_path)
    log_dir = tmp_path / "launch-logs"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
           os.path.join(ROOT, SCRIPTS[stage]), config, *argv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # the launcher's own status depends on which rank it saw fail first (it stops the other one)
    assert proc.returncode != 0, f"launcher exit status 0:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    finished = 0
    for rank in (0, 1):
        # the launcher writes each rank's stdout and stderr to workerlog.<rank>
        log = (log_dir / f"workerlog.{rank}").read_text()
        assert "Traceback" not in log, log[-3000:]
        if "error: " in log:  # a rank the launcher stopped first may have written nothing yet
            assert_one_line_error(2, log, expect, needle)
            finished += 1
    assert finished >= 1, "no rank wrote the error line"
    assert_untouched(out, before)


def test_dataset_named_twice_is_a_warning(tiny_tokenizer, caplog):
    """Not an error (the samples are taken once per entry), but never silent."""
    from ppo.data import SupervisedDataset

    with caplog.at_level("WARNING", logger="ppo.data.datasets"):
        data = SupervisedDataset("tiny-sft:0.01,tiny-sft:0.01", tiny_tokenizer, max_length=64)
    warned = [r.getMessage() for r in caplog.records if "named 2 times" in r.getMessage()]
    assert warned == ["dataset 'tiny-sft' is named 2 times in 'tiny-sft:0.01,tiny-sft:0.01': its samples are "
                      "taken once per entry (add the proportions instead)"]
    assert len(data) > 0
