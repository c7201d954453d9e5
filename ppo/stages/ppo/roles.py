"""The four PPO roles in the run's layout: which models exist on this rank, which of them train,
which roll out, and whether the rollout weights are current.

    actor      trains (a pipeline stage under pipeline parallel); its policy makes the rollout
    reference  frozen copy of the initial actor (KL anchor); with ``lora`` the actor itself with its
               adapters switched off (``ppo.models.lora.AdaptersOff``), unless rollout runs on
               separate copies (then a frozen copy again: the reference scores the copies' rows);
               None when a resource pool of its own holds it (``ppo.stages.ppo.pools``)
    reward     frozen score model (end scores); None without reward_model_name_or_path (the reward
               functions score alone) or when a resource pool of its own holds it
    critic     trains (value head); only with the ``gae`` estimator; None when a resource pool of its
               own holds it (it scores, trains and saves there: ``ppo.stages.ppo.serving``)
    rollout_*  the models that decode and score: the training models themselves, or separate
               copies when the training layout cannot decode (pipeline) or ``eval_mode single``
               merges the tensor-parallel shards; the copies are refreshed from the training
               models before a rollout that follows an update (``RolloutWeights``)
"""

from __future__ import annotations

from dataclasses import dataclass

from ppo.distributed import parallel, pipeline
from ppo.rollout.fused import rollout_decoder
from ppo.models.lora import AdaptersOff, apply_lora, merged_for_export
from ppo.models.recompute import enable_recompute
from ppo.rollout.decoding import WeightCopyDecoder
from ppo.models import ScoreModel, freeze, load_causal_lm, load_score_model, load_tokenizer
from ppo.rollout.collect import Models
from ppo.stages.ppo.pools import RemoteRoles, check_critic, check_frozen_roles, check_reward_statistics, critic_path


@dataclass
class RolloutLayout:
    """Where rollout runs relative to the training layout (``eval_mode``, PaddleNLP's name for it)."""
    pipeline: bool                # the training models are pipeline stages
    merge_for_rollout: bool       # eval_mode 'single' under tensor parallel: rollout on whole copies
    separate_rollout: bool        # rollout on copies (pipeline, or merged tensor-parallel shards)
    split: object | None          # the group of ranks that split one data rank's prompts (None: no split)
    part: int                     # this rank's share of that split

    @property
    def split_ranks(self) -> int:
        return self.split.nranks if self.split is not None else 1


def rollout_layout(args, ctx) -> RolloutLayout:
    pipeline_on = ctx.pp_degree > 1
    # eval_mode picks the rollout layout (PaddleNLP's name): '' follows the training layout;
    # the pipeline cannot decode, so it rolls out on tensor-parallel copies by default
    eval_mode = args.eval_mode or ("tensor_parallel" if pipeline_on else "")
    merge = eval_mode == "single" and ctx.tp_degree > 1
    separate = pipeline_on or merge
    split = parallel.rollout_group(merge) if separate else None
    return RolloutLayout(pipeline=pipeline_on, merge_for_rollout=merge, separate_rollout=separate, split=split,
                         part=split.rank if split is not None else 0)


@dataclass
class PPOModels:
    actor: object                 # the actor that trains (this rank's pipeline stage under pipeline)
    critic: object | None         # the critic that trains (None without the gae estimator)
    tokenizer: object             # the actor's tokenizer
    rollout: Models               # what rollout decodes and scores with (copies or the training models)
    layout: RolloutLayout


