"""PPO on resource pools (``resource_pools``): the reference, the reward model and the critic on
ranks of their own, scoring while the actor's pool scores the rest; a critic pool trains the
critic while the actor's pool trains the actor.

    actor's pool (data rank d's first rank)            a pool's rank d (ppo.stages.ppo.serving)
      start_critic(optimizer steps) ----------------->  the critic's optimizer
      generate -> submit(sequences)  ---- sequences --->  recv
      old log-probs [, critic values]                     ref log-probs / end scores / values (meanwhile)
      results() <--- log-probs, scores, timestamps -----  send
      advantages, then update_critic(plan) --- rows --->  the same optimizer steps of the critic
      actor steps; critic_stats() <------ its stats ----  (meanwhile)
      save_critic(tmp) / resume_critic / final -------->  value/ and its optimizer states
      (tensor-parallel ranks of d get results by broadcast)

The plan, fleet's groups over the actor's pool and the transport are ``ppo.distributed.pools``;
the scoring functions are the rollout's own (``ppo.rollout.collect``) and the critic's steps the
trainer's own (``ppo.stages.ppo.steps``), so a pool computes exactly what the colocated run does.
This module is the actor's side, and the checks and loading both sides share.
"""

from __future__ import annotations

import json
import time

import numpy as np
import paddle

from ppo.distributed import parallel
from ppo.distributed.transfer import all_messages, array_text, recv_arrays, send_arrays, text_array
from ppo.models import check_max_length, check_model_path, freeze, load_causal_lm, load_score_model, load_tokenizer
from ppo.rollout.collect import Models, same_vocabulary
from ppo.core.errors import UserError

# commands, the first word of every message to a pool's rank
STOP, SCORE, START, UPDATE, SAVE, RESUME, FINAL, GENERATE, WEIGHTS, RESTORE_RNG = range(10)
SCORED = ("reference", "reward", "critic")  # the roles that score the sequences (in a pool's roles' order)
MASK_DTYPES = ("int64", "int32", "bool", "float32")
CRITIC_STATS = ("critic_loss", "value_clip_frac", "critic_grad_norm")  # per step, from the critic's pool


def mask_code(mask) -> int:
    """An attention mask's dtype (paddle or numpy) as a word of a message (``MASK_DTYPES``)."""
    return MASK_DTYPES.index(str(mask.dtype).split(".")[-1])


def mask_of(array, code: int):
    """The mask sent as int64 ``array``, back in its dtype."""
    return paddle.to_tensor(array).astype(MASK_DTYPES[int(code)])


def weight_array(value) -> np.ndarray:
    """A weight for the wire: float32 (bf16, which numpy holds as uint16, and fp16 widened exactly),
    flattened (the receiver has its shape)."""
    a = np.asarray(value)
    if a.dtype == np.uint16:  # bfloat16's bits: the upper half of a float32
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(a.astype(np.float32).reshape(-1))


def encode_plan(plan) -> np.ndarray:
    """An update's plan [(micro-batches' rows, weights)] -> (one int64 array of the rows: steps, then per
    step its micro-batch count and per micro-batch its row count and rows; the weights, float64)."""
    words, weights = [len(plan)], []
    for cut, w in plan:
        words.append(len(cut))
        for rows in cut:
            words += [len(rows), *(int(r) for r in rows)]
        weights += list(w)
    return np.array(words, dtype=np.int64), np.array(weights, dtype=np.float64)


def decode_plan(words, weights) -> list:
    plan, at, k = [], 1, 0
    for _ in range(int(words[0])):
        count, at = int(words[at]), at + 1
        cut = []
        for _ in range(count):
            n = int(words[at])
            cut.append(np.asarray(words[at + 1:at + 1 + n], dtype=np.int64))
            at += 1 + n
        plan.append((cut, [float(x) for x in weights[k:k + count]]))
        k += count
    return plan


