"""PPO on resource pools (``resource_pools``): the reference and the reward model on ranks of their
own, scoring while the actor's pool scores the rest.

    actor's pool (data rank d's first rank)            pool of reference / reward (its rank d)
      generate -> submit(sequences)  ---- sequences --->  recv
      old log-probs, critic values                        ref log-probs / end scores (at the same time)
      results() <--- log-probs, scores, timestamps -----  send
      (tensor-parallel ranks of d get them by broadcast)

The plan, fleet's groups over the actor's pool and the transport are ``ppo.distributed.pools``;
the scoring functions are the rollout's own (``ppo.rollout.collect``), so a pool scores exactly as
the colocated run does.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import paddle

from ppo.distributed import parallel
from ppo.distributed.pools import recv_arrays, send_arrays
from ppo.models import check_max_length, check_model_path, freeze, load_causal_lm, load_score_model, load_tokenizer
from ppo.rollout.collect import Models, reward_end_scores, scoring_log_probs
from ppo.core.errors import UserError
from ppo.stages.optim import Precision

SCORE, STOP = 1, 0
MASK_DTYPES = ("int64", "int32", "bool", "float32")


class RemoteScoring:
    """The actor's side: what ``collect`` calls for the roles on other pools (``Models.remote``).
    ``timings`` keeps the last rollout's scoring intervals per pool, in seconds after ``submit``."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.pools = list(ctx.plan.remote)  # (their roles are frozen ones: ppo.core.placement)
        self.roles = ctx.plan.remote_roles()
        # data rank d's first rank talks to rank d of every pool; the others get its results
        self.leader = ctx.rank == ctx.leaders[ctx.data_rank]
        self.peers = [p.first + ctx.data_rank for p in self.pools]
        self.timings: dict = {}
        self.stopped = False

    def submit(self, sequences, attention_mask, prompt_length: int, fast: bool, grouped: bool) -> None:
        self.sent_at = time.time()
        if self.leader:
            header = np.array([SCORE, prompt_length, int(fast), int(grouped),
                               MASK_DTYPES.index(str(attention_mask.dtype).split(".")[-1])], dtype=np.int64)
            ids, mask = sequences.numpy().astype(np.int64), attention_mask.numpy().astype(np.int64)
            for peer in self.peers:
                send_arrays([header, ids, mask], peer, self.ctx.links[(self.ctx.rank, peer)])
        self.local_start = time.time()

    def results(self, sequences) -> dict:
        """{role: tensor}: reference log-probs [B, L-1] and / or end scores [B] for the submitted rows."""
        local_end = time.time()
        B, L = sequences.shape
        shapes = {"reference": [B, L - 1], "reward": [B]}
        arrays = {role: np.zeros(shapes[role], np.float32) for role in self.roles}
        spans = np.zeros([len(self.pools) + 1, 2], np.float64)
        spans[0] = (self.local_start, local_end)
        if self.leader:
            for i, (pool, peer) in enumerate(zip(self.pools, self.peers)):
                *outs, span = recv_arrays(peer, self.ctx.links[(self.ctx.rank, peer)])
                for role, out in zip(pool.roles, outs):
                    arrays[role] = out
                spans[i + 1] = span
        out = {}
        for role, a in arrays.items():  # the data rank's tensor-parallel ranks get the first rank's
            out[role] = parallel.broadcast_model_parallel(paddle.to_tensor(a))
        spans = parallel.broadcast_model_parallel(paddle.to_tensor(spans)).numpy() - self.sent_at
        self.timings = {"actor": spans[0], **{p.name: s for p, s in zip(self.pools, spans[1:])}}
        return out

    def metrics(self) -> dict:
        """The last rollout's scoring interval of each pool (start and end, seconds after the
        sequences were sent): intervals that overlap ran at the same time."""
        return {f"time/pool_{name.replace('+', '_')}_{edge}": float(span[k]) for name, span in self.timings.items()
                for k, edge in ((0, "start"), (1, "end"))}

    def stop(self) -> None:
        """Release the pools' ranks (once): they leave their loop and meet this pool at exit."""
        if self.stopped:
            return
        self.stopped = True
        if self.leader:
            for peer in self.peers:
                stop = np.array([STOP, 0, 0, 0, 0], dtype=np.int64)
                send_arrays([stop], peer, self.ctx.links[(self.ctx.rank, peer)])


