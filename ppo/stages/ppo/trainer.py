"""The PPO loop.  Read ``train`` top to bottom: it is the algorithm.

    for each prompt batch:
        rollout     actor generates; actor/reference log-probs, reward score (reward model and/or
                    reward functions, ``ppo_rewards``), critic values; with dynamic_sampling,
                    groups without a group advantage are replaced by more rollouts
        advantages  KL-shaped rewards -> GAE (or a group / REINFORCE++ estimator), whitening
        KL control  the adaptive coefficient follows this batch's KL
        update      update_iters epochs over mini-batches: actor step (clipped surrogate [+ ptx]),
                    critic step (clipped value loss)
        log / evaluate / save on their intervals

Losses use one token-mean: every action token of an optimizer step (all its micro-batches, all
data ranks) has the same weight, so batch 4 x accumulation 1 and batch 1 x accumulation 4 give
the same update.

Where the rest lives: model building and the rollout layout (``ppo_models``), data
(``ppo_data``), the advantage step (``advantages``), the gradients of one actor / critic step,
pipeline included (``ppo_steps``), evaluation (``ppo_evaluation``), offload around the phases
(``offload.PhaseOffload``), checkpoints (``checkpoint``).
"""

from __future__ import annotations

import os

import numpy as np
import paddle
from tqdm import tqdm

