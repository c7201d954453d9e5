"""Pure math for PPO / RLHF: masked statistics, log-probs, KL estimators, reward shaping,
advantage estimators (GAE, GRPO, RLOO, REINFORCE++), losses and KL controllers.

Conventions. Sequences are ``[B, L]``; per-token quantities are ``[B, T]`` with ``T = L - 1``,
where column ``t`` is the action "token t+1 given tokens 0..t". ``action_mask[b, t] = 1`` when
token ``t+1`` is a response token (including an EOS the model generated). Masks may be float or
bool; they are converted with ``.astype(values.dtype)``.

Token-mean aggregation: every loss in this module averages over all action tokens of the
mini-batch, ``sum over tokens / number of action tokens`` (not a mean of per-sequence means), as
implemented once in :func:`masked_mean`.
"""

from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F

KL_ESTIMATORS = ("k1", "k2", "k3")
GROUP_ESTIMATORS = ("grpo", "rloo")

__all__ = [
    "KL_ESTIMATORS", "GROUP_ESTIMATORS",
    "masked_sum", "masked_mean", "masked_var", "masked_whiten",
    "gather_log_probs", "entropy_from_logits", "log_probs_and_entropy", "compute_kl", "last_action_index",
    "shape_rewards", "gae_advantages_and_returns", "group_advantages",
    "reinforce_plus_plus_returns", "broadcast_sequence_advantages",
    "actor_loss", "critic_loss", "kl_loss",
    "FixedKLController", "AdaptiveKLController",
]


def _mask_like(mask, values):
    return mask.astype(values.dtype)


def _float32_logits(logits):
    # softmax over a large vocabulary in half precision loses too much; float64 is kept as is
    if logits.dtype in (paddle.float16, paddle.bfloat16):
        return logits.astype(paddle.float32)
    return logits


# ----------------------------------------------------------------------------- masked statistics


def masked_sum(values, mask, axis=None):
    """``sum(values * mask)`` over ``axis`` (all elements if None); values, mask of equal shape."""
    return (values * _mask_like(mask, values)).sum(axis=axis)


def masked_mean(values, mask, axis=None, eps=0.0):
    """``sum(values * mask) / (sum(mask) + eps)`` over ``axis`` (all elements if None).

    Token-mean aggregation: with ``axis=None`` on ``[B, T]`` this averages over every action token
    of the mini-batch, the aggregation used by every loss in this module. An all-zero mask with
    ``eps=0`` gives NaN.
    """
    m = _mask_like(mask, values)
    return (values * m).sum(axis=axis) / (m.sum(axis=axis) + eps)


def masked_var(values, mask, unbiased=True):
    """Variance of the masked elements (all axes): ``sum(m * (v - mean)^2) / (n - 1)`` if unbiased.

    ``n = sum(mask)``; with a single masked element the unbiased variance is 0 (not a 0/0).
    """
    m = _mask_like(mask, values)
    mean = masked_mean(values, m)
    sq_sum = ((values - mean) ** 2 * m).sum()
    n = m.sum()
    if unbiased:
        return sq_sum / paddle.clip(n - 1, min=1.0)
    return sq_sum / n


def masked_whiten(values, mask, shift_mean=True, eps=1e-8, moments=None):
    """``(v - mean) / sqrt(var + eps)`` with mean/unbiased var over the masked elements.

    With ``shift_mean=False`` the mean is added back (only the scale changes). Every position is
    transformed, masked or not; callers apply the mask.  ``moments=(mean, var)`` supplies the
    statistics (e.g. over every data rank's batch) instead of computing them from ``values``.
    """
    if moments is not None:
        mean, var = (float(m) for m in moments)
    else:
        mean = masked_mean(values, mask)
        var = masked_var(values, mask, unbiased=True)
    scale = 1.0 / math.sqrt(var + eps) if moments is not None else paddle.rsqrt(var + eps)
    whitened = (values - mean) * scale
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ------------------------------------------------------------------------- log-probs and entropy


