"""The DPO stage's objective: the losses of ``ppo.core.preference`` combined as the arguments ask
(``loss_type`` with ``loss_weights``, ``pref_loss_ratio``, ``sft_loss_ratio``), and the
preference metrics of the logs."""

from __future__ import annotations

from dataclasses import dataclass

import paddle

from ppo.core import preference as pref


@dataclass
class PairLogProbs:
    """Sequence log-probs of one micro-batch of pairs, each ``[B]``: sums over the answer tokens
    (``policy_*``, ``ref_*``) and the answers' token counts (``*_tokens``)."""
    policy_chosen: paddle.Tensor
    policy_rejected: paddle.Tensor
    chosen_tokens: paddle.Tensor
    rejected_tokens: paddle.Tensor
    ref_chosen: paddle.Tensor
    ref_rejected: paddle.Tensor


def paired_loss(lp: PairLogProbs, args) -> tuple[paddle.Tensor, dict]:
    """``(loss, stats)``: ``pref_loss_ratio * mean_b sum_k w_k loss_k[b] + sft_loss_ratio *
    mean_b NLL_b(chosen)``, the NLL a per-token mean within each pair; ``args`` a ``DPOArgs``.

    ORPO's term is the paper's whole objective ``NLL(chosen) + orpo_lambda * odds-ratio loss``.
    """
    pc, pr, rc, rr = lp.policy_chosen, lp.policy_rejected, lp.ref_chosen, lp.ref_rejected
    avg_c = pc / paddle.clip(lp.chosen_tokens, min=1.0)
    avg_r = pr / paddle.clip(lp.rejected_tokens, min=1.0)
    nll_chosen = -avg_c
    total = paddle.zeros_like(pc)
    for name, weight in args.loss_terms():
        if name == "sigmoid":
            loss = pref.sigmoid_loss(pc, pr, rc, rr, args.beta, args.label_smoothing)
        elif name == "ipo":
            loss = pref.ipo_loss(pc, pr, rc, rr, args.beta)
        elif name == "hinge":
            loss = pref.hinge_loss(pc, pr, rc, rr, args.beta)
        elif name == "simpo":
            loss = pref.simpo_loss(avg_c, avg_r, args.beta, args.simpo_gamma)
        elif name == "orpo":
            loss = nll_chosen + args.orpo_lambda * pref.orpo_loss(avg_c, avg_r)
        else:  # validated by DPOArgs
            raise ValueError(f"paired loss {name!r}")
        total = total + weight * loss
    loss = args.pref_loss_ratio * total.mean()
    if args.sft_loss_ratio > 0:
        loss = loss + args.sft_loss_ratio * nll_chosen.mean()
    return loss, pair_stats(lp, args.beta)


def pair_stats(lp: PairLogProbs, beta: float) -> dict:
    """The preference metrics of a micro-batch (python floats, means over its pairs)."""
    chosen = pref.implicit_rewards(lp.policy_chosen, lp.ref_chosen, beta)
    rejected = pref.implicit_rewards(lp.policy_rejected, lp.ref_rejected, beta)
    return {"rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
            "rewards/accuracies": float((chosen > rejected).astype("float32").mean()),
            "rewards/margins": float((chosen - rejected).mean()),
            "logps/chosen": float(lp.policy_chosen.detach().mean()),
            "logps/rejected": float(lp.policy_rejected.detach().mean())}


def unpaired_loss(policy, ref, tokens, desirable, kl: float, args) -> tuple[paddle.Tensor, dict]:
    """KTO's ``(loss, stats)`` on a micro-batch of completions ``[B]`` (summed log-probs), with the
    step's KL estimate ``kl``; ``+ sft_loss_ratio *`` the per-token NLL of the desirable ones."""
    per = pref.kto_loss(policy, ref, desirable, kl, args.beta, args.kto_desirable_weight,
                        args.kto_undesirable_weight)
    loss = args.pref_loss_ratio * per.mean()
    good = desirable.astype("float32")
    if args.sft_loss_ratio > 0:
        nll = -policy / paddle.clip(tokens, min=1.0)
        loss = loss + args.sft_loss_ratio * (nll * good).sum() / paddle.clip(good.sum(), min=1.0)
    rewards = pref.implicit_rewards(policy, ref, args.beta)
    n_good, n_bad = float(good.sum()), float((1 - good).sum())
    stats = {"kl": float(kl),
             "rewards/desirable": float((rewards * good).sum()) / max(n_good, 1.0),
             "rewards/undesirable": float((rewards * (1 - good)).sum()) / max(n_bad, 1.0),
             "logps/desirable": float((policy.detach() * good).sum()) / max(n_good, 1.0),
             "logps/undesirable": float((policy.detach() * (1 - good)).sum()) / max(n_bad, 1.0)}
    return loss, stats