class RemoteRoles:
    """The actor's side: what ``collect`` calls for the roles on other pools (``Models.remote``),
    and what the trainer calls for a critic on its own pool.  ``timings`` keeps the last rollout's
    scoring intervals per pool, in seconds after ``submit``."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.pools = list(ctx.plan.remote)
        self.roles = ctx.plan.remote_roles()
        # data rank d's first rank talks to rank d of every pool; the others get its results
        self.leader = ctx.rank == ctx.leaders[ctx.data_rank]
        self.peers = [p.first + ctx.data_rank for p in self.pools]
        self.scoring = [(p, peer, [r for r in p.roles if r in SCORED]) for p, peer in zip(self.pools, self.peers)
                        if any(r in SCORED for r in p.roles)]
        critic, rollout = ctx.plan.critic, ctx.plan.rollout
        self.critic_peer = critic.first + ctx.data_rank if critic is not None else None
        self.rollout_peer = rollout.first + ctx.data_rank if rollout is not None else None
        # the ranks with state of their own to checkpoint: the critic's, the rollout's random stream
        self.stateful = sorted({p for p in (self.critic_peer, self.rollout_peer) if p is not None})
        self.timings: dict = {}
        self.stopped = False
        self.next_seed = -1  # a seed for the rollout's pool to take before its next generation

    def _link(self, peer):
        return self.ctx.links[(self.ctx.rank, peer)]

    # -- scoring ---------------------------------------------------------------------------

    def submit(self, sequences, attention_mask, prompt_length: int, fast: bool, grouped: bool) -> None:
        self.sent_at = time.time()
        if self.leader:
            header = np.array([SCORE, prompt_length, int(fast), int(grouped), mask_code(attention_mask)],
                              dtype=np.int64)
            ids, mask = sequences.numpy().astype(np.int64), attention_mask.numpy().astype(np.int64)
            for _, peer, _ in self.scoring:
                send_arrays([header, ids, mask], peer, self._link(peer))
        self.local_start = time.time()

    def results(self, sequences) -> dict:
        """{role: tensor}: reference log-probs [B, L-1], end scores [B], critic values [B, L-1] for the
        submitted rows."""
        local_end = time.time()
        B, L = sequences.shape
        shapes = {"reference": [B, L - 1], "reward": [B], "critic": [B, L - 1]}
        arrays = {role: np.zeros(shapes[role], np.float32) for _, _, roles in self.scoring for role in roles}
        spans = np.zeros([len(self.scoring) + 1, 2], np.float64)
        spans[0] = (self.local_start, local_end)
        if self.leader:
            for i, (_, peer, roles) in enumerate(self.scoring):
                *outs, span = self._recv(peer)
                for role, out in zip(roles, outs):
                    arrays[role] = out
                spans[i + 1] = span
        out = {}
        for role, a in arrays.items():  # the data rank's tensor-parallel ranks get the first rank's
            out[role] = parallel.broadcast_model_parallel(paddle.to_tensor(a))
        spans = parallel.broadcast_model_parallel(paddle.to_tensor(spans)).numpy() - self.sent_at
        self.timings = {"actor": spans[0], **{p.name: s for (p, _, _), s in zip(self.scoring, spans[1:])}}
        return out

    def metrics(self) -> dict:
        """The last rollout's scoring interval of each pool (start and end, seconds after the
        sequences were sent): intervals that overlap ran at the same time."""
        return {f"time/pool_{name.replace('+', '_')}_{edge}": float(span[k]) for name, span in self.timings.items()
                for k, edge in ((0, "start"), (1, "end"))}

    # -- the critic on its own pool ----------------------------------------------------------

    def _to_pool(self, peer: int, arrays: list) -> None:
        if self.leader:
            send_arrays(arrays, peer, self._link(peer))

    def _recv(self, peer: int) -> list:
        """The next message from a pool's rank; one line when that rank is gone (its log says why)."""
        try:
            return recv_arrays(peer, self._link(peer))
        except RuntimeError:
            raise UserError(f"rank {peer} of the pools stopped while this rank waited for it: see that rank's "
                            "log for the reason") from None

    def _from_pool(self, peer: int, payload: bool = False):
        """The pool's answer (its first payload array, or None; ``payload``: all of them, on the
        leader alone), on every rank of the actor's pool; a UserError there (a bad checkpoint,
        diverged training) is raised on every rank here."""
        message, rest = "", []
        if self.leader:
            status, text, *rest = self._recv(peer)
            message = array_text(text) if int(status[0]) else ""
        failed = next((m for m in all_messages(message, self.ctx.group) if m), "")
        if failed:
            raise UserError(failed)
        return rest if payload else (rest[0] if rest else None)

    def _to_critic(self, arrays: list) -> None:
        self._to_pool(self.critic_peer, arrays)

    def _from_critic(self):
        return self._from_pool(self.critic_peer)

    def start_critic(self, optimizer_steps: int) -> None:
        """The critic's optimizer and schedule, for ``optimizer_steps`` steps."""
        self._to_critic([np.array([START, optimizer_steps], dtype=np.int64)])
        self._from_critic()

    def update_critic(self, exp, plan: list, packs: bool, step: int) -> None:
        """Send the critic's share of the update: the rows it trains on and the optimizer steps'
        micro-batches and weights (the actor's own); ``critic_stats()`` collects the result."""
        self.critic_steps = len(plan)
        words, weights = encode_plan(plan)
        header = np.array([UPDATE, step, int(packs), exp.prompt_length, mask_code(exp.attention_mask)],
                          dtype=np.int64)
        self._to_critic([header, words, weights, exp.sequences.numpy().astype(np.int64),
                         exp.attention_mask.numpy().astype(np.int64),
                         *(t.numpy().astype(np.float32) for t in (exp.action_mask, exp.values, exp.returns))])

    def critic_stats(self) -> tuple:
        """({stat: [value per optimizer step]}, steps the critic's guard skipped) of the critic's
        update (every rank of the data rank)."""
        stats = self._from_critic()
        steps = parallel.broadcast_model_parallel(paddle.to_tensor(
            stats if stats is not None else np.zeros([self.critic_steps, len(CRITIC_STATS) + 1], np.float64))).numpy()
        return {k: [float(x) for x in steps[:, i]] for i, k in enumerate(CRITIC_STATS)}, int(steps[:, -1].sum())

    def save_state(self, tmp: str) -> None:
        """Into the unfinished checkpoint ``tmp``: value/ and the critic ranks' optimizer states, the
        rollout ranks' random states (the pools with state of their own)."""
        self._to_stateful(SAVE, tmp)

    def resume_state(self, folder: str) -> None:
        self._to_stateful(RESUME, folder)

    def _to_stateful(self, command: int, folder: str) -> None:
        for peer in self.stateful:
            self._to_pool(peer, [np.array([command], dtype=np.int64), text_array(folder)])
        for peer in self.stateful:
            self._from_pool(peer)

    # -- generation on the rollout's pool ------------------------------------------------------

    def generate(self, prompt_ids, prompt_mask, config, return_log_probs: bool) -> tuple:
        """``generate_in_buckets``' result for this data rank's prompts, from the rollout's pool:
        (sequences, attention_mask[, response log-probs]) on every rank of the data rank."""
        shapes = np.zeros([5], np.int64)
        self._to_pool(self.rollout_peer, [np.array([GENERATE, int(return_log_probs), self.next_seed], dtype=np.int64),
                                          text_array(json.dumps(vars(config))), prompt_ids.numpy().astype(np.int64),
                                          prompt_mask.numpy().astype(np.int64)])
        got = self._from_pool(self.rollout_peer, payload=True)  # (a failure there: raised on every rank)
        self.next_seed = -1  # (seeded once: later batches continue the stream)
        if self.leader:
            sequences, mask, code, *kept = got
            shapes[:] = [*sequences.shape, *(kept[0].shape if kept else (0, 0)), int(code[0])]
        shapes = parallel.broadcast_model_parallel(paddle.to_tensor(shapes)).numpy()
        if not self.leader:
            sequences = np.zeros(shapes[:2], np.int64)
            mask = np.zeros(shapes[:2], np.int64)
            kept = [np.zeros(shapes[2:4], np.float32)] if return_log_probs else []
        out = [parallel.broadcast_model_parallel(paddle.to_tensor(a)) for a in (sequences, mask, *kept)]
        out[1] = out[1].astype(MASK_DTYPES[int(shapes[4])])
        return tuple(out)

    def seed_next(self, seed: int) -> None:
        """The rollout's pool keeps its random state and seeds ``seed`` before its next generation
        (evaluation's fixed samples), until ``restore_rng``."""
        self.next_seed = seed

    def restore_rng(self) -> None:
        """The random state the rollout's pool kept at ``seed_next`` comes back (after evaluation)."""
        self.next_seed = -1
        self._to_pool(self.rollout_peer, [np.array([RESTORE_RNG], dtype=np.int64)])
        self._from_pool(self.rollout_peer)

    def send_weights(self, named_arrays: dict) -> None:
        """The actor's whole weights ({name: numpy}) to the rollout's pool (after an update)."""
        if self.leader:
            names = list(named_arrays)
            self._to_pool(self.rollout_peer, [np.array([WEIGHTS, len(names)], dtype=np.int64),
                                              text_array("\n".join(names))])
            for at in range(0, len(names), 8):  # (send_arrays carries up to 8 arrays)
                self._to_pool(self.rollout_peer, [weight_array(named_arrays[n]) for n in names[at:at + 8]])
        self._from_pool(self.rollout_peer)

    def save_final_critic(self, target: str, state: dict) -> None:
        """The final value model at ``target`` (written by the critic pool's first rank)."""
        self._to_critic([np.array([FINAL], dtype=np.int64), text_array(target),
                         text_array(json.dumps(state, default=str))])
        self._from_critic()

    def stop(self) -> None:
        """Release the pools' ranks (once): they leave their loop and meet this pool at exit."""
        if self.stopped:
            return
        self.stopped = True
        if self.leader:
            for peer in self.peers:
                send_arrays([np.array([STOP], dtype=np.int64)], peer, self._link(peer))


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
    With pools every rank checks them, the critic's too, before any collective (a rank that stops
    alone would leave the others waiting)."""
    config = check_model_path(args.actor_model_name_or_path, "actor_model_name_or_path")
    check_max_length(config, args.max_length, args.actor_model_name_or_path)
    if args.reward_model_name_or_path:
        check_max_length(check_model_path(args.reward_model_name_or_path, "reward_model_name_or_path"),
                         args.max_length, args.reward_model_name_or_path)


def check_pool_roles(args) -> None:
    """With resource pools, on every rank before any collective: every role's folder (the critic's
    with the gae estimator)."""
    check_frozen_roles(args)
    if args.adv_estimator == "gae":
        check_critic(args, load_tokenizer(args.actor_model_name_or_path, "actor_model_name_or_path"))


def critic_path(args) -> str:
    """The critic's initialisation: reward_critic_model_name_or_path, else the reward model."""
    return args.reward_critic_model_name_or_path or args.reward_model_name_or_path


def check_critic(args, tokenizer) -> None:
    """The critic's folder as loading would refuse it, and its vocabulary against the actor's
    ``tokenizer`` (it scores actor tokens)."""
    path = critic_path(args)
    if not path:
        raise UserError("adv_estimator 'gae' without a reward model needs reward_critic_model_name_or_path (the "
                        "critic's initialisation), or use grpo / rloo / reinforce_plus_plus")
    check_max_length(check_model_path(path, "reward_critic_model_name_or_path"), args.max_length, path)
    critic_tokenizer = load_tokenizer(path, "reward_critic_model_name_or_path")
    if not same_vocabulary(tokenizer, critic_tokenizer):
        raise UserError(f"the critic ('{path}') must share the actor's vocabulary "
                        f"({len(critic_tokenizer)} vs {len(tokenizer)} tokens): it scores actor tokens")


def check_reward_statistics(args, reward) -> None:
    """``normalize_reward`` needs the statistics a reward model saves (None: no reward model here)."""
    if args.normalize_reward and reward is not None and reward.normalizer.kind == "none":
        raise UserError(f"normalize_reward is set but the reward model at '{args.reward_model_name_or_path}' "
                        "carries no score statistics (train it with normalizer_type RunningMeanStd)")


