"""The PPO loop.  Read ``train`` top to bottom: it is the algorithm.

    for each prompt batch:
        rollout    actor generates; actor/reference log-probs, reward score, critic values
        advantages KL-shaped rewards -> GAE (or a group / REINFORCE++ estimator), whitening
        update     update_iters epochs over mini-batches: actor step (clipped surrogate [+ ptx]),
                   critic step (clipped value loss)
        log / evaluate / save on their intervals

Losses use one token-mean: every action token of an optimizer step (all its micro-batches, all
data ranks) has the same weight, so batch 4 x accumulation 1 and batch 1 x accumulation 4 give
the same update.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import paddle

from ppo import algorithms as algo
from ppo import checkpoint, parallel, pipeline
from ppo.advantages import compute_advantages, mean_sequence_kl
from ppo.args import PPOArgs
from ppo.batching import GlobalBatchSampler, token_mean_weights, total_steps
from ppo.checkpoint import save_pretrained_atomic, start_or_resume
from ppo.data import PromptOnlyDataset, SupervisedDataset, answer_mask, build_template, import_user_modules
from ppo.entry import prepare_output_dir, set_seed
from ppo.errors import UserError
from ppo.experience import Experience
from ppo.fused_inference import rollout_decoder
from ppo.guard import NonFiniteGuard, check_weights_finite
from ppo.metrics import MetricsLogger, StepCadence, Timer
from ppo.offload import (
    default_store,
    offload_model,
    offload_optimizer,
    parse_offload_level,
    reload_model,
    reload_optimizer,
)
from ppo.models import check_max_length, check_model_path, load_causal_lm, load_score_model, load_tokenizer
from ppo.models.score_model import position_ids_from_mask
from ppo.optim import Precision, build_optimizer, clear_grad, global_grad_norm
from ppo.parallel import unwrap
from ppo.rollout import GenerationConfig, Models, collect, forward_log_probs, log_probs_from_logits, same_vocabulary


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.stop_gradient = True
    return model


class PPOTrainer:
    def __init__(self, args: PPOArgs):
        self.args = args
        self.ctx = parallel.init_parallel(args, pipeline=True)
        prepare_output_dir(args.output_dir)
        set_seed(args.seed)
        self.gen = GenerationConfig(
            max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
            num_return_sequences=args.num_return_sequences, micro_batch_size=args.rollout_micro_batch_size)
        self.uses_critic = args.adv_estimator == "gae"
        self.precision = Precision(args.bf16, args.fp16, parallel.device() == "gpu")
        self._load_models()
        self._load_data()
        self._build_optimizers()
        self.kl_ctl = (algo.AdaptiveKLController(args.kl_coeff, args.kl_target, args.kl_horizon)
                       if args.adaptive_kl else algo.FixedKLController(args.kl_coeff))
        self.metrics = MetricsLogger(args.output_dir, enabled=self.ctx.is_main)
        self.offload = Offload(parse_offload_level(args.offload_level), args.offload_dir, self)
        self.guard = NonFiniteGuard(args.max_nonfinite_steps, "PPO")
        self.timer = Timer()
        self.shuffle_rng = np.random.default_rng([args.seed, self.ctx.data_rank])
        stream = 1_000_003 * self.ctx.data_rank + 10_007 * self.rollout_part
        if stream > 0:
            # each data rank (and each share of a split rollout) samples its responses from its own
            # random stream; the ranks of one tensor-parallel rollout model share theirs and decode
            # identically
            paddle.seed(args.seed + stream)
        self.start_step = 0
        folder = start_or_resume(args, self.ctx)
        if folder:
            self._resume(folder)

    def _models_and_optimizers(self):
        models, optimizers = {"policy": self.actor}, {"actor": self.actor_opt}
        if self.uses_critic:
            models["value"], optimizers["critic"] = self.critic, self.critic_opt
        return models, optimizers

    def _resume(self, folder: str) -> None:
        models, optimizers = self._models_and_optimizers()
        state, rng_extra = checkpoint.resume(folder, self.ctx, self.args, "ppo", models, optimizers)
        self.start_step = int(state["global_step"])
        self.kl_ctl.set_state_dict(state["extra"]["kl_controller"])
        if self.ptx is not None:
            self.ptx_step = int(state["extra"]["ptx_step"])
        self.shuffle_rng.bit_generator.state = rng_extra["shuffle_rng"]
        print(f"resumed from {folder} at PPO step {self.start_step}")

    # -- set-up ----------------------------------------------------------------------------

    def _load_models(self):
        args = self.args
        actor_config = check_model_path(args.actor_model_name_or_path, "actor_model_name_or_path")
        check_max_length(actor_config, args.max_length, args.actor_model_name_or_path)
        check_model_path(args.reward_model_name_or_path, "reward_model_name_or_path")
        critic_path = args.reward_critic_model_name_or_path or args.reward_model_name_or_path
        self.tokenizer = load_tokenizer(args.actor_model_name_or_path, "actor_model_name_or_path")
        reward_tokenizer = load_tokenizer(args.reward_model_name_or_path, "reward_model_name_or_path")
        if self.uses_critic:
            critic_tokenizer = load_tokenizer(critic_path, "reward_critic_model_name_or_path")
            if not same_vocabulary(self.tokenizer, critic_tokenizer):
                raise UserError(f"the critic ('{critic_path}') must share the actor's vocabulary "
                                f"({len(critic_tokenizer)} vs {len(self.tokenizer)} tokens): it scores actor tokens")
        # tensor parallel: every rank loads its shard of the single checkpoint; the policies keep
        # their logits split over the vocabulary (log-probs are computed without gathering them)
        ctx = self.ctx
        self.pipeline = ctx.pp_degree > 1
        eval_mode = args.eval_mode or ("tensor_parallel" if self.pipeline else "")
        # rollout on separate copies: the pipeline cannot decode, and 'single' merges the TP shards
        self.merge_for_rollout = eval_mode == "single" and ctx.mp_degree > 1
        self.separate_rollout = self.pipeline or self.merge_for_rollout
        self.rollout_split = parallel.rollout_group(self.merge_for_rollout) if self.separate_rollout else None
        self.rollout_part = self.rollout_split.rank if self.rollout_split is not None else 0
        tp = parallel.tp_kwargs()
        rollout_tp = {} if self.merge_for_rollout else tp

        def policy(kwargs):
            return load_causal_lm(args.actor_model_name_or_path, "actor_model_name_or_path",
                                  **({**kwargs, "tensor_parallel_output": True} if kwargs else {}))

        def critic(kwargs):
            return load_score_model(critic_path, score_type="critic", what="reward_critic_model_name_or_path",
                                    **kwargs)

        self.actor = self._trainable(policy(tp), args.actor_model_name_or_path, "actor_model_name_or_path")
        reference = freeze(policy(rollout_tp))
        reward = freeze(load_score_model(args.reward_model_name_or_path, score_type="reward",
                                         what="reward_model_name_or_path", **rollout_tp))
        if args.normalize_reward and reward.normalizer.kind == "none":
            raise UserError(f"normalize_reward is set but the reward model at '{args.reward_model_name_or_path}' "
                            "carries no score statistics (train it with normalizer_type RunningMeanStd)")
        self.critic = (self._trainable(critic(tp), critic_path, "reward_critic_model_name_or_path")
                       if self.uses_critic else None)
        # the models that roll out: the training models themselves, or copies refreshed from them
        # before every rollout (export_rollout_weights)
        self.rollout_actor, self.rollout_critic = self.actor, self.critic
        if self.separate_rollout:
            self.rollout_actor = freeze(policy(rollout_tp))
            self.rollout_critic = freeze(critic(rollout_tp)) if self.uses_critic else None
        self._rollout_stale = self.separate_rollout
        # the rollout decoder reads the actor's parameters directly: always the current weights
        # (under tensor parallel, this rank's shards, with the partial sums all-reduced); on GPU
        # builds with paddlenlp_ops, PaddleNLP's fused model holds a copy, marked stale after every
        # update (_decoder_weights_changed) and refreshed before the next generation
        decoder = (rollout_decoder(self.rollout_actor, static_decode=args.rollout_static_graph,
                                   dtype=self.precision.dtype) if args.use_inference_model else None)
        self.models = Models(actor=self.rollout_actor, reference=reference, reward=reward, critic=self.rollout_critic,
                             actor_tokenizer=self.tokenizer, reward_tokenizer=reward_tokenizer, decoder=decoder)

    def _trainable(self, model, path: str, what: str):
        """The model that trains: ``model`` itself, or its pipeline-parallel twin (this rank's stage)."""
        if not self.pipeline:
            return model
        pipeline.check_pipeline_config(model.config, what, path)
        return pipeline.score_pipe(model) if hasattr(model, "score_head") else pipeline.policy_pipe(model)

    def export_rollout_weights(self) -> None:
        """Refresh the rollout copies from the training models (after every update; exact copies)."""
        if not self._rollout_stale:
            return
        self.offload.reload_trained()
        pairs = [(self.actor, self.rollout_actor)]
        if self.uses_critic:
            pairs.append((self.critic, self.rollout_critic))
        for trained, target in pairs:
            if self.pipeline:
                pipeline.export_weights(trained, target, self.merge_for_rollout)
            else:
                pipeline.export_tensor_parallel(trained, target)
        self._rollout_stale = False
        self._decoder_weights_changed()

    def _decoder_weights_changed(self) -> None:
        """A rollout decoder with its own weight copy (the fused GPU model) refreshes it before its next use."""
        changed = getattr(self.models.decoder, "weights_changed", None)
        if changed is not None:
            changed()

    def _load_data(self):
        args, ctx = self.args, self.ctx
        if args.extra_modules:
            import_user_modules([m for m in args.extra_modules.split(",") if m])
        template = build_template(args)
        # prompts leave room for the response inside max_length
        prompt_limit = max(1, args.max_length - args.max_new_tokens)
        self.prompts = PromptOnlyDataset(args.train_datasets, self.tokenizer, prompt_limit, seed=args.seed,
                                         template=template)
        if args.eval_datasets:
            self.eval_prompts = PromptOnlyDataset(args.eval_datasets, self.tokenizer, prompt_limit, seed=args.seed,
                                                  template=template)
        elif args.eval_split_ratio > 0:
            self.prompts, self.eval_prompts = self.prompts.split(args.eval_split_ratio, seed=args.seed)
        else:
            self.eval_prompts = None
        self.prompt_sampler = GlobalBatchSampler(
            len(self.prompts), args.per_device_prompt_batch_size, 1, ctx.data_world, ctx.data_rank, seed=args.seed,
            what=f"train_datasets '{args.train_datasets}'")
        self.total_steps = total_steps(args, self.prompt_sampler.steps_per_epoch)
        self.ptx = None
        if args.ptx_datasets:
            self.ptx = SupervisedDataset(args.ptx_datasets, self.tokenizer, args.max_length, seed=args.seed,
                                         template=template)
            self.ptx_sampler = GlobalBatchSampler(len(self.ptx), args.per_device_train_batch_size, 1, ctx.data_world,
                                                  ctx.data_rank, seed=args.seed + 1,
                                                  what=f"ptx_datasets '{args.ptx_datasets}'")
            self.ptx_step = 0
        rollout_batch = args.per_device_prompt_batch_size * args.num_return_sequences
        group = args.per_device_train_batch_size * args.gradient_accumulation_steps
        split = self.rollout_split.nranks if self.rollout_split is not None else 1
        if args.per_device_prompt_batch_size % split != 0:
            raise UserError(f"per_device_prompt_batch_size = {args.per_device_prompt_batch_size} must be divisible by "
                            f"the {split} ranks that share its rollout (pipeline_parallel_degree"
                            f"{' x tensor_parallel_degree' if self.merge_for_rollout else ''})")
        if rollout_batch % group != 0:
            raise UserError(f"per_device_prompt_batch_size x num_return_sequences = {rollout_batch} must be divisible "
                            f"by per_device_train_batch_size x gradient_accumulation_steps = {group}")
        self.steps_per_update = rollout_batch // group

    def _build_optimizers(self):
        args = self.args
        optimizer_steps = self.total_steps * args.update_iters * self.steps_per_update
        common = dict(beta1=args.adam_beta1, beta2=args.adam_beta2, epsilon=args.adam_epsilon,
                      max_grad_norm=args.max_grad_norm)
        self.actor_opt, self.actor_sched = build_optimizer(
            self.actor, args.learning_rate, args.weight_decay, optimizer_steps, scheduler_type=args.lr_scheduler_type,
            warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps, **common)
        self.actor_train, self.actor_opt = parallel.wrap_for_training(self.actor, self.actor_opt, args.sharding)
        if self.uses_critic:
            self.critic_opt, self.critic_sched = build_optimizer(
                self.critic, args.critic_learning_rate, args.critic_weight_decay, optimizer_steps,
                scheduler_type=args.critic_lr_scheduler_type, warmup_ratio=args.critic_warmup_ratio, **common)
            self.critic_train, self.critic_opt = parallel.wrap_for_training(self.critic, self.critic_opt,
                                                                            args.sharding)

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> dict:
        from tqdm import tqdm

        args = self.args
        bar = tqdm(total=self.total_steps, desc="ppo", disable=args.disable_tqdm or not self.ctx.is_main,
                   dynamic_ncols=True)
        cadence = StepCadence(args, self.total_steps, self.metrics, self.evaluate, self.save_checkpoint)
        bar.update(self.start_step)
        if args.eval_steps > 0 and self.start_step == 0:
            self.evaluate(0, bar.write)  # the starting point of every curve
        for step in range(self.start_step, self.total_steps):
            done = step + 1
            with self.timer("rollout"):
                exp = self.rollout(step)
            bar.update(1)
            log_ratio = (exp.old_log_probs - exp.ref_log_probs) * exp.action_mask
            stats = None
            if self.guard.ok(done, reward=exp.end_scores, kl=log_ratio):
                with self.timer("advantages"):
                    exp = self.advantages(exp)
                self.update_kl_controller(exp)
                with self.timer("update"):
                    stats = self.update(exp, done)
                stats.update(self.rollout_stats(exp))
                stats.update(self.timer.pop())
                stats["skipped_updates"] = float(self.guard.skipped)
            cadence.end_of_step(done, stats, bar.write)
        bar.close()
        final = self.evaluate(self.total_steps, print)
        self.save(args.output_dir, self.total_steps)
        self.metrics.close()
        self.offload.close()
        return final

    # -- phases ----------------------------------------------------------------------------

    def prompt_batch(self, dataset, indices):
        batch = dataset.get_collator()([dataset[i] for i in indices])
        return batch["input_ids"], batch["attention_mask"]

    def rollout(self, step: int) -> Experience:
        ids, mask = self.prompt_batch(self.prompts, self.prompt_sampler.micro_batches(step)[0])
        self.export_rollout_weights()
        split = self.rollout_split
        if split is not None:  # this rank's share of the data rank's prompts
            share = ids.shape[0] // split.nranks
            ids, mask = (t[self.rollout_part * share:(self.rollout_part + 1) * share] for t in (ids, mask))
        self.offload.before_generation()
        exp = collect(self.models, ids, mask, self.gen, self.args.max_length, self.args.normalize_reward,
                      before_scoring=self.offload.before_scoring)
        self.offload.after_scoring()
        return gather_experience(exp, split, self.tokenizer.pad_token_id) if split is not None else exp

    def advantages(self, exp: Experience) -> Experience:
        """``exp`` with KL, shaped rewards, advantages and returns (``ppo.advantages``, pure)."""
        return compute_advantages(exp, self.args, self.kl_ctl.value, moments=self._global_moments)

    def update_kl_controller(self, exp: Experience) -> None:
        """Steer the KL coefficient by this iteration's mean sequence KL over every data rank."""
        self.kl_ctl.update(parallel.mean_over_data(mean_sequence_kl(exp)), exp.batch_size * self.ctx.data_world)

    def _global_moments(self, values, mask):
        """(mean, unbiased var) of the masked ``values`` over every data rank's rollout; None in one
        data rank (``masked_whiten`` computes them locally)."""
        if self.ctx.data_world == 1:
            return None
        m = mask.astype("float64")
        v = values.astype("float64") * m
        local = np.array([float(v.sum()), float((v * v).sum()), float(m.sum())])
        total = parallel.all_gather_data(local).reshape(-1, 3).sum(axis=0)
        mean = total[0] / total[2]
        var = (total[1] - total[2] * mean * mean) / max(total[2] - 1, 1)
        return mean, var

    def update(self, exp: Experience, step: int) -> dict:
        """``update_iters`` epochs of actor and critic steps over mini-batches of ``exp``."""
        self.offload.before_update()
        args = self.args
        mb, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
        stats: dict[str, list] = {}
        for _ in range(args.update_iters):
            order = self.shuffle_rng.permutation(exp.batch_size) if args.shuffle_minibatches \
                else np.arange(exp.batch_size)
            for s in range(self.steps_per_update):
                rows = order[s * mb * accum:(s + 1) * mb * accum]
                micro = [exp.select(rows[i * mb:(i + 1) * mb]) for i in range(accum)]
                # the token-mean over the whole optimizer step (every micro-batch and data rank)
                weights = token_mean_weights([float(m.action_mask.sum()) for m in micro], self.ctx.data_world)
                for k, v in self.actor_step(micro, weights, step).items():
                    stats.setdefault(k, []).append(v)
                if self.uses_critic:
                    for k, v in self.critic_step(micro, weights, step).items():
                        stats.setdefault(k, []).append(v)
        return {k: parallel.mean_over_data(float(np.mean(v))) for k, v in stats.items()}

    # One optimizer step of the actor or critic over the micro-batches ``micro`` (weights ``weights``:
    # each micro-batch's share of the step's token-mean).  The objectives are written once and run
    # either per micro-batch here or inside the pipeline's last stage (``_pipeline_pass``).

    def _actor_objective(self, log_probs, entropy, m, w):
        """(weighted loss to differentiate, stats) of one micro-batch from its log-probs."""
        args = self.args
        loss, s = algo.actor_loss(log_probs, m.old_log_probs, m.advantages, m.action_mask, args.clip_range_ratio,
                                  args.clip_range_ratio_high or None, args.dual_clip or None)
        mean_entropy = algo.masked_mean(entropy, m.action_mask)
        total = loss
        if args.kl_mode == "loss":
            total = total + self.kl_ctl.value * algo.kl_loss(log_probs, m.ref_log_probs, m.action_mask,
                                                             args.kl_estimator)
        if args.entropy_coeff:
            total = total - args.entropy_coeff * mean_entropy
        # the mean over data ranks (update) makes the w-weighted actor_loss the token-mean
        return total * w, {"actor_loss": float(loss) * w, "abs_actor_loss": abs(float(loss)),
                           "clip_frac": s["clip_frac"], "approx_kl": s["approx_kl"], "entropy": float(mean_entropy)}

    def _critic_objective(self, scores, m, w):
        values = scores.squeeze(-1)[:, :-1].astype("float32")
        loss, s = algo.critic_loss(values, m.values, m.returns, m.action_mask, self.args.clip_range_value)
        return loss * w, {"critic_loss": float(loss) * w, "value_clip_frac": s["value_clip_frac"]}

    @staticmethod
    def _combine(parts: list[dict], weighted: tuple) -> dict:
        """Stats of a step from its micro-batches': sums for the pre-weighted ones, means for the rest."""
        n = len(parts)
        return {k: sum(p[k] for p in parts) / (1 if k in weighted else n) for k in parts[0]}

    def _micro_steps(self, train_model, micro, weights, objective) -> list[dict]:
        """Backward of ``objective(m, w) -> (loss, stats)`` for every micro-batch (gradients
        accumulate; data-parallel ones are reduced on the last); each micro-batch's stats."""
        parts = []
        for i, (m, w) in enumerate(zip(micro, weights)):
            with self._sync(train_model, i == len(micro) - 1):
                total, stats = objective(m, w)
                self.precision.backward(total)
            parts.append(stats)
        return parts

    def actor_step(self, micro: list[Experience], weights: list[float], step: int) -> dict:
        args = self.args
        if self.pipeline:
            out = self._pipeline_actor(micro, weights)
        else:
            def objective(m, w):
                with self.precision.autocast():
                    log_probs, entropy = forward_log_probs(self.actor_train, m.sequences, m.attention_mask,
                                                           args.temperature, with_entropy=True,
                                                           entropy_grad=bool(args.entropy_coeff))
                total, stats = self._actor_objective(log_probs, entropy, m, w)
                if ptx_feed is not None:
                    batch, answer = next(ptx_feed)
                    with self.precision.autocast():
                        # split-vocabulary safe: the same log-prob path as the actor loss
                        ptx_lp, _ = forward_log_probs(self.actor_train, batch["input_ids"], batch["attention_mask"])
                    ptx = algo.nll_sum(ptx_lp.astype("float32"), answer) * ptx_scale
                    stats["ptx_loss"] = float(ptx)
                    total = total + args.ptx_coeff * ptx
                return total, stats

            ptx_feed = None
            if self.ptx is not None:  # one ptx micro-batch per micro-batch, one token-mean over the step
                ptx_batches = [self._ptx_batch() for _ in micro]
                answers = [answer_mask(b["labels"]) for b in ptx_batches]
                ptx_scale = self._ptx_scale(answers)
                ptx_feed = iter(zip(ptx_batches, answers))
            out = self._combine(self._micro_steps(self.actor_train, micro, weights, objective),
                                weighted=("actor_loss", "ptx_loss"))
        out["actor_grad_norm"] = self._step(self.actor_opt, self.actor_sched, self.actor, step,
                                            actor_loss=out["actor_loss"])
        return out

    def critic_step(self, micro: list[Experience], weights: list[float], step: int) -> dict:
        if self.pipeline:
            out = self._pipeline_critic(micro, weights)
        else:
            def objective(m, w):
                with self.precision.autocast():
                    scores = self.critic_train(m.sequences, m.attention_mask).scores
                return self._critic_objective(scores, m, w)

            out = self._combine(self._micro_steps(self.critic_train, micro, weights, objective),
                                weighted=("critic_loss",))
        out["critic_grad_norm"] = self._step(self.critic_opt, self.critic_sched, self.critic, step,
                                             critic_loss=out["critic_loss"])
        return out

    def _ptx_batch(self, count: int = 1):
        """The next ``count`` ptx micro-batches as one batch (rows in order, right-padded by the
        dataset's collator to the longest)."""
        indices = []
        for _ in range(count):
            indices += list(self.ptx_sampler.micro_batches(self.ptx_step)[0])
            self.ptx_step += 1
        return self.ptx.get_collator()([self.ptx[i] for i in indices])

    def _ptx_scale(self, answers: list) -> float:
        """The factor that makes a ptx negative log-likelihood sum a token-mean over the step's ptx
        answer tokens (``answers``: this rank's answer masks) on every data rank (times data_world,
        which the data-parallel mean undoes)."""
        tokens = sum(int(a.astype("int64").sum()) for a in answers)
        return token_mean_weights([tokens], self.ctx.data_world)[0] / max(tokens, 1)

    # -- pipeline parallel: the same objectives inside fleet's 1F1B schedule -------------------

    def _pipeline_pass(self, train_model, optimizer, inputs, labels, compute, keys) -> list[dict]:
        """One forward/backward pass of fleet's pipeline schedule over len(micro) micro-batches; the
        last stage runs ``compute(output, labels)``.  Returns every micro-batch's stats (``keys``),
        on every stage."""
        loss_layer = unwrap(train_model)._loss_fn[0]
        loss_layer.compute, loss_layer.stats = compute, []
        loss_layer.accumulate_steps = self.args.gradient_accumulation_steps
        data = train_model._prepare_training([inputs, labels], optimizer, None)
        with self.precision.autocast():
            train_model.forward_backward_pipeline(data, self.precision.scaler)
        n = self.args.gradient_accumulation_steps
        flat = [s[k] for s in loss_layer.stats for k in keys] if loss_layer.stats else [0.0] * (n * len(keys))
        flat = parallel.broadcast_from_last_stage(flat)
        return [dict(zip(keys, flat[i * len(keys):(i + 1) * len(keys)])) for i in range(n)]

    @staticmethod
    def _pipeline_inputs(ids, mask):
        # (ids, mask, positions): a bool mask, so paddlenlp's pipeline stages read the int64 third
        # tensor as the position ids on every device type
        return (ids, mask.astype("bool"), position_ids_from_mask(mask))

    @staticmethod
    def _row_weights(micro: list[Experience], weights: list[float]):
        # [rows, 1]: the pipeline slices every label tensor as [micro-batch rows, :]
        return paddle.to_tensor(np.concatenate([np.full([m.batch_size, 1], w, dtype=np.float32)
                                                for m, w in zip(micro, weights)]))

    def _pipeline_actor(self, micro: list[Experience], weights: list[float]) -> dict:
        args = self.args
        whole = _concat_experience(micro)
        labels = (whole.sequences, whole.old_log_probs, whole.advantages, whole.action_mask, whole.ref_log_probs,
                  self._row_weights(micro, weights))
        split = parallel.vocab_is_split(self.actor)

        def compute(logits, labels):
            sequences, old, adv, mask, ref, w = labels
            log_probs, entropy = log_probs_from_logits(logits, sequences, args.temperature, split, with_entropy=True,
                                                       entropy_grad=bool(args.entropy_coeff))
            m = SimpleNamespace(action_mask=mask, old_log_probs=old, ref_log_probs=ref, advantages=adv)
            return self._actor_objective(log_probs, entropy, m, float(w[0, 0]))

        keys = ("actor_loss", "abs_actor_loss", "clip_frac", "approx_kl", "entropy")
        parts = self._pipeline_pass(self.actor_train, self.actor_opt,
                                    self._pipeline_inputs(whole.sequences, whole.attention_mask), labels, compute, keys)
        out = self._combine(parts, weighted=("actor_loss",))
        if self.ptx is not None:
            batch = self._ptx_batch(len(micro))  # one ptx micro-batch per pipeline micro-batch
            answer = answer_mask(batch["labels"])
            ptx_scale = self._ptx_scale([answer])

            def ptx_compute(logits, labels):
                sequences, answer = labels
                log_probs, _ = log_probs_from_logits(logits, sequences, 1.0, split)
                ptx = algo.nll_sum(log_probs.astype("float32"), answer) * ptx_scale
                return args.ptx_coeff * ptx, {"ptx_loss": float(ptx)}

            inputs = self._pipeline_inputs(batch["input_ids"], batch["attention_mask"])
            ptx_parts = self._pipeline_pass(self.actor_train, self.actor_opt, inputs,
                                            (batch["input_ids"], answer), ptx_compute, ("ptx_loss",))
            out["ptx_loss"] = float(sum(p["ptx_loss"] for p in ptx_parts))
        return out

    def _pipeline_critic(self, micro: list[Experience], weights: list[float]) -> dict:
        whole = _concat_experience(micro)
        labels = (whole.values, whole.returns, whole.action_mask, self._row_weights(micro, weights))

        def compute(scores, labels):
            old_values, returns, mask, w = labels
            m = SimpleNamespace(action_mask=mask, values=old_values, returns=returns)
            return self._critic_objective(scores, m, float(w[0, 0]))

        parts = self._pipeline_pass(self.critic_train, self.critic_opt,
                                    self._pipeline_inputs(whole.sequences, whole.attention_mask), labels,
                                    compute, ("critic_loss", "value_clip_frac"))
        return self._combine(parts, weighted=("critic_loss",))

    @staticmethod
    def _sync(model, last: bool):
        import contextlib

        # data-parallel gradients are all-reduced once per optimizer step
        return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()

    def _step(self, optimizer, scheduler, model, step: int, **losses) -> float:
        """Clip and apply the accumulated gradients, unless a loss or the gradient norm is not finite."""
        norm = global_grad_norm(model.parameters(), optimizer)
        if self.guard.ok(step, grad_norm=norm, **losses):
            self.precision.step(optimizer)
            self._rollout_stale = self.separate_rollout
            self._decoder_weights_changed()
        clear_grad(optimizer)  # frees the gradients until the next backward
        scheduler.step()
        return norm

    def rollout_stats(self, exp: Experience) -> dict:
        mask = exp.action_mask
        stats = {
            "reward": float(exp.end_scores.mean()),
            "kl": float(algo.masked_sum(exp.kl, mask, axis=1).mean()),
            "kl_coeff": float(self.kl_ctl.value),
            "response_length": float(exp.response_lengths.astype("float32").mean()),
            "eos_rate": float(exp.ended_with_eos.astype("float32").mean()),
            "advantage_mean": float(algo.masked_mean(exp.advantages, mask)),
            "return_mean": float(algo.masked_mean(exp.returns, mask)),
        }
        if exp.values is not None:
            stats["value_mean"] = float(algo.masked_mean(exp.values, mask))
        return {k: parallel.mean_over_data(v) for k, v in stats.items()}

    # -- evaluation and saving -------------------------------------------------------------

    @paddle.no_grad()
    def evaluate(self, step: int, echo) -> dict:
        """Reward, KL and length of responses to the eval prompts; a few samples to a file."""
        if self.eval_prompts is None:
            return {}
        self.export_rollout_weights()
        args, ctx = self.args, self.ctx
        rng_state = paddle.get_rng_state()
        paddle.seed(args.seed + 7919)  # the same eval samples whatever the training history of the RNG
        n = len(self.eval_prompts)
        per_rank = -(-n // ctx.data_world)
        mine = list(range(ctx.data_rank * per_rank, min(n, (ctx.data_rank + 1) * per_rank)))
        # the ranks that split a rollout (one pipeline) split the data rank's eval prompts too
        split = self.rollout_split
        per_part = -(-per_rank // (split.nranks if split is not None else 1))
        mine = mine[self.rollout_part * per_part:(self.rollout_part + 1) * per_part]
        gen = GenerationConfig(**{**self.gen.__dict__, "num_return_sequences": 1})
        rows, scores, kls, lengths = [], [], [], []
        for start in range(0, len(mine), args.per_device_eval_batch_size):
            ids, mask = self.prompt_batch(self.eval_prompts, mine[start:start + args.per_device_eval_batch_size])
            self.offload.before_generation()
            exp = collect(self.models, ids, mask, gen, args.max_length, args.normalize_reward,
                          before_scoring=self.offload.before_scoring)
            self.offload.after_scoring()
            kl = algo.masked_sum(algo.compute_kl(exp.old_log_probs, exp.ref_log_probs, "k1") * exp.action_mask,
                                 exp.action_mask, axis=1)
            scores.append(exp.end_scores.numpy())
            kls.append(kl.numpy())
            lengths.append(exp.response_lengths.numpy().astype("float64"))
            P = exp.prompt_length
            for b in range(exp.batch_size):
                prompt = [int(t) for t, m in zip(exp.sequences[b, :P].numpy(), exp.attention_mask[b, :P].numpy()) if m]
                response = [int(t) for t, m in zip(exp.sequences[b, P:].numpy(), exp.attention_mask[b, P:].numpy())
                            if m]
                rows.append({"prompt": self.tokenizer.decode(prompt, skip_special_tokens=True),
                             "response": self.tokenizer.decode(response, skip_special_tokens=True),
                             "reward": float(exp.end_scores[b]), "kl": float(kl[b])})
        paddle.set_rng_state(rng_state)
        pad = np.full(per_part - len(mine), np.nan)  # equal sizes for the gathers; NaN marks no prompt
        values = {"score": np.concatenate(scores + [pad]), "kl": np.concatenate(kls + [pad]),
                  "length": np.concatenate(lengths + [pad])}
        if split is not None:
            values = parallel.gather_rows(values, split)
        score, kl_all, length = (parallel.all_gather_data(values[k]) for k in ("score", "kl", "length"))
        keep = ~np.isnan(score)
        metrics = {"reward": float(score[keep].mean()), "reward_std": float(score[keep].std()),
                   "kl": float(kl_all[keep].mean()), "response_length": float(length[keep].mean())}
        self._write_samples(step, rows)
        self.metrics.log(step, metrics, split="eval", echo=echo)
        if ctx.is_main:
            for row in rows[:args.eval_samples_to_write]:
                (echo or print)(f"  reward {row['reward']:+.3f}  kl {row['kl']:+.3f}  "
                                f"{row['prompt']!r} -> {row['response']!r}")
        return metrics

    def _write_samples(self, step: int, rows: list[dict]) -> None:
        """All of this rank's eval generations to eval_samples/step-N.rank-R.jsonl; a few echoed in the log.

        The ranks of a tensor-parallel rollout model generate the same rows: its first rank writes them."""
        if self.ctx.mp_rank != 0 and not self.merge_for_rollout:
            return
        folder = os.path.join(self.args.output_dir, "eval_samples")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"step-{step}.rank-{self.ctx.rank}.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def save_checkpoint(self, step: int) -> None:
        """A resumable ``checkpoint-<step>`` (policy/, value/, optimizers, random states; atomic)."""
        self.offload.before_update()  # optimizer state must be resident to be saved
        models, optimizers = self._models_and_optimizers()
        check_weights_finite(models)
        extra = {"kl_controller": self.kl_ctl.state_dict(), "ptx_step": getattr(self, "ptx_step", 0)}
        checkpoint.save_checkpoint(
            os.path.join(self.args.output_dir, f"checkpoint-{step}"), self.ctx, models, self.tokenizer, optimizers,
            {"global_step": step, "epoch": self.prompt_sampler.epoch_of(step), "stage": "ppo",
             "args": vars(self.args), "extra": extra},
            rng_extra={"shuffle_rng": self.shuffle_rng.bit_generator.state})
        if self.ctx.is_main:
            checkpoint.rotate(self.args.output_dir, self.args.save_total_limit)

    def save(self, target: str, step: int) -> None:
        """The final policy/ and value/ models (from_pretrained-loadable)."""
        self.offload.reload_trained()
        state = {"global_step": step, "stage": "ppo", "kl_coeff": float(self.kl_ctl.value), "args": vars(self.args)}
        for sub, model in self._models_and_optimizers()[0].items():
            save_pretrained_atomic(model, self.tokenizer, os.path.join(target, sub), extra=state)


def _concat_experience(micro: list[Experience]) -> Experience:
    """The micro-batches of one step as one batch (the pipeline splits it back in the same order)."""
    if len(micro) == 1:
        return micro[0]
    import dataclasses

    joined = {}
    for f in dataclasses.fields(Experience):
        first = getattr(micro[0], f.name)
        joined[f.name] = (paddle.concat([getattr(m, f.name) for m in micro]) if isinstance(first, paddle.Tensor)
                          else first)
    return Experience(**joined)


def gather_experience(exp: Experience, group, pad_token_id: int) -> Experience:
    """The rollout shares of the ranks in ``group`` as one experience batch (in rank order),
    responses right-padded to the longest."""
    names = ["sequences", "attention_mask", "action_mask", "old_log_probs", "ref_log_probs", "end_scores",
             "response_lengths", "ended_with_eos"] + (["values"] if exp.values is not None else [])
    arrays = {n: getattr(exp, n).numpy() for n in names}
    arrays["_pad"] = {"sequences": pad_token_id}
    out = parallel.gather_rows(arrays, group)
    return Experience(**{n: paddle.to_tensor(v) for n, v in out.items()}, prompt_length=exp.prompt_length)


class Offload:
    """Which state leaves memory around which phase (``offload_level``); a no-op when empty.

    generation: reference, reward model, critic weights and optimizer states may be out;
    scoring:    reference, reward model and critic are back; optimizer states stay out;
    update:     optimizer states are back; reference and reward model go out again.
    When rollout runs on separate copies (``eval_mode``, pipeline parallel), ``train_model`` takes
    the training actor and critic out from generation to the update: the copies decode and score.
    Parameter objects keep their identity, so optimizers update the same tensors.
    """

    def __init__(self, levels: frozenset, folder: str, trainer: PPOTrainer):
        self.levels, self.trainer = levels, trainer
        self.store = default_store(folder or None) if levels else None
        if "freeze_model" in levels:
            self._frozen(offload_model)

    def _frozen(self, move):
        move(self.trainer.models.reference, self.store, "reference")
        move(self.trainer.models.reward, self.store, "reward")

    def _optimizers(self, move):
        trainer = self.trainer
        move(checkpoint.inner_optimizer(trainer.actor_opt), self.store, "actor")
        if trainer.uses_critic:
            move(checkpoint.inner_optimizer(trainer.critic_opt), self.store, "critic")

    def _trained(self):
        """The training models that leave during generation (and come back for their use)."""
        trainer = self.trainer
        if "train_model" not in self.levels:
            return {}
        models = {"actor": trainer.actor} if trainer.separate_rollout else {}  # else: it decodes
        if trainer.critic is not None:
            models["critic"] = trainer.critic
        return models

    def before_generation(self):
        if "optimizer" in self.levels:
            self._optimizers(offload_optimizer)
        for name, model in self._trained().items():
            offload_model(model, self.store, name)

    def before_scoring(self):
        if "freeze_model" in self.levels:
            self._frozen(reload_model)
        if not self.trainer.separate_rollout:  # the critic scores with its training weights
            self.reload_trained()

    def after_scoring(self):
        if "freeze_model" in self.levels:
            self._frozen(offload_model)

    def before_update(self):
        if "optimizer" in self.levels:
            self._optimizers(reload_optimizer)
        self.reload_trained()

    def reload_trained(self):
        """The training weights back in memory (a no-op for what is not out)."""
        for name, model in self._trained().items():
            reload_model(model, self.store, name)

    def close(self):
        """Everything back in memory and the store's files removed."""
        if self.store is not None:
            self.store.close()
