"""The gradients of one optimizer step of the PPO actor or critic over its micro-batches.

The objectives are written once (``actor_objective``, ``critic_objective``) and run either per
micro-batch (``actor_gradients`` / ``critic_gradients``) or inside the last stage of fleet's
pipeline schedule (``pipeline_actor_gradients`` / ``pipeline_critic_gradients``).  Each
micro-batch's loss carries its weight ``w`` (its share of the step's token-mean, see
``batching.token_mean_weights``), so the accumulated gradient is the token-mean's.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

from ppo.core import algorithms as algo
from ppo.distributed import parallel, pipeline
from ppo.distributed import vocab
from ppo.core.batching import token_mean_weights
from ppo.data import answer_mask
from ppo.core.experience import Experience
from ppo.models.fast_paths import dense_kernels
from ppo.rollout.collect import forward_log_probs, log_probs_from_logits
from ppo.stages.optim import build_optimizer, clear_grad, global_grad_norm

ACTOR_STATS = ("actor_loss", "abs_actor_loss", "clip_frac", "approx_kl", "entropy")
CRITIC_STATS = ("critic_loss", "value_clip_frac")


def actor_objective(log_probs, entropy, m, w: float, args, kl_coeff: float):
    """(weighted loss to differentiate, stats) of one micro-batch ``m`` from its log-probs ``[B, T]``:
    clipped surrogate [+ kl_coeff * KL loss when kl_mode is 'loss'] [- entropy_coeff * entropy]."""
    loss, s = algo.actor_loss(log_probs, m.old_log_probs, m.advantages, m.action_mask, args.clip_range_ratio,
                              args.clip_range_ratio_high or None, args.dual_clip or None)
    mean_entropy = algo.masked_mean(entropy, m.action_mask)
    total = loss
    if args.kl_mode == "loss":
        total = total + kl_coeff * algo.kl_loss(log_probs, m.ref_log_probs, m.action_mask, args.kl_estimator)
    if args.entropy_coeff:
        total = total - args.entropy_coeff * mean_entropy
    # the mean over data ranks (in update) makes the w-weighted actor_loss the token-mean
    return total * w, {"actor_loss": float(loss) * w, "abs_actor_loss": abs(float(loss)),
                       "clip_frac": s["clip_frac"], "approx_kl": s["approx_kl"], "entropy": float(mean_entropy)}


def critic_objective(scores, m, w: float, clip_range_value: float):
    """(weighted clipped value loss, stats) of one micro-batch from the critic's scores ``[B, L, 1]``."""
    values = scores.squeeze(-1)[:, :-1].astype("float32")
    loss, s = algo.critic_loss(values, m.values, m.returns, m.action_mask, clip_range_value)
    return loss * w, {"critic_loss": float(loss) * w, "value_clip_frac": s["value_clip_frac"]}


def micro_batches(exp: Experience, cut: list, packs: bool) -> list[Experience]:
    """An optimizer step's micro-batches: the rows ``cut`` of ``exp``, each packed to its own longest
    real row when ``packs`` (length buckets)."""
    micro = [exp.select(r) for r in cut]
    return [m.packed() for m in micro] if packs else micro


def role_optimizer(args, role: str, model, optimizer_steps: int):
    """(optimizer, schedule) of the PPO ``role`` ('actor' or 'critic') for ``optimizer_steps`` steps."""
    common = dict(beta1=args.adam_beta1, beta2=args.adam_beta2, epsilon=args.adam_epsilon,
                  max_grad_norm=args.max_grad_norm)
    if role == "actor":
        return build_optimizer(model, args.learning_rate, args.weight_decay, optimizer_steps,
                               scheduler_type=args.lr_scheduler_type, warmup_ratio=args.warmup_ratio,
                               warmup_steps=args.warmup_steps, **common)
    return build_optimizer(model, args.critic_learning_rate, args.critic_weight_decay, optimizer_steps,
                           scheduler_type=args.critic_lr_scheduler_type, warmup_ratio=args.critic_warmup_ratio,
                           **common)


