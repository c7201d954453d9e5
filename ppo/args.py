"""Arguments of every stage: dataclasses built from shared parts, read from JSON + command line.

``parse_args(RewardArgs, argv)`` reads ``argv[0]`` as a JSON file when it ends in ``.json`` and
then applies ``--key value`` overrides (PaddleNLP's convention).  Every field carries a help
string (``--help`` prints them).  Mistakes (unknown key, wrong type, out-of-range value, JSON
syntax) raise ``UserError`` with one line naming the key and what is accepted.

PaddleNLP's argument files run unchanged: :data:`PADDLENLP_KEYS` lists the keys of its
``llm/config/*/`` files that are not fields here, each either honoured under this toolkit's name
or accepted with one notice line saying why it has no effect.  Relative paths inside a config
file resolve against the project root (the folder holding ``ppo/`` and ``rm/``), so a preset
works from the root and from ``cd ppo`` alike; paths on the command line resolve against the
current folder, as in any shell command.
"""

from __future__ import annotations

import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields

from ppo.errors import UserError, closest
from ppo.files import read_json


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
    """The sentence help strings (``--help``, README's tables) end with: ' Valid: > 0, finite.'"""
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
        _require(ok, f"'{f.name}' must be {range_text(bounds)}, got {value}")


def _require(ok: bool, message: str):
    if not ok:
        raise UserError(message)


def _positive(args, *keys):
    for key in keys:
        _require(getattr(args, key) > 0, f"'{key}' must be > 0, got {getattr(args, key)}")


def _non_negative(args, *keys):
    for key in keys:
        _require(getattr(args, key) >= 0, f"'{key}' must be >= 0, got {getattr(args, key)}")


def _at_least_one(args, *keys):
    for key in keys:
        _require(getattr(args, key) >= 1, f"'{key}' must be >= 1, got {getattr(args, key)}")


