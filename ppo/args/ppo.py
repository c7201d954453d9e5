"""The PPO stage's arguments (``ppo/run_ppo.py``): the four models, rollout, the estimators,
rewards, and what PPO adds to the shared parts."""

from __future__ import annotations

from dataclasses import dataclass

from ppo.core.placement import canonical_pools
from ppo.args.common import (
    RECOMPUTE_GRANULARITIES,
    DataArgs,
    ParallelArgs,
    TrainingArgs,
    arg,
    require,
    validate_lora,
    validate_shared,
)


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
    resource_pools: str = arg("", "Roles on ranks of their own in one launch, comma-separated ROLE[+ROLE...]:RANKS, "
                                  "the actor's pool first (from rank 0), e.g. 'actor:2,critic:1,reference:1,reward:1' "
                                  "or 'actor:2,rollout+reference:1' with tensor_parallel_degree 2 (one data rank), "
                                  "'actor:2,critic+reference+reward:2' with data parallel 2. The actor's pool is laid "
                                  "out by tensor_parallel_degree / sharding_parallel_degree (data parallel takes the "
                                  "rest of it); every other pool has one rank per data rank of the actor's pool and "
                                  "scores at the same time as the actor's pool scores the rest; a critic on a pool "
                                  "of its own (gae) also trains there while the actor trains; a rollout pool "
                                  "generates on a copy of the actor, its weights sent after every update. A role no "
                                  "pool names stays with the actor. The counts add up to the launch's ranks. Empty: "
                                  "every role on every rank (docs/parallelism.md).")
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
    reward_server_url: str = arg("", "HTTP endpoint scoring responses (docs/rewards.md); checked at start; "
                                     "adds the 'remote' function (weight 1) unless reward_functions names it.")
    reward_server_timeout: float = arg(60.0, "Seconds the reward server may take per request.", gt=0)
    reward_server_retries: int = arg(2, "Retries of a failed or timed-out reward server request.", ge=0)
    dynamic_sampling: bool = arg(False, "DAPO dynamic sampling (grpo / rloo): drop prompt groups whose responses all "
                                        "got the same end score and roll out more prompts until the batch is full.")
    dynamic_sampling_max_tries: int = arg(4, "Extra rollouts per step for dynamic sampling; a batch still short "
                                             "is filled with dropped groups (no group advantage).", ge=0)

    def validate(self) -> None:
        validate_shared(self)
        validate_lora(self, "critic_lora")
        # the form (what needs the launch's size is checked at start), written one way
        self.resource_pools = canonical_pools(self.resource_pools)
        require(self.dual_clip == 0 or self.dual_clip > 1, f"'dual_clip' must be 0 (off) or > 1, got {self.dual_clip}")
        # a rollout holds the prompt (at least one token) and the response within max_length
        require(self.max_new_tokens < self.max_length,
                 f"'max_new_tokens' ({self.max_new_tokens}) must be < 'max_length' ({self.max_length}): max_length "
                 "bounds prompt + response, so no prompt token would fit")
        require(self.adv_estimator in ("gae", "reinforce_plus_plus") or self.num_return_sequences >= 2,
                 f"adv_estimator '{self.adv_estimator}' compares responses within a group: "
                 f"num_return_sequences must be >= 2, got {self.num_return_sequences}")
        # verifiable rewards
        require(bool(self.reward_model_name_or_path or self.reward_functions or self.reward_server_url),
                 "no reward: give reward_model_name_or_path, reward_functions (e.g. 'math_exact') or reward_server_url")
        require(bool(self.reward_model_name_or_path or self.reward_critic_model_name_or_path
                      or self.adv_estimator != "gae"), "adv_estimator 'gae' without a reward model needs "
                 "reward_critic_model_name_or_path (the critic's initialisation), or use grpo / rloo / reinforce_plus_plus")
        require(not self.reward_server_url or self.reward_server_url.split("://")[0] in ("http", "https"),
                 f"'reward_server_url' must be an http(s) URL such as 'http://127.0.0.1:8000/score', got {self.reward_server_url!r}")
        require(not self.dynamic_sampling or self.adv_estimator in ("grpo", "rloo"),
                 f"dynamic_sampling drops groups without a group advantage: it needs adv_estimator 'grpo' or 'rloo', "
                 f"got '{self.adv_estimator}'")
        # stage 2 keeps the parameters as views of one shared buffer: releasing them cuts the link
        require(not (self.sharding_parallel_degree > 1 and self.sharding == "stage2"
                      and "train_model" in self.offload_level.split()),
                 "offload_level 'train_model' does not combine with sharding 'stage2' (its parameters are views "
                 "of one shared buffer); use 'freeze_model optimizer' with it, or sharding 'stage1'")