def gather_log_probs(logits, labels, temperature=1.0, kernel=None):
    """``log_softmax(logits / temperature)[b, t, labels[b, t]]`` -> ``[B, T]``.

    logits ``[B, T, V]``, labels ``[B, T]``; computed in float32 when logits are fp16/bf16.
    ``kernel(logits, labels, temperature, with_entropy)``: the same (and the entropy) by a faster
    route, returning None where it does not take them (``ppo.models.cpu_kernels.token_log_probs``).
    """
    logits = _float32_logits(logits)
    got = kernel(logits, labels, temperature, False) if kernel is not None else None
    if got is not None:
        return got[0]
    if temperature != 1.0:
        logits = logits / temperature
    # paddle's fused softmax-cross-entropy kernel: on CPU about 30x faster forward + backward than
    # logsumexp + take_along_axis, and log_softmax is slower still (measured on 8 x 128 x 8000)
    index = labels.astype(paddle.int64).unsqueeze(-1)
    return -F.cross_entropy(logits, index, reduction="none").squeeze(-1)


def entropy_from_logits(logits, temperature=1.0):
    """``H = -sum p log p``, ``p = softmax(logits / temperature)``; ``[B, T, V] -> [B, T]``."""
    logits = _float32_logits(logits)
    if temperature != 1.0:
        logits = logits / temperature
    # H = logsumexp(x) - sum softmax(x) * x, from one exp of the max-shifted logits (3x faster on
    # CPU than logsumexp + softmax; the max is a constant shift, exact for any value, so detached)
    shift = logits.max(axis=-1, keepdim=True).detach()
    e = paddle.exp(logits - shift)
    total = e.sum(axis=-1)
    return paddle.log(total) + shift.squeeze(-1) - (e * logits).sum(axis=-1) / total


def log_probs_and_entropy(logits, labels, temperature=1.0, kernel=None):
    """(``gather_log_probs``, ``entropy_from_logits`` detached) of ``logits`` [B, T, V] from one
    pass: paddle's fused softmax-cross-entropy kernel gives ``log p[label]`` and the softmax ``p``
    of ``z = logits / temperature``; ``H = logsumexp(z) - sum p z`` with ``logsumexp(z) = z[label] -
    log p[label]``.  The log-probs carry gradients, the entropy none (a statistic: half the time of
    the two passes on [16, 128, 8000], forward + backward).  ``kernel``: both by a faster route,
    as in ``gather_log_probs``."""
    logits = _float32_logits(logits)
    got = kernel(logits, labels, temperature, True) if kernel is not None else None
    if got is not None:
        return got
    z = logits / temperature if temperature != 1.0 else logits
    index = labels.astype(paddle.int64).unsqueeze(-1)
    loss, p = F.softmax_with_cross_entropy(z, index, return_softmax=True)
    log_probs = -loss.squeeze(-1)
    with paddle.no_grad():
        zd = z.detach()
        # (broadcast=False: with paddle's default the [B, T, V] logits are copied first, 115 ms of
        # [16, 320, 8000] on CPU against 0.6)
        picked = paddle.take_along_axis(zd, index, axis=-1, broadcast=False).squeeze(-1)
        entropy = (picked - log_probs.detach()) - (p.detach() * zd).sum(axis=-1)
    return log_probs, entropy


# ------------------------------------------------------------------------------ KL and rewards


def compute_kl(log_probs, ref_log_probs, estimator="k1"):
    """Per-token estimate of KL(actor || ref) from ``r = log_probs - ref_log_probs`` (``[B, T]``).

    k1 = r;  k2 = r^2 / 2;  k3 = exp(-r) - 1 + r (Schulman's unbiased, non-negative estimator).
    """
    log_ratio = log_probs - ref_log_probs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # expm1 keeps the result >= 0 in float32 when r is tiny (exp(-r) - 1 would cancel)
        return paddle.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; accepted: {', '.join(KL_ESTIMATORS)}")


def last_action_index(action_mask):
    """int64 ``[B]``: column of the last nonzero entry of each ``[B, T]`` row (0 for empty rows)."""
    mask = action_mask.astype(paddle.int64) != 0
    cols = paddle.arange(mask.shape[1], dtype=paddle.int64).unsqueeze(0).expand(mask.shape)
    last = paddle.where(mask, cols, paddle.full_like(cols, -1)).max(axis=1)
    return paddle.clip(last, min=0)


