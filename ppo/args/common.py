"""The parts every stage's arguments are built from: ``arg`` (a field with its help string,
choices and range), the range checks, and the training, parallel and data arguments every stage
shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ppo.core.errors import UserError
from ppo.storage.tensors import parse_size


def arg(default, help: str, choices=None, path: str = "", ge=None, gt=None, le=None, lt=None):
    """A dataclass field with a help string (and optionally the accepted values).

    ``path``: "path" for a file or folder, "datasets" for NAME[:proportion[:path]] specs,
    "modules" for comma-separated modules or .py files: the relative paths a config file gives
    these resolve against the project root.  ``ge``/``gt``/``le``/``lt``: the valid range, checked
    by :func:`check_ranges` for every field (every float must also be finite) and shown in the help.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "path": path,
                                            "range": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le),
                                                                        ("lt", lt)) if v is not None}})


def range_text(bounds: dict) -> str:
    """``bounds`` as the messages and help strings write it: '> 0', '>= 1', '[0, 1)'."""
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    return f"{'<=' if high[0] == ']' else '<'} {high[1]}" if high else ""


def range_help(f) -> str:
    """The sentence help strings (``--help``, docs/arguments.md) end with: ' Valid: > 0, finite.'"""
    bounds = f.metadata.get("range") or {}
    finite = ", finite" if f.type in (float, "float") else ""
    return f" Valid: {range_text(bounds)}{finite}." if bounds else (" Valid: finite." if finite else "")


def check_ranges(args) -> None:
    """Every field of ``args`` inside its declared range; every float finite (NaN and inf are
    accepted by JSON and float() alike, and pass most comparisons unnoticed)."""
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bounds = f.metadata.get("range") or {}
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"'{f.name}' must be a finite number{' ' + range_text(bounds) if bounds else ''}, "
                            f"got {value}")
        ok = all((k != "ge" or value >= b) and (k != "gt" or value > b) and (k != "le" or value <= b)
                 and (k != "lt" or value < b) for k, b in bounds.items())
        require(ok, f"'{f.name}' must be {range_text(bounds)}, got {value}")


def require(ok: bool, message: str):
    if not ok:
        raise UserError(message)


def _positive(args, *keys):
    for key in keys:
        require(getattr(args, key) > 0, f"'{key}' must be > 0, got {getattr(args, key)}")


def _non_negative(args, *keys):
    for key in keys:
        require(getattr(args, key) >= 0, f"'{key}' must be >= 0, got {getattr(args, key)}")


def _at_least_one(args, *keys):
    for key in keys:
        require(getattr(args, key) >= 1, f"'{key}' must be >= 1, got {getattr(args, key)}")


def _fraction(args, *keys):
    for key in keys:
        require(0 <= getattr(args, key) < 1, f"'{key}' must be in [0, 1), got {getattr(args, key)}")


STRATEGIES = ("steps", "epoch", "no")
RECOMPUTE_GRANULARITIES = ("full", "full_attn", "core_attn")
# the attention and MLP projections in paddlenlp's decoder naming (separate or fused)
LORA_DEFAULT_TARGETS = "q_proj,k_proj,v_proj,qkv_proj,o_proj,gate_proj,up_proj,gate_up_fused_proj,down_proj"


# ---------------------------------------------------------------------------------------------
# Shared parts