def apply_gradients(optimizer, scheduler, model, precision, guard, step: int, **losses) -> tuple:
    """Clip and apply the accumulated gradients unless a loss or the gradient norm is not finite
    (``guard``), then clear them and advance the schedule -> (gradient norm, whether applied)."""
    norm = global_grad_norm(model.parameters(), optimizer)
    applied = guard.ok(step, grad_norm=norm, **losses)
    if applied:
        precision.step(optimizer)
    clear_grad(optimizer)  # frees the gradients until the next backward
    scheduler.step()
    return norm, applied


def combine(parts: list[dict], weighted: tuple) -> dict:
    """Stats of a step from its micro-batches': sums for the pre-weighted ones, means for the rest."""
    n = len(parts)
    return {k: sum(p[k] for p in parts) / (1 if k in weighted else n) for k in parts[0]}


def _sync(model, last: bool):
    # data-parallel gradients are all-reduced once per optimizer step, on the last micro-batch
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def micro_steps(train_model, micro, weights, objective, precision) -> list[dict]:
    """Backward of ``objective(m, w) -> (loss, stats)`` for every micro-batch (gradients accumulate;
    data-parallel ones are reduced on the last); each micro-batch's stats."""
    parts = []
    for i, (m, w) in enumerate(zip(micro, weights)):
        # dense kernels: the forward and backward write through no views (ppo.models.fast_paths)
        with _sync(train_model, i == len(micro) - 1), dense_kernels():
            total, stats = objective(m, w)
            precision.backward(total)
        parts.append(stats)
    return parts


class PtxFeed:
    """The pretraining (ptx) batches mixed into actor steps: one ptx micro-batch per actor
    micro-batch, their NLL a token-mean over the step's ptx answer tokens on every data rank."""

    def __init__(self, dataset, sampler, data_world: int):
        self.dataset, self.sampler, self.data_world = dataset, sampler, data_world
        self.step = 0  # position in the ptx sampler (saved in checkpoints)

    def batch(self, count: int = 1):
        """The next ``count`` ptx micro-batches as one batch (rows in order, right-padded by the
        dataset's collator to the longest)."""
        indices = []
        for _ in range(count):
            indices += list(self.sampler.micro_batches(self.step)[0])
            self.step += 1
        return self.dataset.get_collator()([self.dataset[i] for i in indices])

    def scale(self, answers: list) -> float:
        """The factor that makes an NLL sum a token-mean over the step's ptx answer tokens
        (``answers``: this rank's answer masks), times data_world, which the data-parallel mean undoes."""
        tokens = sum(int(a.astype("int64").sum()) for a in answers)
        return token_mean_weights([tokens], parallel.sum_over_data(float(tokens)), self.data_world)[0] / max(tokens, 1)


def actor_gradients(actor_train, micro: list[Experience], weights: list[float], args, kl_coeff: float, precision,
                    ptx: PtxFeed | None) -> dict:
    """Accumulate the actor's gradients of one optimizer step (non-pipeline layouts); its stats."""
    feed = None
    if ptx is not None:
        batches = [ptx.batch() for _ in micro]
        answers = [answer_mask(b["labels"]) for b in batches]
        ptx_scale = ptx.scale(answers)
        feed = iter(zip(batches, answers))

    def objective(m, w):
        with precision.autocast():
            log_probs, entropy = forward_log_probs(actor_train, m.sequences, m.attention_mask, args.temperature,
                                                   with_entropy=True, entropy_grad=bool(args.entropy_coeff))
        total, stats = actor_objective(log_probs, entropy, m, w, args, kl_coeff)
        if feed is not None:
            batch, answer = next(feed)
            with precision.autocast():
                # split-vocabulary safe: the same log-prob path as the actor loss
                ptx_lp, _ = forward_log_probs(actor_train, batch["input_ids"], batch["attention_mask"])
            ptx_loss = algo.nll_sum(ptx_lp.astype("float32"), answer) * ptx_scale
            stats["ptx_loss"] = float(ptx_loss)
            total = total + args.ptx_coeff * ptx_loss
        return total, stats

    return combine(micro_steps(actor_train, micro, weights, objective, precision), weighted=("actor_loss", "ptx_loss"))