def shape_rewards(end_scores, kl, action_mask, kl_coeff, clip_range_score,
                  missing_eos=None, missing_eos_penalty=None):
    """Rewards ``[B, T] = -kl_coeff * kl * mask`` plus the clipped end score at the last action.

    end_scores ``[B]`` or ``[B, 1]``; kl ``[B, T]``. Rows flagged in ``missing_eos`` (bool ``[B]``)
    get ``missing_eos_penalty`` added (as given) before clipping to ``[-c, c]`` (no clip if c is
    None or <= 0). Rows without any action token receive no score.
    """
    mask = _mask_like(action_mask, kl)
    scores = end_scores.reshape([-1]).astype(kl.dtype)
    if missing_eos is not None and missing_eos_penalty is not None:
        scores = scores + missing_eos.reshape([-1]).astype(kl.dtype) * float(missing_eos_penalty)
    if clip_range_score is not None and clip_range_score > 0:
        scores = paddle.clip(scores, -float(clip_range_score), float(clip_range_score))
    last = F.one_hot(last_action_index(action_mask), kl.shape[1]).astype(kl.dtype)
    has_action = (mask.sum(axis=1, keepdim=True) > 0).astype(kl.dtype)
    return -kl_coeff * kl * mask + last * has_action * scores.unsqueeze(-1)


# ------------------------------------------------------------------------ advantage estimators


@paddle.no_grad()
def gae_advantages_and_returns(values, rewards, action_mask, gamma=1.0, lam=0.95):
    """GAE over ``[B, T]`` inputs -> ``(advantages, returns)``, ``[B, T]``, masked and detached.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    Values and rewards are masked first, so V beyond the last action is 0 (terminal bootstrap).
    """
    mask = _mask_like(action_mask, values)
    values = values.detach() * mask
    rewards = rewards.detach().astype(values.dtype) * mask
    T = values.shape[1]
    next_value = paddle.zeros_like(values[:, 0])
    last_adv = paddle.zeros_like(values[:, 0])
    columns = [None] * T
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_adv = delta + gamma * lam * last_adv
        columns[t] = last_adv
        next_value = values[:, t]
    advantages = paddle.stack(columns, axis=1)
    returns = advantages + values
    return advantages * mask, returns * mask


def group_advantages(scores, group_size, estimator="grpo", eps=1e-6):
    """Per-sequence advantages ``[N]`` from scores ``[N]`` in consecutive groups of ``group_size``.

    grpo: (s - group mean) / (unbiased group std + eps);  rloo: s - mean of the other k-1 scores.
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"unknown group advantage estimator {estimator!r}; "
                         f"accepted: {', '.join(GROUP_ESTIMATORS)}")
    if group_size < 2:
        raise ValueError(f"group advantage estimator {estimator!r} needs num_return_sequences >= 2 "
                         f"completions per prompt, got group_size={group_size}")
    n = scores.shape[0]
    if n % group_size != 0:
        raise ValueError(f"{n} scores cannot be split into groups of {group_size} "
                         f"(num_return_sequences); the count must be a multiple of it")
    grouped = scores.reshape([n // group_size, group_size])
    if estimator == "grpo":
        mean = grouped.mean(axis=1, keepdim=True)
        std = paddle.std(grouped, axis=1, unbiased=True, keepdim=True)
        adv = (grouped - mean) / (std + eps)
    else:
        # baseline excludes the sample itself, which keeps the estimator unbiased
        others_mean = (grouped.sum(axis=1, keepdim=True) - grouped) / (group_size - 1)
        adv = grouped - others_mean
    return adv.reshape([n])


@paddle.no_grad()
def reinforce_plus_plus_returns(rewards, action_mask, gamma=1.0):
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` over action tokens; ``[B, T]``, detached.

    Positions outside the response are 0. REINFORCE++ uses these as advantages after whitening
    them over the whole batch with ``masked_whiten(G, action_mask)`` (left to the caller).
    """
    mask = _mask_like(action_mask, rewards)
    rewards = rewards.detach() * mask
    T = rewards.shape[1]
    running = paddle.zeros_like(rewards[:, 0])
    columns = [None] * T
    for t in reversed(range(T)):
        running = rewards[:, t] + gamma * running
        columns[t] = running
    return paddle.stack(columns, axis=1) * mask


def broadcast_sequence_advantages(adv, action_mask):
    """Sequence-level advantages ``[B]`` -> per-token ``[B, T] = adv[:, None] * action_mask``."""
    adv = adv.reshape([-1])
    return adv.unsqueeze(-1) * _mask_like(action_mask, adv)


# ---------------------------------------------------------------------------------------- losses