def build_ppo_models(args, ctx, uses_critic: bool, dtype: str | None) -> PPOModels:
    """Load the actor, reference, reward model and critic in this run's layout (tensor-parallel
    shards, pipeline stages, rollout copies) and the rollout decoder.  Without
    ``reward_model_name_or_path`` no reward model is loaded (``rollout.reward`` is None)."""
    check_frozen_roles(args)
    with_reward = bool(args.reward_model_name_or_path)
    tokenizer = load_tokenizer(args.actor_model_name_or_path, "actor_model_name_or_path")
    reward_tokenizer = load_tokenizer(args.reward_model_name_or_path, "reward_model_name_or_path") if with_reward \
        else None
    if uses_critic:
        check_critic(args, tokenizer)
    layout = rollout_layout(args, ctx)
    # tensor parallel: every rank loads its shard of the single checkpoint; the policies keep
    # their logits split over the vocabulary (log-probs are computed without gathering them)
    tp = parallel.tp_kwargs()
    rollout_tp = {} if layout.merge_for_rollout else tp

    # (the loaders put the fast CPU paths on paddlenlp's layers; a pipeline twin built from a model
    # has its own layers and keeps paddlenlp's)
    def policy(kwargs):
        return load_causal_lm(args.actor_model_name_or_path, "actor_model_name_or_path",
                              **({**kwargs, "tensor_parallel_output": True} if kwargs else {}))

    def critic(kwargs):
        return load_score_model(critic_path(args), score_type="critic", what="reward_critic_model_name_or_path",
                                **kwargs)

    def trainable(model, path: str, what: str):
        # the model that trains: the model itself, or its pipeline-parallel twin (this rank's stage)
        if not layout.pipeline:
            return model
        pipeline.check_pipeline_config(model.config, what, path)
        return pipeline.score_pipe(model) if isinstance(model, ScoreModel) else pipeline.policy_pipe(model)

    actor = trainable(policy(tp), args.actor_model_name_or_path, "actor_model_name_or_path")
    if args.lora:
        apply_lora(actor, args.lora_rank, args.lora_alpha, args.lora_target_modules, seed=args.seed)
    if args.recompute:
        enable_recompute(actor, args.recompute_granularity)
    # a LoRA actor's reference is its own base weights with the adapters off: no second copy; but
    # when rollout runs on whole copies (eval_mode single) the reference must be whole as well
    shared_reference = args.lora and not layout.separate_rollout
    # resource pools: the roles of other pools score (the critic trains too) there (ppo.stages.ppo.pools)
    remote = ctx.plan.remote_roles() if ctx.plan is not None else ()
    reference = None if "reference" in remote else AdaptersOff(actor) if shared_reference else freeze(policy(rollout_tp))
    reward = freeze(load_score_model(args.reward_model_name_or_path, score_type="reward",
                                     what="reward_model_name_or_path", trained_head=True, **rollout_tp)) \
        if with_reward and "reward" not in remote else None
    check_reward_statistics(args, reward)
    trained_critic = None
    if uses_critic and "critic" not in remote:
        trained_critic = trainable(critic(tp), critic_path(args), "reward_critic_model_name_or_path")
        critic_training_options(args, trained_critic)
    rollout_actor, rollout_critic = actor, trained_critic
    if layout.separate_rollout:
        rollout_actor = freeze(policy(rollout_tp))
        rollout_critic = freeze(critic(rollout_tp)) if trained_critic is not None else None
    # the lean decoder reads the rollout actor's parameters directly (never stale); on GPU builds
    # with paddlenlp_ops, PaddleNLP's fused model holds a copy that RolloutWeights refreshes
    decoder = (rollout_decoder(rollout_actor, static_decode=args.rollout_static_graph, dtype=dtype)
               if args.use_inference_model else None)
    rollout = Models(actor=rollout_actor, reference=reference, reward=reward, critic=rollout_critic,
                     actor_tokenizer=tokenizer, reward_tokenizer=reward_tokenizer, decoder=decoder,
                     remote=RemoteRoles(ctx) if remote else None)
    return PPOModels(actor=actor, critic=trained_critic, tokenizer=tokenizer, rollout=rollout, layout=layout)


def critic_training_options(args, critic) -> None:
    """LoRA (adapters + the whole value head train) and recompute on the critic that trains."""
    if args.critic_lora:
        apply_lora(critic, args.lora_rank, args.lora_alpha, args.lora_target_modules,
                   trainable=(r"score_head\..*",), seed=args.seed + 1)
    if args.critic_recompute:
        enable_recompute(critic, args.critic_recompute_granularity)


def sampling_seed(seed: int, data_rank: int, part: int = 0) -> int:
    """The random stream each data rank (and each share ``part`` of a split rollout) samples its
    responses from: the ranks of one tensor-parallel rollout model share theirs and decode alike;
    a rollout pool's rank uses its data rank's."""
    return seed + 1_000_003 * data_rank + 10_007 * part


class RolloutWeights:
    """Knows whether what rolls out decodes the training weights, and makes it so.

    Three things can hold a copy of the trained weights: the rollout copies (``separate_rollout``),
    a rollout decoder with its own weight layout (the fused GPU model) and the rollout's pool
    (``resource_pools``: its copy of the actor).  ``changed()`` after every update marks them
    stale; ``refresh()`` before a rollout brings them up to date (once).
    """

    def __init__(self, models: PPOModels, before_export=None):
        self.models = models
        self.before_export = before_export  # brings offloaded training weights back first
        self.copies_stale = models.layout.separate_rollout
        self.pool = models.rollout.rollout_pool
        self.pool_stale = self.pool is not None  # (a resumed run's weights are not the pool's)

    def changed(self) -> None:
        self.copies_stale = self.models.layout.separate_rollout
        self.pool_stale = self.pool is not None
        self._decoder_reloads()

    def refresh(self) -> None:
        if self.pool_stale:
            if self.before_export is not None:
                self.before_export()
            # whole weights (merged over tensor parallel; a LoRA actor's W + scaling A@B)
            with merged_for_export(parallel.unwrap(self.models.actor)):
                self.pool.send_weights(pipeline.tensor_parallel_state(self.models.actor))
            self.pool_stale = False
        if not self.copies_stale:
            return
        if self.before_export is not None:
            self.before_export()
        m, layout = self.models, self.models.layout
        pairs = [(m.actor, m.rollout.actor)] + ([(m.critic, m.rollout.critic)] if m.critic is not None else [])
        for trained, target in pairs:
            # a LoRA model exports W + scaling A@B (the copies are plain models), restored after
            with merged_for_export(parallel.unwrap(trained)):
                if layout.pipeline:
                    pipeline.export_weights(trained, target, layout.merge_for_rollout)
                else:
                    pipeline.export_tensor_parallel(trained, target)
        self.copies_stale = False
        self._decoder_reloads()

    def _decoder_reloads(self) -> None:
        # a decoder with its own weight layout (the fused GPU model) reloads before its next use
        if isinstance(self.models.rollout.decoder, WeightCopyDecoder):
            self.models.rollout.decoder.weights_changed()
