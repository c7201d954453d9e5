"""A resource pool's rank (``resource_pools``): it holds its roles' models and works for the actor's
pool until it says stop.

* the frozen roles (reference, reward model) score the sequences they are sent;
* the rollout, when its pool is not the actor's, generates the responses to the prompts it is
  sent, on a copy of the actor whose weights the actor's pool sends after every update;
* the critic, when its pool is not the actor's, scores its values, then takes the same optimizer
  steps as the colocated critic would (the actor's pool sends the rows, micro-batches and weights
  it computed for its own steps), data parallel over its pool's ranks, and writes ``value/`` and
  its optimizer states into the actor's checkpoints (and reads them back on resume).

The messages and the actor's side are ``ppo.stages.ppo.pools``; the scoring functions are the
rollout's (``ppo.rollout.collect``) and the critic's steps the trainer's (``ppo.stages.ppo.steps``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import paddle

from ppo.core.errors import UserError
from ppo.core.experience import Experience
from ppo.distributed import parallel
from ppo.distributed.pools import data_parallel
from ppo.distributed.transfer import array_text, mean_over, recv_arrays, send_arrays, text_array
from ppo.models import freeze, load_causal_lm, load_score_model
from ppo.rollout.collect import Models, critic_values, generate_in_buckets, reward_end_scores, scoring_log_probs
from ppo.rollout.decoding import WeightCopyDecoder
from ppo.rollout.fused import rollout_decoder
from ppo.rollout.sampling import GenerationConfig
from ppo.stages.guard import NonFiniteGuard
from ppo.stages.optim import Precision
from ppo.stages.ppo import pools
from ppo.stages.ppo import steps as ppo_steps
from ppo.stages.ppo.roles import critic_training_options, sampling_seed
from ppo.storage import checkpoint
from ppo.storage.finite import check_weights_finite


class CriticOnPool:
    """The critic on a pool of its own: one whole copy per rank, one rank per data rank of the
    actor's pool, data parallel over the pool."""

    def __init__(self, args, ctx, precision: Precision, tokenizer):
        self.args, self.ctx, self.precision, self.tokenizer = args, ctx, precision, tokenizer
        self.first = ctx.rank == ctx.pool.first  # writes value/
        self.model = load_score_model(pools.critic_path(args), score_type="critic",
                                      what="reward_critic_model_name_or_path")
        critic_training_options(args, self.model)
        self.group = ctx.pool_group
        self.train_model = self.model
        if self.group is not None:  # gradients averaged over the pool's ranks (its data ranks)
            self.train_model = data_parallel(self.model, self.group)
        # a non-finite loss or gradient norm on any of the pool's ranks skips the step on all
        self.guard = NonFiniteGuard(args.max_nonfinite_steps, "PPO (critic)", mean=lambda v: mean_over(v, self.group))
        self.optimizer = self.scheduler = None

    def handle(self, command: int, words, arrays: list) -> list:
        """A request of the actor's pool for the critic -> the payload arrays of the answer."""
        if command == pools.START:
            self.optimizer, self.scheduler = ppo_steps.role_optimizer(self.args, "critic", self.model, int(words[1]))
            return []
        if command == pools.UPDATE:
            return [self.update(words, *arrays)]
        if command == pools.FINAL and self.first:
            with parallel.alone():
                checkpoint.save_final_model(self.model, self.tokenizer, array_text(arrays[0]),
                                            json.loads(array_text(arrays[1])))
        return []

    def save(self, folder: str) -> dict:
        """value/ into the checkpoint folder (the pool's first rank) -> this rank's optimizers to save."""
        check_weights_finite({"value": self.model})
        if self.first:
            with parallel.alone():
                checkpoint.save_model(self.model, os.path.join(folder, "value"), self.tokenizer)
        return {"critic": (self.optimizer, self.model)}

    def resume(self, folder: str) -> dict:
        checkpoint.load_weights(self.model, os.path.join(folder, "value"))
        return {"critic": (self.optimizer, self.model)}

    def update(self, header, words, weights, sequences, attention_mask, action_mask, values, returns) -> np.ndarray:
        """The critic's optimizer steps of one update -> [steps, CRITIC_STATS + whether the guard
        skipped the step]."""
        step, packs, prompt_length, mask_dtype = (int(x) for x in header[1:5])
        exp = Experience(sequences=paddle.to_tensor(sequences),
                         attention_mask=pools.mask_of(attention_mask, mask_dtype),
                         action_mask=paddle.to_tensor(action_mask), old_log_probs=None, ref_log_probs=None,
                         end_scores=None, response_lengths=None, ended_with_eos=None, prompt_length=prompt_length,
                         values=paddle.to_tensor(values), returns=paddle.to_tensor(returns))
        out = []
        for cut, w in pools.decode_plan(words, weights):
            micro = ppo_steps.micro_batches(exp, cut, bool(packs))
            stats = ppo_steps.critic_gradients(self.train_model, micro, w, self.args, self.precision)
            norm, applied = ppo_steps.apply_gradients(self.optimizer, self.scheduler, self.model, self.precision,
                                                      self.guard, step, critic_loss=stats["critic_loss"])
            out.append([stats["critic_loss"], stats["value_clip_frac"], norm, float(not applied)])
        return np.array(out, dtype=np.float64).reshape(-1, len(pools.CRITIC_STATS) + 1)


