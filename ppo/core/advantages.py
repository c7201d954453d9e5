"""The composed advantage step: an ``Experience`` and the PPO arguments -> KL, shaped rewards,
advantages and returns.  Pure: no model, no optimizer, no collective.  The one thing that needs
the other data ranks (the moments of a batch-wide whitening) comes in as a function.

    kl       = compute_kl(old_log_probs, ref_log_probs, kl_estimator) * action_mask
    rewards  = shape_rewards(end_scores, kl, ...)        (kl_coeff 0 when kl_mode is 'loss')
    gae:                 advantages, returns = GAE(values, rewards; gamma, lam)
    grpo / rloo:         advantages = group estimator over sum_t rewards, per prompt's group
    reinforce_plus_plus: returns = reward-to-go(rewards; gamma); advantages = whiten(returns)
    normalize_advantage: advantages = whiten(advantages)   (not again for reinforce_plus_plus)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from ppo.core import algorithms as algo
from ppo.core.experience import Experience

# (values [B, T], mask [B, T]) -> (mean, unbiased variance) over every data rank, or None to use
# this batch's own moments
Moments = Callable[[object, object], Optional[tuple]]


def compute_advantages(exp: Experience, args, kl_coeff: float, moments: Moments | None = None) -> Experience:
    """A copy of ``exp`` with ``kl``, ``rewards``, ``advantages`` and ``returns`` filled.

    ``args``: reads ``kl_estimator``, ``kl_mode``, ``missing_eos_penalty``, ``clip_range_score``,
    ``adv_estimator``, ``gamma``, ``lam``, ``num_return_sequences`` and ``normalize_advantage``.
    ``kl_coeff``: the KL controller's current value.
    """
    mask = exp.action_mask
    kl = algo.compute_kl(exp.old_log_probs, exp.ref_log_probs, args.kl_estimator) * mask
    shaped_coeff = kl_coeff if args.kl_mode == "reward" else 0.0
    penalty = args.missing_eos_penalty if args.missing_eos_penalty != 0 else None
    rewards = algo.shape_rewards(exp.end_scores, kl, mask, shaped_coeff, args.clip_range_score,
                                 missing_eos=~exp.ended_with_eos, missing_eos_penalty=penalty)

    def whiten(values):
        return algo.masked_whiten(values, mask, moments=moments(values, mask) if moments else None)

    if args.adv_estimator == "gae":
        adv, returns = algo.gae_advantages_and_returns(exp.values, rewards, mask, args.gamma, args.lam)
    elif args.adv_estimator in ("grpo", "rloo"):
        sequence_reward = algo.masked_sum(rewards, mask, axis=1)
        adv = algo.broadcast_sequence_advantages(
            algo.group_advantages(sequence_reward, args.num_return_sequences, args.adv_estimator), mask)
        returns = adv
    elif args.adv_estimator == "reinforce_plus_plus":
        returns = algo.reinforce_plus_plus_returns(rewards, mask, args.gamma)
        adv = whiten(returns)
    else:
        raise ValueError(f"unknown adv_estimator {args.adv_estimator!r}")
    if args.normalize_advantage and args.adv_estimator != "reinforce_plus_plus":
        adv = whiten(adv)
    return dataclasses.replace(exp, kl=kl, rewards=rewards, advantages=(adv * mask).detach(), returns=returns)


def mean_sequence_kl(exp: Experience) -> float:
    """This batch's mean over sequences of the summed per-token KL (what the KL controller steers)."""
    return float(algo.masked_sum(exp.kl, exp.action_mask, axis=1).mean())
