"""Offline preference losses: DPO and its family (pure functions of sequence log-probs).

Inputs are per-pair sequence log-probabilities, ``[B]`` float tensors:

- ``policy_chosen`` / ``policy_rejected``: ``log pi(y | x)`` of the chosen (preferred) and rejected
  answers, summed over the answer tokens (``sequence_log_probs``), or their per-token mean where a
  loss is defined on it (SimPO, ORPO: the caller passes ``sum / length``);
- ``ref_chosen`` / ``ref_rejected``: the same under the frozen reference model.

Every function returns the per-pair loss ``[B]`` (the trainer averages over pairs), so a global
batch splits into micro-batches and data ranks without changing the objective.  With
``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)`` (the log-ratio margin):

=========  ===========================================================================  ===========
sigmoid    -(1 - eps) log s(beta h) - eps log s(-beta h)                                 DPO; eps: conservative DPO
ipo        (h - 1 / (2 beta))^2                                                          IPO
hinge      max(0, 1 - beta h)                                                            SLiC-HF
simpo      -log s(beta (avg_c - avg_r) - gamma)   (avg: per-token mean log-probs)        SimPO, no reference
orpo       -log s(log odds(avg_c) - log odds(avg_r)),  odds(p) = p / (1 - p)             ORPO, no reference
kto        w_d (1 - s(beta (r - z0))) on desirable, w_u (1 - s(beta (z0 - r))) else     KTO, unpaired
=========  ===========================================================================  ===========

(s: the logistic sigmoid; r = policy - ref of one unpaired completion; z0 = max(0, KL estimate), no
gradient.)  ORPO's full objective adds the chosen answer's NLL; SimPO and ORPO read no reference.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

PAIRED = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
UNPAIRED = ("kto",)
LOSS_TYPES = PAIRED + UNPAIRED
REFERENCE_FREE = ("simpo", "orpo")  # no reference model is read


def sequence_log_probs(token_log_probs, mask):
    """``(sum [B], count [B])``: the masked sum of ``token_log_probs`` [B, T] over each row, and the
    number of masked-in tokens (float32).  ``mask`` [B, T] is 1 on the answer's tokens."""
    m = mask.astype(token_log_probs.dtype)
    return (token_log_probs * m).sum(axis=1), m.sum(axis=1)


def log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """``h = (pi_c - ref_c) - (pi_r - ref_r)`` [B]: how much more the policy than the reference
    prefers the chosen answer, in log-probability."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7) with conservative label smoothing eps (Mitchell 2023):
    ``-(1 - eps) log s(beta h) - eps log s(-beta h)`` [B].  At the reference (h = 0): ``ln 2``."""
    z = beta * log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1.0 - label_smoothing) * F.log_sigmoid(z) - label_smoothing * F.log_sigmoid(-z)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """IPO (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))^2`` [B]; beta is the paper's tau."""
    h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """SLiC-HF's calibration hinge on the log-ratio margin (Zhao et al. 2023): ``max(0, 1 - beta h)`` [B]."""
    h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return F.relu(1.0 - beta * h)


def simpo_loss(avg_chosen, avg_rejected, beta: float, gamma: float):
    """SimPO (Meng et al. 2024, eq. 6): ``-log s(beta avg_c - beta avg_r - gamma)`` [B], on per-token
    mean log-probs of the policy; no reference model."""
    return -F.log_sigmoid(beta * (avg_chosen - avg_rejected) - gamma)


def log_odds(avg_log_prob):
    """``log(p / (1 - p))`` of ``p = exp(avg_log_prob)`` [B] (avg_log_prob < 0), computed as
    ``avg - log(1 - exp(avg))`` with ``log1p`` for precision."""
    return avg_log_prob - paddle.log1p(-paddle.exp(paddle.clip(avg_log_prob, max=-1e-6)))


def orpo_loss(avg_chosen, avg_rejected):
    """ORPO's odds-ratio term (Hong et al. 2024, eq. 7): ``-log s(log odds(p_c) - log odds(p_r))`` [B],
    on per-token mean log-probs of the policy.  The full ORPO objective is ``NLL(chosen) + lambda *
    this`` (the trainer adds the NLL); no reference model."""
    return -F.log_sigmoid(log_odds(avg_chosen) - log_odds(avg_rejected))


def kto_loss(policy, ref, desirable, kl, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired completions [B]:
    ``w_d (1 - s(beta (r - z0)))`` where ``desirable``, else ``w_u (1 - s(beta (z0 - r)))``;
    ``r = policy - ref`` (summed log-probs), ``z0 = max(0, kl)`` held fixed (no gradient).

    ``desirable`` [B] bool; ``kl`` a float or 0-d tensor: the batch's KL estimate between the
    policy and the reference on mismatched prompt-completion pairs.
    """
    z0 = paddle.clip(paddle.to_tensor(kl, dtype=policy.dtype).detach(), min=0.0)
    r = policy - ref
    good = desirable_weight * (1.0 - F.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1.0 - F.sigmoid(beta * (z0 - r)))
    return paddle.where(desirable.astype("bool"), good, bad)


def implicit_rewards(policy, ref, beta: float):
    """DPO's implicit reward ``beta (log pi - log ref)`` [B] (no gradient): ``rewards/chosen`` and
    ``rewards/rejected`` of the logs.  Reference-free losses pass ``ref = 0``."""
    return (beta * (policy - ref)).detach()