def load_frozen_roles(args, roles) -> Models:
    """The models of the frozen ``roles`` a pool's rank holds, whole (one rank per data rank)."""
    tokenizer = load_tokenizer(args.actor_model_name_or_path, "actor_model_name_or_path")
    reference = reward = reward_tokenizer = None
    if "reference" in roles:
        reference = freeze(load_causal_lm(args.actor_model_name_or_path, "actor_model_name_or_path"))
    if "reward" in roles:
        reward_tokenizer = load_tokenizer(args.reward_model_name_or_path, "reward_model_name_or_path")
        reward = freeze(load_score_model(args.reward_model_name_or_path, score_type="reward",
                                         what="reward_model_name_or_path", trained_head=True))
    return Models(actor=None, reference=reference, reward=reward, critic=None, actor_tokenizer=tokenizer,
                  reward_tokenizer=reward_tokenizer)


def check_frozen_roles(args) -> None:
    """The actor's folder (the reference's too) and the reward model's, as loading would refuse them:
    a model path and its position / window limits (the reward model scores whole sequences too).
    With pools every rank checks them before any collective (a rank that stops alone would leave
    the others waiting)."""
    config = check_model_path(args.actor_model_name_or_path, "actor_model_name_or_path")
    check_max_length(config, args.max_length, args.actor_model_name_or_path)
    if args.reward_model_name_or_path:
        check_max_length(check_model_path(args.reward_model_name_or_path, "reward_model_name_or_path"),
                         args.max_length, args.reward_model_name_or_path)


def check_reward_statistics(args, reward) -> None:
    """``normalize_reward`` needs the statistics a reward model saves (None: no reward model here)."""
    if args.normalize_reward and reward is not None and reward.normalizer.kind == "none":
        raise UserError(f"normalize_reward is set but the reward model at '{args.reward_model_name_or_path}' "
                        "carries no score statistics (train it with normalizer_type RunningMeanStd)")


def serve(args, ctx) -> Models:
    """A frozen role's rank: score the sequences of its data rank's first rank until it says stop
    (returns the models it held)."""
    roles = ctx.pool.roles  # frozen ones (ppo.core.placement)
    data_rank = ctx.rank - ctx.pool.first
    leader = ctx.leaders[data_rank]
    link = ctx.links[(leader, ctx.rank)]
    precision = Precision(args.bf16, args.fp16, parallel.device() == "gpu", args.cpu_gemm)
    models = load_frozen_roles(args, roles)
    check_reward_statistics(args, models.reward)
    # a stop signal reaches the actor's pool too: it checkpoints, then says stop here
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with paddle.no_grad():
            while True:
                try:
                    header, *rows = recv_arrays(leader, link)
                except RuntimeError:  # the peer is gone: the actor's pool stopped (its log says why)
                    raise UserError(f"the actor's pool (rank {leader}) stopped before releasing this rank of "
                                    f"pool '{ctx.pool.name}': see that rank's log for the reason") from None
                if int(header[0]) == STOP:
                    break
                prompt_length, fast, grouped = int(header[1]), bool(header[2]), bool(header[3])
                ids = paddle.to_tensor(rows[0])
                mask = paddle.to_tensor(rows[1]).astype(MASK_DTYPES[int(header[4])])
                start = time.time()
                outs = []
                for role in roles:
                    if role == "reference":
                        out = scoring_log_probs(models.reference, ids, mask, args.temperature, fast, grouped)
                    else:
                        out = reward_end_scores(models, ids, mask, prompt_length, args.max_length,
                                                args.normalize_reward, fast, grouped)
                    outs.append(out.astype("float32").numpy())
                send_arrays(outs + [np.array([start, time.time()], np.float64)], leader, link)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        precision.close()
    return models