from ppo.core import algorithms as algo
from ppo.distributed import parallel
from ppo.stages.ppo import steps as ppo_steps
from ppo.storage import checkpoint
from ppo.core.advantages import compute_advantages, mean_sequence_kl
from ppo.args import PPOArgs
from ppo.data import import_user_modules
from ppo.core.experience import Experience
from ppo.distributed.offload import PhaseOffload, parse_offload_level
from ppo.stages.ppo.data import load_ppo_data
from ppo.stages.ppo.evaluation import evaluate_policy, prompt_batch
from ppo.stages.ppo.roles import RolloutWeights, build_ppo_models, sampling_seed
from ppo.core.batching import step_micro_batches, token_mean_weights
from ppo.storage.checkpoint import start_or_resume
from ppo.stages.entry import prepare_output_dir, set_seed
from ppo.storage.graceful import GracefulStop
from ppo.stages.guard import NonFiniteGuard
from ppo.storage.finite import check_weights_finite
from ppo.core.metrics import MetricsLogger, StepCadence, Timer
from ppo.stages.optim import Precision
from ppo.stages.ppo.scoring import RewardScorer, dynamic_sampling, score_metrics
from ppo.rewards import check_reachable
from ppo.rollout.collect import GenerationConfig, collect, gather_experience, keeps_log_probs


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
        if args.extra_modules:  # user reward functions register on import (ppo_data imports them too)
            import_user_modules(args.extra_modules)
        self.scorer = RewardScorer(args)
        if args.reward_server_url:  # stop before loading anything when the endpoint is down
            check_reachable(args.reward_server_url, args.reward_server_timeout, args.reward_server_retries)
        self.function_scores: dict = {}   # the last rollout's reward-function scores [B] by name
        self.sampling_stats: dict = {}    # the last rollout's dynamic-sampling counts
        self.precision = Precision(args.bf16, args.fp16, parallel.device() == "gpu", args.cpu_gemm)
        built = build_ppo_models(args, self.ctx, self.uses_critic, self.precision.dtype)
        self.actor, self.critic, self.tokenizer = built.actor, built.critic, built.tokenizer
        self.models, self.layout = built.rollout, built.layout  # what rolls out; where
        # resource_pools with a critic pool: the critic scores, trains and saves there (self.critic None)
        self.remote_critic = self.models.critic_pool
        self.gen.keep_log_probs = keeps_log_probs(args.rollout_log_probs, self.models.decoder)
        self.data = load_ppo_data(args, self.ctx, self.tokenizer, self.layout.split_ranks,
                                  self.layout.merge_for_rollout)
        self.total_steps, self.steps_per_update = self.data.total_steps, self.data.steps_per_update
        self._build_optimizers()
        self.kl_ctl = (algo.AdaptiveKLController(args.kl_coeff, args.kl_target, args.kl_horizon)
                       if args.adaptive_kl else algo.FixedKLController(args.kl_coeff))
        self.metrics = MetricsLogger(args.output_dir, enabled=self.ctx.is_main)
        self.offload = self._phase_offload()
        self.weights = RolloutWeights(built, before_export=self.offload.reload_trained)
        self.guard = NonFiniteGuard(args.max_nonfinite_steps, "PPO")
        self.timer = Timer()
        self.shuffle_rng = np.random.default_rng([args.seed, self.ctx.data_rank])
        # each data rank (and each share of a split rollout) samples its responses from its own
        # random stream (roles.sampling_seed), seeded after the models are built, so that the
        # stream does not depend on which models this rank built (resource_pools)
        paddle.seed(sampling_seed(args.seed, self.ctx.data_rank, self.layout.part))
        self.start_step = 0
        folder = start_or_resume(args, self.ctx, "ppo")
        if folder:
            self._resume(folder)

    def _build_optimizers(self):
        args = self.args
        optimizer_steps = self.total_steps * args.update_iters * self.steps_per_update
        self.actor_opt, self.actor_sched = ppo_steps.role_optimizer(args, "actor", self.actor, optimizer_steps)
        self.actor_train, self.actor_opt = parallel.wrap_for_training(self.actor, self.actor_opt, args.sharding)
        if self.remote_critic is not None:  # the critic's pool builds its optimizer for as many steps
            self.remote_critic.start_critic(optimizer_steps)
        elif self.uses_critic:
            self.critic_opt, self.critic_sched = ppo_steps.role_optimizer(args, "critic", self.critic, optimizer_steps)
            self.critic_train, self.critic_opt = parallel.wrap_for_training(self.critic, self.critic_opt,
                                                                            args.sharding)

    def _phase_offload(self) -> PhaseOffload:
        optimizers = {"actor": parallel.inner_optimizer(self.actor_opt)}
        # the training models leave during generation when copies decode (else the actor decodes)
        trained = {"actor": self.actor} if self.layout.separate_rollout else {}
        if self.critic is not None:
            optimizers["critic"] = parallel.inner_optimizer(self.critic_opt)
            trained["critic"] = self.critic
        return PhaseOffload(parse_offload_level(self.args.offload_level), self.args.offload_dir,
                            frozen={k: m for k, m in (("reference", self.models.reference),
                                                       ("reward", self.models.reward)) if m is not None},
                            optimizers=optimizers, trained=trained, trained_scores=not self.layout.separate_rollout)

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> dict:
        args = self.args
        checkpoint.drop_metrics_logged_after(args, self.ctx, self.start_step)  # everything resumed is read by now
        bar = tqdm(total=self.total_steps, desc="ppo", disable=args.disable_tqdm or not self.ctx.is_main,
                   dynamic_ncols=True)
        cadence = StepCadence(args, self.total_steps, self.metrics, self.evaluate, self.save_checkpoint,
                              steps_per_epoch=self.data.prompt_sampler.steps_per_epoch)
        bar.update(self.start_step)
        if args.eval_steps > 0 and self.start_step == 0:
            self.evaluate(0, bar.write)  # the starting point of every curve
        stop = GracefulStop(on_stop=self.close)  # SIGTERM / SIGINT: a checkpoint after this step, exit
        # index: 0-based position in the run; step: the number of the step being taken (1-based),
        # by which logs, evaluations and checkpoints are named
        for index in range(self.start_step, self.total_steps):
            step = index + 1
            with self.timer("rollout"):
                exp = self.rollout(index)
            bar.update(1)
            stats = None
            log_ratio = (exp.old_log_probs - exp.ref_log_probs) * exp.action_mask
            if self.guard.ok(step, reward=exp.end_scores, kl=log_ratio):
                with self.timer("advantages"):
                    exp = self.advantages(exp)
                self.update_kl_controller(exp)
                with self.timer("update"):
                    stats = self.update(exp, step)
                stats.update(self.rollout_stats(exp), **self.timer.pop(), skipped_updates=float(self.guard.skipped))
            cadence.end_of_step(step, stats, bar.write)
            stop.after_step(step, cadence, args.output_dir)
        stop.finish()  # a signal from here on lets the final save complete
        bar.close()
        final = self.evaluate(self.total_steps, print)
        self.save(args.output_dir, self.total_steps)
        stop.close()
        self.metrics.close()
        checkpoint.release_output_dir(args.output_dir)
        self.close()
        self.precision.close()  # the run's matmul path (cpu_gemm, bf16) ends with it
        return final

    def close(self) -> None:
        """After the last step (or a stop checkpoint): offload files go, the pools' ranks are released."""
        self.offload.close()
        if self.models.remote is not None:
            self.models.remote.stop()

    # -- phases ----------------------------------------------------------------------------

    def rollout(self, index: int) -> Experience:
        """Responses to this iteration's prompts, scored by every model and reward function (the
        whole data rank's batch); with dynamic_sampling, only groups with a group advantage."""
        indices = self.data.prompt_sampler.micro_batches(index)[0]
        ids, mask = prompt_batch(self.data.prompts, indices)
        exp = self.experience(ids, mask, references=self.data.prompts.references(indices))
        return self.dynamic_sampling(exp, index) if self.args.dynamic_sampling else exp

    def dynamic_sampling(self, exp: Experience, index: int) -> Experience:
        """DAPO's dynamic sampling (``ppo_rewards.dynamic_sampling``): more rollouts of random
        prompts (seeded by the step's index, data rank and try) replace the groups without a group
        advantage."""
        def roll_more(tries: int):
            rng = np.random.default_rng([self.args.seed, index, self.ctx.data_rank, tries])
            prompts, target = self.data.prompts, self.args.per_device_prompt_batch_size
            indices = rng.choice(len(prompts), target, replace=len(prompts) < target).tolist()
            more = self.experience(*prompt_batch(prompts, indices), references=prompts.references(indices))
            return more, self.function_scores

        exp, self.function_scores, self.sampling_stats = dynamic_sampling(
            exp, self.function_scores, roll_more, self.args, self.tokenizer.pad_token_id)
        return exp

    def experience(self, ids, mask, before_scoring=None, references=None) -> Experience:
        """Generate for the prompt batch ``ids`` / ``mask`` and score: the rollout phase.
        ``before_scoring()`` runs between generation and scoring (after the offload's own).
        ``references``: each prompt's reference answer for the reward functions (None: none).
        The reward functions' scores are left in ``self.function_scores``."""
        self.weights.refresh()
        split, layout = self.layout.split, self.layout
        if split is not None:  # this rank's share of the data rank's prompts
            share = ids.shape[0] // split.nranks
            ids, mask = (t[layout.part * share:(layout.part + 1) * share] for t in (ids, mask))

        def scoring():
            self.offload.before_scoring()
            if before_scoring is not None:
                before_scoring()

        self.offload.before_generation()
        exp = collect(self.models, ids, mask, self.gen, self.args.max_length, self.args.normalize_reward,
                      before_scoring=scoring, group_scoring=self.args.length_buckets)
        self.offload.after_scoring()
        if split is not None:
            exp = gather_experience(exp, split, self.tokenizer.pad_token_id)
        # every rank of the data rank holds the whole batch now: its first rank scores it
        exp, self.function_scores = self.scorer.apply(exp, references, self.tokenizer, with_pipeline=True)
        return exp

    def advantages(self, exp: Experience) -> Experience:
        """``exp`` with KL, shaped rewards, advantages and returns (``ppo.core.advantages``, pure)."""
        return compute_advantages(exp, self.args, self.kl_ctl.value, moments=parallel.masked_moments_over_data)

    def update_kl_controller(self, exp: Experience) -> None:
        """Steer the KL coefficient by this iteration's mean sequence KL over every data rank."""
        self.kl_ctl.update(parallel.mean_over_data(mean_sequence_kl(exp)), exp.batch_size * self.ctx.data_world)

    def update(self, exp: Experience, step: int) -> dict:
        """``update_iters`` epochs of actor and critic steps over mini-batches of ``exp``."""
        self.offload.before_update()
        args = self.args
        mb, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
        stats: dict[str, list] = {}
        # length buckets: each step's rows sorted by real length into micro-batches, each packed to
        # its own longest row (the pipeline schedule needs one shape for all micro-batches)
        packs = args.length_buckets and not self.layout.pipeline
        lengths = exp.attention_mask.astype("int64").sum(axis=1).numpy()
        row_tokens = exp.action_mask.sum(axis=1).numpy()
        plan = []  # each optimizer step's micro-batches (rows of exp) and their weights
        for _ in range(args.update_iters):
            order = self.shuffle_rng.permutation(exp.batch_size) if args.shuffle_minibatches \
                else np.arange(exp.batch_size)
            for s in range(self.steps_per_update):
                rows = order[s * mb * accum:(s + 1) * mb * accum]
                # (a fixed number of them when ptx batches are mixed in: one per actor micro-batch)
                cut = step_micro_batches(rows, lengths if packs else None, mb, accum, free=self.data.ptx is None)
                # the token-mean over the whole optimizer step (every micro-batch and data rank)
                tokens = [float(row_tokens[r].sum()) for r in cut]
                plan.append((cut, token_mean_weights(tokens, parallel.sum_over_data(sum(tokens)),
                                                     self.ctx.data_world)))
        if self.remote_critic is not None:  # the critic's pool takes the same steps while the actor's are taken
            self.remote_critic.update_critic(exp, plan, packs, step)
        for cut, weights in plan:
            micro = ppo_steps.micro_batches(exp, cut, packs)
            for k, v in self.actor_step(micro, weights, step).items():
                stats.setdefault(k, []).append(v)
            if self.critic is not None:
                for k, v in self.critic_step(micro, weights, step).items():
                    stats.setdefault(k, []).append(v)
        if self.remote_critic is not None:  # (its guard's skips count with this one's)
            critic_stats, skipped = self.remote_critic.critic_stats()
            stats.update(critic_stats)
            self.guard.skipped += skipped
        return {k: parallel.mean_over_data(float(np.mean(v))) for k, v in stats.items()}

    def actor_step(self, micro: list[Experience], weights: list[float], step: int) -> dict:
        """One optimizer step of the actor over the micro-batches ``micro`` (``weights``: each one's
        share of the step's token-mean)."""
        args, kl = self.args, self.kl_ctl.value
        if self.layout.pipeline:
            out = ppo_steps.pipeline_actor_gradients(self.actor_train, self.actor_opt, self.actor, micro, weights,
                                                     args, kl, self.precision, self.data.ptx)
        else:
            out = ppo_steps.actor_gradients(self.actor_train, micro, weights, args, kl, self.precision, self.data.ptx)
        out["actor_grad_norm"] = self._step(self.actor_opt, self.actor_sched, self.actor, step,
                                            actor_loss=out["actor_loss"])
        return out

    def critic_step(self, micro: list[Experience], weights: list[float], step: int) -> dict:
        """One optimizer step of the critic over the micro-batches ``micro``."""
        if self.layout.pipeline:
            out = ppo_steps.pipeline_critic_gradients(self.critic_train, self.critic_opt, micro, weights, self.args,
                                                      self.precision)
        else:
            out = ppo_steps.critic_gradients(self.critic_train, micro, weights, self.args, self.precision)
        out["critic_grad_norm"] = self._step(self.critic_opt, self.critic_sched, self.critic, step,
                                             critic_loss=out["critic_loss"])
        return out

    def _step(self, optimizer, scheduler, model, step: int, **losses) -> float:
        """Clip and apply the accumulated gradients, unless a loss or the gradient norm is not finite."""
        norm, applied = ppo_steps.apply_gradients(optimizer, scheduler, model, self.precision, self.guard, step,
                                                  **losses)
        if applied:
            self.weights.changed()
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
        stats.update(score_metrics(self.function_scores), **self.sampling_stats)
        if self.models.remote is not None:  # when each pool scored (resource_pools)
            stats.update(self.models.remote.metrics())
        return {k: parallel.mean_over_data(v) for k, v in stats.items()}

    # -- evaluation, checkpoints, the final models -----------------------------------------

    def evaluate(self, step: int, echo) -> dict:
        """Reward, KL and length of responses to the eval prompts (``ppo_evaluation``)."""
        if self.data.eval_prompts is None:
            return {}
        self.weights.refresh()
        return evaluate_policy(step, echo, args=self.args, ctx=self.ctx, prompts=self.data.eval_prompts,
                               layout=self.layout, models=self.models, gen=self.gen, offload=self.offload,
                               metrics=self.metrics, scorer=self.scorer)

    def _models_and_optimizers(self):
        models, optimizers = {"policy": self.actor}, {"actor": self.actor_opt}
        if self.critic is not None:
            models["value"], optimizers["critic"] = self.critic, self.critic_opt
        return models, optimizers

    def _resume(self, folder: str) -> None:
        models, optimizers = self._models_and_optimizers()
        state, rng_extra = checkpoint.resume(folder, self.ctx, self.args, "ppo", models, optimizers)
        self.start_step = int(state["global_step"])
        self.kl_ctl.set_state_dict(state["extra"]["kl_controller"])
        if self.data.ptx is not None:
            self.data.ptx.step = int(state["extra"]["ptx_step"])
        self.shuffle_rng.bit_generator.state = rng_extra["shuffle_rng"]
        if self.models.remote is not None:  # value/, the critic's optimizer and the rollout's random states
            self.models.remote.resume_state(folder)
        print(f"resumed from {folder} at PPO step {self.start_step}")

    def save_checkpoint(self, step: int) -> None:
        """A resumable ``checkpoint-<step>`` (policy/, value/, optimizers, random states; atomic)."""
        self.offload.before_update()  # optimizer state must be resident to be saved
        models, optimizers = self._models_and_optimizers()
        check_weights_finite(models)
        extra = {"kl_controller": self.kl_ctl.state_dict(),
                 "ptx_step": self.data.ptx.step if self.data.ptx is not None else 0}
        checkpoint.save_checkpoint(
            os.path.join(self.args.output_dir, f"checkpoint-{step}"), self.ctx, models, self.tokenizer, optimizers,
            {"global_step": step, "epoch": self.data.prompt_sampler.epoch_of(step), "stage": "ppo",
             "args": vars(self.args), "extra": extra},
            rng_extra={"shuffle_rng": self.shuffle_rng.bit_generator.state},
            remote=self.models.remote.save_state if self.models.remote is not None else None)
        if self.ctx.is_main:
            checkpoint.rotate(self.args.output_dir, self.args.save_total_limit)

    def save(self, target: str, step: int) -> None:
        """The final policy/ and value/ models (from_pretrained-loadable; Hugging Face copies in hf/)."""
        self.offload.reload_trained()
        state = {"global_step": step, "stage": "ppo", "kl_coeff": float(self.kl_ctl.value), "args": vars(self.args)}
        for sub, model in self._models_and_optimizers()[0].items():
            checkpoint.save_final_model(model, self.tokenizer, os.path.join(target, sub), state)
        if self.remote_critic is not None:
            self.remote_critic.save_final_critic(os.path.join(target, "value"), state)
