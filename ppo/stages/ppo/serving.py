"""A resource pool's rank (``resource_pools``): it holds its roles' models and works for the actor's
pool until it says stop.

* the frozen roles (reference, reward model) score the sequences they are sent;
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
from ppo.models import load_score_model
from ppo.rollout.collect import Models, critic_values, reward_end_scores, scoring_log_probs
from ppo.stages.guard import NonFiniteGuard
from ppo.stages.optim import Precision
from ppo.stages.ppo import pools
from ppo.stages.ppo import steps as ppo_steps
from ppo.stages.ppo.roles import critic_training_options
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
        """One request of the actor's pool -> the payload arrays of the answer."""
        if command == pools.START:
            self.optimizer, self.scheduler = ppo_steps.role_optimizer(self.args, "critic", self.model, int(words[1]))
            return []
        if command == pools.UPDATE:
            return [self.update(words, *arrays)]
        folder = array_text(arrays[0])
        if command == pools.SAVE:
            check_weights_finite({"value": self.model})
            if self.first:
                with parallel.alone():
                    checkpoint.save_model(self.model, os.path.join(folder, "value"), self.tokenizer)
            checkpoint.write_rank_state(folder, self.ctx.rank, {"critic": (self.optimizer, self.model)})
        elif command == pools.RESUME:
            checkpoint.load_weights(self.model, os.path.join(folder, "value"))
            checkpoint.load_rank_state(folder, self.ctx.rank, {"critic": (self.optimizer, self.model)})
        elif command == pools.FINAL and self.first:
            with parallel.alone():
                checkpoint.save_final_model(self.model, self.tokenizer, folder, json.loads(array_text(arrays[1])))
        return []

    def update(self, header, words, weights, sequences, attention_mask, action_mask, values, returns) -> np.ndarray:
        """The critic's optimizer steps of one update -> [steps, CRITIC_STATS]."""
        step, packs, prompt_length, mask_dtype = (int(x) for x in header[1:5])
        exp = Experience(sequences=paddle.to_tensor(sequences),
                         attention_mask=paddle.to_tensor(attention_mask).astype(pools.MASK_DTYPES[mask_dtype]),
                         action_mask=paddle.to_tensor(action_mask), old_log_probs=None, ref_log_probs=None,
                         end_scores=None, response_lengths=None, ended_with_eos=None, prompt_length=prompt_length,
                         values=paddle.to_tensor(values), returns=paddle.to_tensor(returns))
        out = []
        for cut, w in pools.decode_plan(words, weights):
            micro = [exp.select(r) for r in cut]
            micro = [m.packed() for m in micro] if packs else micro
            stats = ppo_steps.critic_gradients(self.train_model, micro, w, self.args, self.precision)
            norm, _ = ppo_steps.apply_gradients(self.optimizer, self.scheduler, self.model, self.precision, self.guard,
                                                step, critic_loss=stats["critic_loss"])
            out.append([stats["critic_loss"], stats["value_clip_frac"], norm])
        return np.array(out, dtype=np.float64).reshape(-1, len(pools.CRITIC_STATS))


@dataclass
class PoolRank:
    """What a pool's rank held (the benchmarks read it after the run)."""
    models: Models                  # its frozen roles (None where it holds none)
    critic: CriticOnPool | None     # the critic, on the critic's pool


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
                payload = critic.handle(command, words, rows)
            except UserError as e:  # the actor's pool raises it on every rank
                message = str(e)
            send_arrays([np.array([int(bool(message))], dtype=np.int64), text_array(message), *payload], leader, link)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        precision.close()
    return PoolRank(models=models, critic=critic)


@paddle.no_grad()
def score(args, models: Models, critic: CriticOnPool | None, roles, words, rows) -> list:
    """The pool's roles' scores of the sequences sent, in ``roles`` order, then the interval."""
    prompt_length, fast, grouped = int(words[1]), bool(words[2]), bool(words[3])
    ids = paddle.to_tensor(rows[0])
    mask = paddle.to_tensor(rows[1]).astype(pools.MASK_DTYPES[int(words[4])])
    start = time.time()
    outs = []
    for role in roles:
        if role == "reference":
            out = scoring_log_probs(models.reference, ids, mask, args.temperature, fast, grouped)
        elif role == "reward":
            out = reward_end_scores(models, ids, mask, prompt_length, args.max_length, args.normalize_reward, fast,
                                    grouped)
        else:
            out = critic_values(critic.model, ids, mask, fast, grouped)
        outs.append(out.astype("float32").numpy())
    return outs + [np.array([start, time.time()], np.float64)]