class RolloutOnPool:
    """The rollout on a pool of its own: a whole copy of the actor that generates for one data rank
    of the actor's pool, from that data rank's random stream; its weights come from the actor's
    pool after every update."""

    def __init__(self, args, ctx, precision: Precision, tokenizer):
        self.tokenizer = tokenizer
        self.model = freeze(load_causal_lm(args.actor_model_name_or_path, "actor_model_name_or_path"))
        self.decoder = (rollout_decoder(self.model, static_decode=args.rollout_static_graph, dtype=precision.dtype)
                        if args.use_inference_model else None)
        self.saved_rng = None  # the training stream, while evaluation samples from its own

    def handle(self, command: int, words, arrays: list, receive) -> list:
        """A request of the actor's pool for the rollout -> the payload arrays of the answer."""
        if command == pools.WEIGHTS:  # the names, then the arrays, 8 to a message
            names = array_text(arrays[0]).split("\n")
            values = []
            while len(values) < len(names):
                values += receive()
            own = self.model.state_dict()
            missing = set(own) - set(names)
            if missing:
                raise UserError(f"the rollout's pool got no weights for {sorted(missing)[:3]}")
            with paddle.no_grad():
                for name, value in zip(names, values):
                    if name not in own:  # (a LoRA actor's adapters are merged into its weights)
                        continue
                    shape = list(own[name].shape)
                    if value.size != int(np.prod(shape)):
                        raise UserError(f"the rollout's pool got {value.size} values for {name} {shape}: the "
                                        "actor and its copy differ")
                    paddle.assign(paddle.to_tensor(value.reshape(shape)).astype(own[name].dtype), output=own[name])
            if isinstance(self.decoder, WeightCopyDecoder):
                self.decoder.weights_changed()
            return []
        if command == pools.RESTORE_RNG:  # evaluation is over: the training stream continues
            if self.saved_rng is not None:
                paddle.set_rng_state(self.saved_rng)
            self.saved_rng = None
            return []
        config = GenerationConfig(**json.loads(array_text(arrays[0])))
        keep, seed = bool(words[1]), int(words[2])
        if seed >= 0:  # evaluation's fixed samples, as the actor's rank seeds them when it generates itself
            self.saved_rng = paddle.get_rng_state()
            paddle.seed(seed)
        with paddle.no_grad():
            out = generate_in_buckets(self.decoder or self.model, paddle.to_tensor(arrays[1]),
                                      paddle.to_tensor(arrays[2]), config, self.tokenizer.eos_token_id,
                                      self.tokenizer.pad_token_id, keep)
        sequences, mask, *kept = out
        code = np.array([pools.mask_code(mask)], dtype=np.int64)
        return [sequences.numpy().astype(np.int64), mask.numpy().astype(np.int64), code,
                *(k.astype("float32").numpy() for k in kept)]