def _fraction(args, *keys):
    for key in keys:
        _require(0 <= getattr(args, key) < 1, f"'{key}' must be in [0, 1), got {getattr(args, key)}")


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
    bf16: bool = arg(False, "bfloat16 mixed precision (GPU builds; ignored with a warning on CPU).")
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
    resume_from_checkpoint: str = arg("", "checkpoint-N folder to continue from exactly, or 'auto' for the latest complete one in output_dir.",
                                      path="path")

    def validate(self) -> None:
        check_ranges(self)
        _require(self.num_train_epochs > 0 or self.max_steps > 0,
                 f"'num_train_epochs' must be > 0 (or set max_steps), got {self.num_train_epochs}")
        _validate_lora(self, "lora")
        _require(not (self.bf16 and self.fp16), "'bf16' and 'fp16' cannot both be true")
        _require(self.do_train, "'do_train' is false: these entry points always train (PaddleNLP's evaluation-only "
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
            _require(self.sharding in ("stage1", "stage2"),
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
        _require(bool(self.train_datasets), "'train_datasets' is empty: name at least one dataset")


# ---------------------------------------------------------------------------------------------
# Stages


def _validate_lora(args, switch: str) -> None:
    """LoRA settings (shared by ``lora`` and PPO's ``critic_lora``, which uses the same rank and targets)."""
    _at_least_one(args, "lora_rank")
    _positive(args, "lora_alpha")
    _require(any(t.strip() for t in args.lora_target_modules.split(",")),
             "'lora_target_modules' is empty: give comma-separated layer names, e.g. q_proj,v_proj")
    if getattr(args, switch) and getattr(args, "pipeline_parallel_degree", 1) > 1:
        raise UserError(f"'{switch}' needs pipeline_parallel_degree 1 (the pipeline stages do not carry adapters); "
                        "use tensor parallel, sharding or data parallel with LoRA")


def _validate_shared(args) -> None:
    TrainingArgs.validate(args)
    ParallelArgs.validate(args)
    DataArgs.validate(args)


@dataclass
class RewardArgs(TrainingArgs, ParallelArgs, DataArgs):
    model_name_or_path: str = arg("", "Backbone to start from (a paddlenlp causal LM or a saved score model).",
                                  path="path")
    loss_type: str = arg("sequence-wise", "Preference loss on end scores or over the differing span.",
                         ("sequence-wise", "token-wise"))
    regularization: float = arg(0.0, "L2 coefficient on the scores.", ge=0)
    margin: float = arg(0.0, "Margin m in -log sigmoid(r_better - r_worse - m).", ge=0)
    score_bias: bool = arg(True, "Give the score head a bias.")
    normalize_score_during_training: bool = arg(False, "Normalise scores with the running statistics while training.")
    normalizer_type: str = arg("RunningMeanStd", "Score normaliser whose statistics are saved with the model.",
                               ("RunningMeanStd", "ExponentialMovingAverage", "none"))
    normalizer_momentum: float = arg(0.9, "Momentum of the ExponentialMovingAverage normaliser.", ge=0, lt=1)

    def validate(self) -> None:
        _validate_shared(self)


@dataclass
class SFTArgs(TrainingArgs, ParallelArgs, DataArgs):
    model_name_or_path: str = arg("", "Causal LM to fine-tune (paddlenlp format).", path="path")

    def validate(self) -> None:
        _validate_shared(self)


@dataclass
class PPOArgs(TrainingArgs, ParallelArgs, DataArgs):
    # models
    actor_model_name_or_path: str = arg("", "SFT model: the actor starts from it and the frozen reference is a copy.",
                                        path="path")
    reward_model_name_or_path: str = arg("", "Trained reward (score) model, frozen.", path="path")
    reward_critic_model_name_or_path: str = arg("", "Critic initialisation (default: the reward model).", path="path")
    critic_recompute: bool = arg(False, "Activation checkpointing of the critic (see recompute).")
    critic_recompute_granularity: str = arg("full", "What critic_recompute recomputes (see recompute_granularity).",
                                            RECOMPUTE_GRANULARITIES)
    critic_lora: bool = arg(False, "Train the critic as LoRA adapters on lora_target_modules (same lora_rank and "
                                   "lora_alpha as the actor) plus its whole score head.")
    normalize_reward: bool = arg(False, "Normalise rewards with the statistics saved in the reward model's config.")
    # data
    ptx_datasets: str = arg("", "Supervised data for the ptx loss (empty: no ptx).", path="datasets")
    ptx_coeff: float = arg(16.0, "Weight of the ptx language-model loss.", ge=0)
    per_device_prompt_batch_size: int = arg(16, "Prompts per device per rollout.", ge=1)
    update_iters: int = arg(1, "PPO epochs over each rollout batch.", ge=1)
    shuffle_minibatches: bool = arg(True, "Shuffle the rollout batch into mini-batches each PPO epoch.")
    # critic optimizer
    critic_learning_rate: float = arg(5e-6, "Critic peak learning rate.", gt=0)
    critic_weight_decay: float = arg(0.0, "Critic AdamW weight decay.", ge=0)
    critic_lr_scheduler_type: str = arg("constant", "Critic learning-rate schedule.", ("constant", "linear", "cosine"))
    critic_warmup_ratio: float = arg(0.0, "Critic warm-up share of the total steps.", ge=0, lt=1)
    # generation
    max_new_tokens: int = arg(128, "Maximum response tokens per rollout (max_length bounds prompt + response).", ge=1)
    do_sample: bool = arg(True, "Sample responses (false: greedy).")
    temperature: float = arg(1.0, "Sampling temperature; also applied to the logits of every log-prob.", gt=0)
    top_p: float = arg(1.0, "Nucleus sampling threshold (1.0: off).", gt=0, le=1)
    top_k: int = arg(0, "Top-k sampling (0: off).", ge=0)
    rollout_micro_batch_size: int = arg(0, "Generate at most this many sequences at a time, prompts grouped by "
                                           "length (less padding, a smaller KV cache); 0: the whole rollout batch "
                                           "at once.", ge=0)
    repetition_penalty: float = arg(1.0, "Penalty on tokens already in the sequence (1.0: off).", gt=0)
    num_return_sequences: int = arg(1, "Responses sampled per prompt (>= 2 for group advantage estimators).", ge=1)
    offload_level: str = arg("", "What leaves memory between phases, space separated: freeze_model (reference and "
                                 "reward model outside scoring), optimizer (optimizer state outside updates), "
                                 "train_model (critic weights while responses are generated; also the actor's when "
                                 "rollout runs on separate copies, see eval_mode).")
    offload_dir: str = arg("", "Folder of the CPU offload files (default: the system temp folder; use a real disk).",
                           path="path")
    use_inference_model: bool = arg(True, "Roll out with the lean KV-cache inference model over the actor's live "
                                          "weights; on GPU builds with paddlenlp_ops and bf16/fp16 training, "
                                          "PaddleNLP's fused inference model, its weight copy refreshed after "
                                          "every actor update (false: paddlenlp's forward with its own cache).")
    rollout_log_probs: str = arg("auto", "Keep the actor's old log-probs from the rollout's decode steps instead of "
                                         "a scoring forward of the actor: 'auto' where the lean inference model "
                                         "decodes the actor's live weights (the fused GPU model and paddlenlp's "
                                         "forward recompute), 'true' always, 'false' never (recompute).",
                                 choices=["auto", "true", "false"])
    length_buckets: bool = arg(True, "Compute only real tokens where it keeps every result: the update sorts each "
                                     "optimizer step's rows by real length and cuts them into micro-batches of at "
                                     "most per_device_train_batch_size rows, each packed to its own longest "
                                     "row, where the cut computes the fewest tokens plus 32 per micro-batch "
                                     "(their number varies; fixed at gradient_accumulation_steps when ptx "
                                     "batches are mixed in; not under pipeline parallel: one shape per "
                                     "schedule); the inference model scores rows in length groups the same way. "
                                     "The token-mean of every loss is unchanged.")
    rollout_static_graph: bool = arg(False, "Run the inference model's decode step as a static graph compiled once "
                                           "per batch and length bucket (no faster on CPU, measured; for "
                                           "accelerators; tensor parallel decodes eagerly; the fused GPU model "
                                           "does not use it).")
    # the name is PaddleNLP's (kept so its configs run unchanged); it picks the rollout layout
    eval_mode: str = arg("", "The rollout layout (PaddleNLP's name for it): the models that generate responses "
                             "when they cannot be the training models: 'tensor_parallel' (split "
                             "like training, without its pipeline) or 'single' (whole on every rank). Their "
                             "weights are exported from the training models before every rollout and the "
                             "rollout batch is split over the ranks of one pipeline. Empty: the training models "
                             "roll out themselves, 'tensor_parallel' under pipeline parallel.",
                         ("", "single", "tensor_parallel"))
    # algorithm
    kl_coeff: float = arg(0.02, "KL coefficient (initial value when adaptive_kl).", ge=0)
    kl_estimator: str = arg("k1", "Per-token KL estimator.", ("k1", "k2", "k3"))
    kl_mode: str = arg("reward", "Where the KL enters: shaped into the reward, or as a loss term.", ("reward", "loss"))
    adaptive_kl: bool = arg(False, "Adapt kl_coeff towards kl_target (Ziegler et al. 2019).")
    kl_target: float = arg(6.0, "Target per-sequence KL of the adaptive controller.", gt=0)
    kl_horizon: int = arg(10000, "Horizon of the adaptive controller, in sequences.", ge=1)
    clip_range_ratio: float = arg(0.2, "PPO ratio clip epsilon.", gt=0)
    clip_range_ratio_high: float = arg(0.0, "Upper ratio clip epsilon when > 0 (asymmetric clip).", ge=0)
    dual_clip: float = arg(0.0, "Dual-clip bound c > 1 for negative advantages (0: off).", ge=0)
    clip_range_score: float = arg(50.0, "Clip of the reward-model score.", gt=0)
    clip_range_value: float = arg(5.0, "Clip of the value update around the rollout values.", gt=0)
    missing_eos_penalty: float = arg(0.0, "Added to the score of responses that hit max_new_tokens without EOS.")
    adv_estimator: str = arg("gae", "Advantage estimator.", ("gae", "grpo", "rloo", "reinforce_plus_plus"))
    gamma: float = arg(1.0, "Discount.", ge=0, le=1)
    lam: float = arg(0.95, "GAE lambda.", ge=0, le=1)
    normalize_advantage: bool = arg(True, "Whiten advantages over the rollout batch's action tokens.")
    entropy_coeff: float = arg(0.0, "Entropy bonus coefficient in the actor loss.")
    # evaluation
    eval_samples_to_write: int = arg(8, "Eval generations echoed to the console per evaluation (all of them are "
                                          "written to eval_samples/step-N.rank-R.jsonl).", ge=0)
    # verifiable rewards: reward functions, the remote endpoint, dynamic sampling
    reward_functions: str = arg("", "Reward functions scoring each response, comma-separated NAME[:weight] (built-ins: "
                                    "math_exact, format, overlong, remote; your own through extra_modules); their "
                                    "weighted sum is added to the reward model's score. With them (or "
                                    "reward_server_url) reward_model_name_or_path may be empty: no reward model.")
    reward_model_weight: float = arg(1.0, "Weight of the reward model's score in the end score (after "
                                          "normalize_reward, which applies to it alone).")
    reward_format_pattern: str = arg("", "Regular expression the whole response must match for the 'format' "
                                         "function (empty: <think>.*?</think>\\s*<answer>.*?</answer>).")
    reward_overlong_buffer: int = arg(16, "Tokens before max_new_tokens over which the 'overlong' penalty grows "
                                          "linearly from 0 to -1.", ge=1)
    reward_server_url: str = arg("", "HTTP endpoint scoring responses (README, 'Reward functions'); checked at start; "
                                     "adds the 'remote' function (weight 1) unless reward_functions names it.")
    reward_server_timeout: float = arg(60.0, "Seconds the reward server may take per request.", gt=0)
    reward_server_retries: int = arg(2, "Retries of a failed or timed-out reward server request.", ge=0)
    dynamic_sampling: bool = arg(False, "DAPO dynamic sampling (grpo / rloo): drop prompt groups whose responses all "
                                        "got the same end score and roll out more prompts until the batch is full.")
    dynamic_sampling_max_tries: int = arg(4, "Extra rollouts per step for dynamic sampling; a batch still short "
                                             "is filled with dropped groups (no group advantage).", ge=0)

    def validate(self) -> None:
        _validate_shared(self)
        _validate_lora(self, "critic_lora")
        _require(self.dual_clip == 0 or self.dual_clip > 1, f"'dual_clip' must be 0 (off) or > 1, got {self.dual_clip}")
        # a rollout holds the prompt (at least one token) and the response within max_length
        _require(self.max_new_tokens < self.max_length,
                 f"'max_new_tokens' ({self.max_new_tokens}) must be < 'max_length' ({self.max_length}): max_length "
                 "bounds prompt + response, so no prompt token would fit")
        _require(self.adv_estimator in ("gae", "reinforce_plus_plus") or self.num_return_sequences >= 2,
                 f"adv_estimator '{self.adv_estimator}' compares responses within a group: "
                 f"num_return_sequences must be >= 2, got {self.num_return_sequences}")
        # verifiable rewards
        _require(bool(self.reward_model_name_or_path or self.reward_functions or self.reward_server_url),
                 "no reward: give reward_model_name_or_path, reward_functions (e.g. 'math_exact') or reward_server_url")
        _require(bool(self.reward_model_name_or_path or self.reward_critic_model_name_or_path
                      or self.adv_estimator != "gae"), "adv_estimator 'gae' without a reward model needs "
                 "reward_critic_model_name_or_path (the critic's initialisation), or use grpo / rloo / reinforce_plus_plus")
        _require(not self.reward_server_url or self.reward_server_url.split("://")[0] in ("http", "https"),
                 f"'reward_server_url' must be an http(s) URL such as 'http://127.0.0.1:8000/score', got {self.reward_server_url!r}")
        _require(not self.dynamic_sampling or self.adv_estimator in ("grpo", "rloo"),
                 f"dynamic_sampling drops groups without a group advantage: it needs adv_estimator 'grpo' or 'rloo', "
                 f"got '{self.adv_estimator}'")
        # stage 2 keeps the parameters as views of one shared buffer: releasing them cuts the link
        _require(not (self.sharding_parallel_degree > 1 and self.sharding == "stage2"
                      and "train_model" in self.offload_level.split()),
                 "offload_level 'train_model' does not combine with sharding 'stage2' (its parameters are views "
                 "of one shared buffer); use 'freeze_model optimizer' with it, or sharding 'stage1'")


# ---------------------------------------------------------------------------------------------
# PaddleNLP's keys that are not fields here
#
# From PaddleNLP's llm/config/llama/{ppo,rm,sft}_argument.json, llm/alignment/ppo/ppo_config.json
# and the TrainingArguments fields they set.  PaddleNLP keys that ARE fields here (recompute,
# critic_recompute, recompute_granularity, evaluation_strategy, save_strategy, do_train, do_eval,
# dataloader_drop_last, overwrite_output_dir, eval_mode, ...) are honoured as documented in their help.


@dataclass(frozen=True)
class Renamed:
    """A PaddleNLP key honoured under this toolkit's name for the same setting."""
    field: str
    why: str = ""


@dataclass(frozen=True)
class NoEffect:
    """A PaddleNLP key accepted with one notice line: it has no effect here, for the reason given."""
    why: str


PADDLENLP_KEYS: dict = {
    "use_fusemt": Renamed("use_inference_model", "PaddleNLP's switch for rolling out with a separate inference "
                                                 "model (its fused GPU kernels where available)"),
    "max_dec_len": Renamed("max_new_tokens", "the maximum response length"),
    "rollout_n": Renamed("num_return_sequences", "responses sampled per prompt"),
    "dataset_name_or_path": Renamed("train_datasets", "the SFT training data (a registered NAME, or NAME::path)"),
    "fp16_opt_level": NoEffect("bf16/fp16 select autocast mixed precision with float32 master weights; "
                               "AMP levels are not selectable"),
    "use_flash_attention": NoEffect("flash attention is a GPU kernel this toolkit does not switch on; "
                                    "attention runs paddlenlp's default kernel"),
    "use_fused_head_and_loss_fn": NoEffect("a GPU fused kernel; log-probs come from the toolkit's own head and loss"),
    "fused_linear": NoEffect("a GPU fused kernel; projections run paddle's default matmul"),
    "tensor_parallel_output": NoEffect("tensor-parallel logits are gathered by the toolkit's own log-prob code"),
    "sequence_parallel": NoEffect("sequence parallel is not implemented; activations stay whole on each "
                                  "tensor-parallel rank"),
    "pipeline_parallel_config": NoEffect("fleet's pipeline options are set by the toolkit's pipeline schedule"),
    "recompute_use_reentrant": NoEffect("recompute uses paddle's default recompute implementation"),
    "release_grads": NoEffect("gradients are already released after every optimizer step"),
    "min_dec_len": NoEffect("there is no minimum response length: a response ends at its first EOS"),
    "min_learning_rate": NoEffect("the linear and cosine schedules decay to 0"),
    "critic_min_learning_rate": NoEffect("the linear and cosine schedules decay to 0"),
    "logging_dir": NoEffect("metrics go to output_dir (metrics.jsonl and the VisualDL log)"),
    "autotuner_benchmark": NoEffect("a PaddleNLP Trainer benchmarking switch"),
    "skip_profile_timer": NoEffect("a PaddleNLP Trainer profiling switch; phase timings are always logged"),
    "eval_accumulation_steps": NoEffect("evaluation metrics are always accumulated over the whole eval set"),
    "load_best_model_at_end": NoEffect("the final model is always the last step's"),
    "metric_for_best_model": NoEffect("the final model is always the last step's (no best-model selection)"),
    "unified_checkpoint": NoEffect("final models are always written whole (loadable at any parallel degree), "
                                   "the form unified_checkpoint gives"),
    "src_length": NoEffect("prompts are not cut separately; max_length bounds prompt + answer"),
    "eval_with_do_generation": NoEffect("SFT evaluation reports the answer loss, without generating"),
    "zero_padding": NoEffect("batches are padded, not packed"),
}

_noticed: set = set()


def _notice(key: str, why: str) -> None:
    """One line per key and process, on stderr (PaddleNLP files carry many such keys)."""
    if key not in _noticed:
        _noticed.add(key)
        print(f"notice: argument '{key}' (PaddleNLP) has no effect here: {why}", file=sys.stderr, flush=True)


def _map_paddlenlp_keys(values: dict, sources: dict, known) -> None:
    """Rename PaddleNLP's keys to their fields here and drop (with a notice) those without effect."""
    for key in [k for k in values if k not in known and k in PADDLENLP_KEYS]:
        entry = PADDLENLP_KEYS[key]
        value, source = values.pop(key), sources.pop(key)
        if isinstance(entry, NoEffect):
            _notice(key, entry.why)
        elif entry.field in known:
            if entry.field in values and values[entry.field] != value:
                raise UserError(f"{source}: '{key}' is PaddleNLP's name of '{entry.field}', which "
                                f"{sources[entry.field]} sets to a different value: give only one of them")
            values.setdefault(entry.field, value)
            sources.setdefault(entry.field, f"{source} (as '{key}')")
        else:  # a PaddleNLP key of another stage (use_fusemt in an SFT file) stays unknown
            values[key], sources[key] = value, source


# ---------------------------------------------------------------------------------------------
# Relative paths


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET_OUTPUT = os.path.join(PROJECT_ROOT, "output", "tiny")


def _from_root(path: str) -> str:
    """A config file's relative path, re-expressed relative to the current folder (unchanged from the root)."""
    if not path or os.path.isabs(path):
        return path
    return os.path.relpath(os.path.join(PROJECT_ROOT, path))


def resolve_config_paths(name: str, kind: str, value):
    """``value`` of field ``name`` as given in a config file, its relative paths taken from the project root."""
    if not isinstance(value, str) or not value:
        return value
    if kind == "path":
        return value if name == "resume_from_checkpoint" and value == "auto" else _from_root(value)
    if kind == "modules":  # module names stay, .py files are paths
        return ",".join(_from_root(m) if m.endswith(".py") else m for m in value.split(","))
    if kind == "datasets":  # NAME[:proportion[:path]]
        specs = []
        for spec in value.split(","):
            parts = spec.split(":", 2)
            if len(parts) == 3 and parts[2]:
                parts[2] = _from_root(parts[2])
            specs.append(":".join(parts))
        return ",".join(specs)
    return value


def check_preset_models(args) -> None:
    """A model folder under output/tiny that is missing: say which command builds the tiny example.

    Called by the entry points before anything loads (parsing alone does not need the folders)."""
    for f in fields(args):
        value = getattr(args, f.name)
        if f.name.endswith("model_name_or_path") and value and not os.path.exists(value) \
                and os.path.abspath(value).startswith(PRESET_OUTPUT + os.sep):
            raise UserError(f"'{f.name}' folder '{value}' does not exist: it is built by the tiny example's "
                            f"pipeline, `python -m ppo.tiny.pipeline` run from {PROJECT_ROOT}")


# ---------------------------------------------------------------------------------------------
# Parsing


def _base_type(tp):
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _coerce(name: str, tp, value, source: str):
    tp = _base_type(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # JSON lists of names are accepted as comma-separated
            return ",".join(str(v) for v in value)
    raise UserError(f"{source}: '{name}' must be {tp.__name__}, got {value!r}")


def load_json_config(path: str) -> dict:
    data = read_json(path, "config file", object_only=False)
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a JSON object of argument names to values")
    return data


def format_help(cls) -> str:
    hints = typing.get_type_hints(cls)
    lines = [f"usage: <script> [config.json] [--key value ...]\n\n{cls.__name__} arguments:"]
    for f in fields(cls):
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(repr(c) for c in choices)}." if choices else ""
        extra += range_help(f)
        lines.append(f"  --{f.name} ({_base_type(hints[f.name]).__name__}, default {f.default!r}): "
                     f"{f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)


def parse_args(cls, argv=None):
    """Build ``cls`` from an optional JSON file (first argument) and ``--key value`` overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help(cls))
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values: dict = {}
    sources: dict = {}
    if argv and not argv[0].startswith("--"):
        path = argv.pop(0)
        for key, value in load_json_config(path).items():
            if key in known:
                value = resolve_config_paths(key, known[key].metadata.get("path", ""), value)
            values[key], sources[key] = value, f"config file '{path}'"
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected command-line argument '{token}': expected a config .json first, then --key value pairs")
        key, eq, inline = token[2:].partition("=")
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        elif key in known and _base_type(hints[key]) is bool:
            value, i = "true", i + 1  # a bare --flag means true
        else:
            raise UserError(f"command-line argument '--{key}' needs a value")
        values[key], sources[key] = value, "command line"
    _map_paddlenlp_keys(values, sources, known)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"{sources[key]}: unknown argument '{key}'{closest(key, known)}; "
                            f"run with --help to list the {len(known)} accepted arguments")
        kwargs[key] = _coerce(key, hints[key], value, sources[key])
        choices = known[key].metadata.get("choices")
        if choices is not None and kwargs[key] not in choices:
            raise UserError(f"{sources[key]}: '{key}' must be one of {', '.join(repr(c) for c in choices)}, "
                            f"got {kwargs[key]!r}{closest(str(kwargs[key]), [str(c) for c in choices])}")
    args = cls(**kwargs)
    args.validate()
    return args


def validate(args) -> None:
    """Range checks of a stage's arguments: each part checks its own fields, the stage its own."""
    args.validate()