@dataclass
class TrainingArgs:
    output_dir: str = arg("output", "Folder for checkpoints, metrics.jsonl and logs.", path="path")
    overwrite_output_dir: bool = arg(False, "Start afresh in an output_dir that already holds a run's checkpoints or "
                                            "final model instead of stopping with an error (resume_from_checkpoint "
                                            "continues such a run instead).")
    do_train: bool = arg(True, "PaddleNLP's switch; only true is accepted: these entry points always train.")
    do_eval: bool = arg(True, "false: no evaluation at all (evaluation data is not loaded and eval_split_ratio "
                              "holds nothing out).")
    seed: int = arg(42, "Random seed of model initialisation, data order, sampling and dropout.", ge=0, lt=2**32)
    num_train_epochs: float = arg(1.0, "Passes over the training data (ignored when max_steps > 0).", ge=0)
    max_steps: int = arg(-1, "Total steps (optimizer steps; in PPO, rollout iterations); overrides num_train_epochs when > 0.", ge=-1)
    per_device_train_batch_size: int = arg(8, "Training micro-batch per device (pairs for the reward model).", ge=1)
    per_device_eval_batch_size: int = arg(16, "Evaluation batch per device.", ge=1)
    gradient_accumulation_steps: int = arg(1, "Micro-batches accumulated per optimizer step.", ge=1)
    learning_rate: float = arg(2e-5, "Peak learning rate (of the actor in PPO).", gt=0)
    weight_decay: float = arg(0.0, "AdamW weight decay (not applied to biases and norms).", ge=0)
    adam_beta1: float = arg(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = arg(0.95, "AdamW beta2.", ge=0, lt=1)
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.", gt=0)
    lr_scheduler_type: str = arg("cosine", "Learning-rate schedule after warm-up.",
                                 ("constant", "linear", "cosine"))
    warmup_ratio: float = arg(0.0, "Share of the total steps spent in linear warm-up.", ge=0, lt=1)
    warmup_steps: int = arg(0, "Warm-up steps; overrides warmup_ratio when > 0.", ge=0)
    max_grad_norm: float = arg(1.0, "Global gradient-norm clip (0 disables).", ge=0)
    logging_steps: int = arg(10, "Log metrics every this many optimizer steps.", ge=1)
    evaluation_strategy: str = arg("steps", "When to evaluate during training: every eval_steps, at the end of every "
                                            "epoch over the training data, or never ('no' also skips the final "
                                            "evaluation).", STRATEGIES)
    eval_steps: int = arg(0, "Evaluate every this many steps, and once before training (0: only at the end).", ge=0)
    save_strategy: str = arg("steps", "When to write resumable checkpoints: every save_steps, at the end of every "
                                      "epoch, or never (the final model is written in every case).", STRATEGIES)
    save_steps: int = arg(0, "Save a checkpoint every this many steps (0: only at the end).", ge=0)
    save_total_limit: int = arg(2, "Keep at most this many step checkpoints (the final model is always kept).", ge=1)
    bf16: bool = arg(False, "bfloat16 mixed precision: on GPU builds autocast with float32 master weights; on a CPU "
                            "with bf16 units (AVX512-BF16 / AMX) the matmuls run in bf16 with float32 accumulation "
                            "through oneDNN (cpu_gemm), everything else and the weights in float32; on other CPUs "
                            "one notice line and float32.")
    cpu_gemm: str = arg("auto", "CPU kernels: auto / onednn run the matmuls through oneDNN's GEMM from paddle's own "
                                "wheel (bf16 with bf16; a decode step's few rows stay on paddle's matmul) and RMSNorm, "
                                "rotary, SwiGLU, attention and the token log-probs through the toolkit's compiled "
                                "kernels on the same "
                                "threads; paddle runs paddle's own ops throughout. auto falls back to paddle's with one "
                                "notice line where oneDNN or the kernels cannot load. No effect on GPU.",
                        ("auto", "onednn", "paddle"))
    fp16: bool = arg(False, "float16 mixed precision (GPU builds; ignored with a warning on CPU).")
    disable_tqdm: bool = arg(False, "Hide progress bars.")
    dataloader_drop_last: bool = arg(True, "Drop the samples left over after the last full global batch of an "
                                           "epoch (false: one more step per epoch, its batch completed with the "
                                           "epoch's first samples, so every step has the same global batch).")
    recompute: bool = arg(False, "Activation checkpointing of the trained model (the actor in PPO): keep only "
                                 "the recompute_granularity blocks' inputs in the forward pass and recompute the "
                                 "rest during backward (less memory, about a third more compute).")
    recompute_granularity: str = arg("full", "What recompute recomputes: whole decoder layers, their attention "
                                             "blocks, or the attention core (softmax(QK^T)V) only.",
                                     RECOMPUTE_GRANULARITIES)
    # LoRA (PaddleNLP's names): the trained model (the actor in PPO) learns low-rank adapters only
    lora: bool = arg(False, "Train low-rank adapters (paddlenlp.peft LoRA) on lora_target_modules instead of the "
                            "whole model (the actor in PPO; its reference is then the same weights with the "
                            "adapters off). The base weights stay frozen; the final model is written merged, the "
                            "adapters beside it in lora/.")
    lora_rank: int = arg(8, "Rank r of the adapters (A [in, r], B [r, out]).")
    lora_alpha: float = arg(16.0, "Adapter scale numerator: the update is x @ A @ B * lora_alpha / lora_rank.")
    lora_target_modules: str = arg(LORA_DEFAULT_TARGETS, "Comma-separated linear layers that get adapters: a name "
                                                         "matches the last part of a layer's path (q_proj), anything "
                                                         "else is a regular expression over the full path.")
    max_nonfinite_steps: int = arg(3, "Consecutive updates with a non-finite loss, gradient norm, reward or KL that "
                                      "are skipped (and counted) before training stops; 0 stops at the first.", ge=0)
    allow_unsafe_pickle: bool = arg(False, "Load pickled files (paddlenlp *.pdparams weights, checkpoints of older "
                                           "versions) whatever objects they name. By default a pickle that names "
                                           "anything but tensors, arrays and plain containers is refused: loading "
                                           "it could run code.")
    max_shard_size: str = arg("5GB", "Largest safetensors file of a saved, converted or exported model folder "
                                     "(bytes, or a number with KB, MB, GB, KiB, MiB, GiB); a larger model is written "
                                     "as shards with a model.safetensors.index.json, the way transformers shards.")
    resume_from_checkpoint: str = arg("", "checkpoint-N folder to continue from exactly, or 'auto' for the latest complete one in output_dir.",
                                      path="path")

    def validate(self) -> None:
        check_ranges(self)
        require(self.num_train_epochs > 0 or self.max_steps > 0,
                 f"'num_train_epochs' must be > 0 (or set max_steps), got {self.num_train_epochs}")
        validate_lora(self, "lora")
        parse_size(self.max_shard_size)
        require(not (self.bf16 and self.fp16), "'bf16' and 'fp16' cannot both be true")
        require(self.do_train, "'do_train' is false: these entry points always train (PaddleNLP's evaluation-only "
                                "runs have no counterpart here); drop the key or set it to true")


@dataclass
class ParallelArgs:
    tensor_parallel_degree: int = arg(1, "Tensor (model) parallel degree.", ge=1)
    pipeline_parallel_degree: int = arg(1, "Pipeline parallel degree.", ge=1)
    sharding_parallel_degree: int = arg(1, "Sharding (ZeRO) degree; the remaining ranks are data parallel.", ge=1)
    sharding: str = arg("", "Sharding stage when sharding_parallel_degree > 1.", ("", "stage1", "stage2"))

    def validate(self) -> None:
        check_ranges(self)
        if self.sharding_parallel_degree > 1:
            require(self.sharding in ("stage1", "stage2"),
                     f"'sharding' must be 'stage1' or 'stage2' when sharding_parallel_degree > 1, got {self.sharding!r}")


@dataclass
class DataArgs:
    train_datasets: str = arg("", "Training data: comma-separated NAME[:proportion[:path]].", path="datasets")
    eval_datasets: str = arg("", "Evaluation data, same form; empty: hold out eval_split_ratio of the training data.",
                             path="datasets")
    eval_split_ratio: float = arg(0.0, "Share of the training data held out for evaluation when eval_datasets is empty.", ge=0, lt=1)
    max_length: int = arg(512, "Maximum tokens of prompt + answer.", ge=1)
    prompt_template: str = arg("", "Prompt template with an {input} placeholder, or chat: the tokenizer's own chat template (default: safe-rlhf's conversation format).")
    extra_modules: str = arg("", "Comma-separated Python modules or .py files to import first (register your own datasets).",
                             path="modules")

    def __post_init__(self):
        # do_eval false / evaluation_strategy 'no' (PaddleNLP's switches): nothing is evaluated, so
        # no evaluation data is loaded and nothing is held out of the training data
        if not getattr(self, "do_eval", True) or getattr(self, "evaluation_strategy", "steps") == "no":
            self.eval_datasets, self.eval_split_ratio = "", 0.0
            if hasattr(self, "eval_steps"):
                self.eval_steps = 0

    def validate(self) -> None:
        check_ranges(self)
        require(bool(self.train_datasets), "'train_datasets' is empty: name at least one dataset")


def validate_lora(args, switch: str) -> None:
    """LoRA settings (shared by ``lora`` and PPO's ``critic_lora``, which uses the same rank and targets)."""
    _at_least_one(args, "lora_rank")
    _positive(args, "lora_alpha")
    require(any(t.strip() for t in args.lora_target_modules.split(",")),
             "'lora_target_modules' is empty: give comma-separated layer names, e.g. q_proj,v_proj")
    if getattr(args, switch) and getattr(args, "pipeline_parallel_degree", 1) > 1:
        raise UserError(f"'{switch}' needs pipeline_parallel_degree 1 (the pipeline stages do not carry adapters); "
                        "use tensor parallel, sharding or data parallel with LoRA")


def validate_shared(args) -> None:
    TrainingArgs.validate(args)
    ParallelArgs.validate(args)
    DataArgs.validate(args)