@dataclass
class PoolRank:
    """What a pool's rank held (the benchmarks read it after the run)."""
    models: Models                  # its frozen roles (None where it holds none)
    critic: CriticOnPool | None     # the critic, on the critic's pool
    rollout: RolloutOnPool | None   # the actor's copy that generates, on the rollout's pool


def serve(args, ctx) -> PoolRank:
    """A pool's rank: work for its data rank's first rank in the actor's pool until it says stop."""
    roles = ctx.pool.roles
    data_rank = ctx.rank - ctx.pool.first
    leader = ctx.leaders[data_rank]
    link = ctx.links[(leader, ctx.rank)]
    precision = Precision(args.bf16, args.fp16, parallel.device() == "gpu", args.cpu_gemm)
    models = pools.load_frozen_roles(args, roles)
    pools.check_reward_statistics(args, models.reward)
    critic = CriticOnPool(args, ctx, precision, models.actor_tokenizer) if "critic" in roles else None
    rollout = RolloutOnPool(args, ctx, precision, models.actor_tokenizer) if "rollout" in roles else None
    # the data rank's sampling stream, as the actor's rank seeds it when it generates itself
    paddle.seed(sampling_seed(args.seed, data_rank))
    # a stop signal reaches the actor's pool too: it checkpoints, then says stop here
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                words, *rows = recv_arrays(leader, link)
            except RuntimeError:  # the peer is gone: the actor's pool stopped (its log says why)
                raise UserError(f"the actor's pool (rank {leader}) stopped before releasing this rank of "
                                f"pool '{ctx.pool.name}': see that rank's log for the reason") from None
            command = int(words[0])
            if command == pools.STOP:
                break
            if command == pools.SCORE:
                send_arrays(score(args, models, critic, roles, words, rows), leader, link)
                continue
            message, payload = "", []
            try:
                if command in (pools.SAVE, pools.RESUME):  # the critic's weights and optimizer, random states
                    folder = array_text(rows[0])
                    if command == pools.SAVE:
                        checkpoint.write_rank_state(folder, ctx.rank, critic.save(folder) if critic else {})
                    else:
                        checkpoint.load_rank_state(folder, ctx.rank, critic.resume(folder) if critic else {})
                elif command in (pools.GENERATE, pools.WEIGHTS, pools.RESTORE_RNG):
                    payload = rollout.handle(command, words, rows, lambda: recv_arrays(leader, link))
                else:
                    payload = critic.handle(command, words, rows)
            except UserError as e:  # the actor's pool raises it on every rank
                message = str(e)
            send_arrays([np.array([int(bool(message))], dtype=np.int64), text_array(message), *payload], leader, link)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        precision.close()
    return PoolRank(models=models, critic=critic, rollout=rollout)


@paddle.no_grad()
def score(args, models: Models, critic: CriticOnPool | None, roles, words, rows) -> list:
    """The pool's roles' scores of the sequences sent, in ``roles`` order, then the interval."""
    prompt_length, fast, grouped = int(words[1]), bool(words[2]), bool(words[3])
    ids = paddle.to_tensor(rows[0])
    mask = pools.mask_of(rows[1], words[4])
    start = time.time()
    outs = []
    for role in (r for r in roles if r in pools.SCORED):
        if role == "reference":
            out = scoring_log_probs(models.reference, ids, mask, args.temperature, fast, grouped)
        elif role == "reward":
            out = reward_end_scores(models, ids, mask, prompt_length, args.max_length, args.normalize_reward, fast,
                                    grouped)
        else:
            out = critic_values(critic.model, ids, mask, fast, grouped)
        outs.append(out.astype("float32").numpy())
    return outs + [np.array([start, time.time()], np.float64)]