def actor_loss(log_probs, old_log_probs, advantages, action_mask, clip_range_ratio=0.2,
               clip_range_ratio_high=None, dual_clip=None, log_ratio_clamp=20.0):
    """PPO clipped surrogate over ``[B, T]`` inputs -> ``(loss, stats)``.

    ratio = exp(clamp(logp - old_logp)); pg = max(-A * ratio, -A * clip(ratio, 1 - lo, 1 + hi));
    dual clip: pg = min(pg, -A * dual_clip) where A < 0; loss = masked_mean(pg, mask) (token mean).
    stats (python floats): clip_frac, approx_kl (mean of log_ratio^2 / 2), ratio_mean.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
    mask = _mask_like(action_mask, log_probs)
    advantages = advantages.detach().astype(log_probs.dtype)
    # the clamp keeps exp() finite for tokens whose probability collapsed between rollout and update
    log_ratio = paddle.clip(log_probs - old_log_probs.detach(), -log_ratio_clamp, log_ratio_clamp)
    ratio = paddle.exp(log_ratio)
    low = 1.0 - clip_range_ratio
    high = 1.0 + (clip_range_ratio_high if clip_range_ratio_high is not None else clip_range_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * paddle.clip(ratio, low, high)
    pg = paddle.maximum(pg1, pg2)
    if dual_clip is not None:
        # bounds the loss of negative-advantage tokens whose ratio exploded
        pg = paddle.where(advantages < 0, paddle.minimum(pg, -advantages * dual_clip), pg)
    loss = masked_mean(pg, mask)
    with paddle.no_grad():
        stats = {
            "clip_frac": float(masked_mean((pg2 > pg1).astype(mask.dtype), mask)),
            "approx_kl": float(masked_mean(0.5 * log_ratio.detach() ** 2, mask)),
            "ratio_mean": float(masked_mean(ratio.detach(), mask)),
        }
    return loss, stats


def critic_loss(values, old_values, returns, action_mask, clip_range_value=5.0):
    """Clipped value loss over ``[B, T]`` -> ``(loss, stats)``.

    V_clip = V_old + clip(V - V_old, -c, c);
    loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2), mask).
    stats: value_clip_frac = share of action tokens where the clipped term is the larger one.
    """
    mask = _mask_like(action_mask, values)
    old_values = old_values.detach().astype(values.dtype)
    returns = returns.detach().astype(values.dtype)
    diff = values - old_values
    # unclipped tokens keep `values` bit-exactly: rounding in old + (v - old) never counts as clip
    c = clip_range_value
    values_clipped = paddle.where(diff.abs() > c, old_values + paddle.clip(diff, -c, c), values)
    vf1 = (values - returns) ** 2
    vf2 = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(paddle.maximum(vf1, vf2), mask)
    with paddle.no_grad():
        stats = {"value_clip_frac": float(masked_mean((vf2 > vf1).astype(mask.dtype), mask))}
    return loss, stats


def kl_loss(log_probs, ref_log_probs, action_mask, estimator="k3"):
    """KL as a loss term: ``masked_mean(compute_kl(logp, ref_logp, estimator), mask)`` ([B, T])."""
    kl = compute_kl(log_probs, ref_log_probs.detach(), estimator)
    return masked_mean(kl, action_mask)


def nll_sum(log_probs, valid):
    """Summed negative log-likelihood ``-sum(log_probs * valid)`` over the answer tokens ([B, T]).

    The one answer-token loss: SFT divides it by its answer-token count, the PPO ptx term scales
    it by the step's token-mean weight."""
    return -(log_probs * valid.astype(log_probs.dtype)).sum()


# ------------------------------------------------------------------------------ KL controllers


class FixedKLController:
    """Constant KL coefficient ``value``; ``update`` does nothing."""

    def __init__(self, kl_coeff):
        self.value = float(kl_coeff)

    def update(self, current_kl, n_steps):
        pass

    def state_dict(self):
        return {"value": self.value}

    def set_state_dict(self, d):
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), steering the observed KL to ``target``.

    e = clip(current_kl / target - 1, -0.2, 0.2);  value *= 1 + e * n_steps / horizon.
    """

    def __init__(self, init_kl_coeff, target, horizon):
        self.value = float(init_kl_coeff)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl, n_steps):
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self):
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def set_state_dict(self, d):
        self.value = float(d["value"])
        self.target = float(d.get("target", self.target))
        self.horizon = float(d.get("horizon", self.horizon))