def critic_gradients(critic_train, micro: list[Experience], weights: list[float], args, precision) -> dict:
    """Accumulate the critic's gradients of one optimizer step (non-pipeline layouts); its stats."""
    def objective(m, w):
        with precision.autocast():
            scores = critic_train(m.sequences, m.attention_mask).scores
        return critic_objective(scores, m, w, args.clip_range_value)

    return combine(micro_steps(critic_train, micro, weights, objective, precision), weighted=("critic_loss",))


def pipeline_actor_gradients(actor_train, actor_opt, actor, micro: list[Experience], weights: list[float], args,
                             kl_coeff: float, precision, ptx: PtxFeed | None) -> dict:
    """The actor's gradients of one optimizer step under pipeline parallel: the same objective in
    the last stage of fleet's schedule (and a second pass for the ptx batches)."""
    whole = Experience.concat(micro)  # one rollout: equal widths, no padding
    labels = (whole.sequences, whole.old_log_probs, whole.advantages, whole.action_mask, whole.ref_log_probs,
              pipeline.row_weights([m.batch_size for m in micro], weights))
    split = vocab.vocab_is_split(actor)
    accumulate = args.gradient_accumulation_steps

    def compute(logits, labels):
        sequences, old, adv, mask, ref, w = labels
        log_probs, entropy = log_probs_from_logits(logits, sequences, args.temperature, split, with_entropy=True,
                                                   entropy_grad=bool(args.entropy_coeff))
        m = SimpleNamespace(action_mask=mask, old_log_probs=old, ref_log_probs=ref, advantages=adv)
        return actor_objective(log_probs, entropy, m, float(w[0, 0]), args, kl_coeff)

    parts = pipeline.pipeline_pass(actor_train, actor_opt, pipeline.pipeline_inputs(whole.sequences,
                                   whole.attention_mask), labels, compute, ACTOR_STATS, accumulate, precision)
    out = combine(parts, weighted=("actor_loss",))
    if ptx is not None:
        batch = ptx.batch(len(micro))  # one ptx micro-batch per pipeline micro-batch
        answer = answer_mask(batch["labels"])
        ptx_scale = ptx.scale([answer])

        def ptx_compute(logits, labels):
            sequences, answer = labels
            log_probs, _ = log_probs_from_logits(logits, sequences, 1.0, split)
            ptx_loss = algo.nll_sum(log_probs.astype("float32"), answer) * ptx_scale
            return args.ptx_coeff * ptx_loss, {"ptx_loss": float(ptx_loss)}

        inputs = pipeline.pipeline_inputs(batch["input_ids"], batch["attention_mask"])
        ptx_parts = pipeline.pipeline_pass(actor_train, actor_opt, inputs, (batch["input_ids"], answer), ptx_compute,
                                           ("ptx_loss",), accumulate, precision)
        out["ptx_loss"] = float(sum(p["ptx_loss"] for p in ptx_parts))
    return out


def pipeline_critic_gradients(critic_train, critic_opt, micro: list[Experience], weights: list[float], args,
                              precision) -> dict:
    """The critic's gradients of one optimizer step under pipeline parallel."""
    whole = Experience.concat(micro)  # one rollout: equal widths, no padding
    labels = (whole.values, whole.returns, whole.action_mask,
              pipeline.row_weights([m.batch_size for m in micro], weights))

    def compute(scores, labels):
        old_values, returns, mask, w = labels
        m = SimpleNamespace(action_mask=mask, values=old_values, returns=returns)
        return critic_objective(scores, m, float(w[0, 0]), args.clip_range_value)

    parts = pipeline.pipeline_pass(critic_train, critic_opt, pipeline.pipeline_inputs(whole.sequences,
                                   whole.attention_mask), labels, compute, CRITIC_STATS,
                                   args.gradient_accumulation_steps, precision)
    return combine(parts, weighted=("critic_loss",))
