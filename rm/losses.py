"""Preference losses of the reward model (pure functions of tensors)."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F


def sequence_wise_loss(better_end: paddle.Tensor, worse_end: paddle.Tensor, margin: float = 0.0) -> paddle.Tensor:
    """mean_b -log sigmoid(r_better[b] - r_worse[b] - margin); inputs [B]."""
    return -F.log_sigmoid(better_end - worse_end - margin).mean()


def divergence_span(better_ids, worse_ids, better_mask, worse_mask) -> paddle.Tensor:
    """[B, T] float mask of the span from the first differing position to the later sequence end.

    Pairs are right padded to one length T.  Positions before the two sequences differ carry the
    same prefix and so no preference signal.
    """
    T = better_ids.shape[1]
    pos = paddle.arange(T, dtype="int64").unsqueeze(0)
    differ = (better_ids != worse_ids) | (better_mask != worse_mask)
    # first differing index (T when identical: an empty span)
    first = paddle.where(differ, pos.expand_as(better_ids), paddle.full_like(better_ids, T)).min(axis=1)
    end_b = (pos * better_mask.astype("int64")).max(axis=1)
    end_w = (pos * worse_mask.astype("int64")).max(axis=1)
    end = paddle.maximum(end_b, end_w)
    return ((pos >= first.unsqueeze(1)) & (pos <= end.unsqueeze(1))).astype("float32")


def token_wise_loss(better_scores, worse_scores, span, margin: float = 0.0) -> paddle.Tensor:
    """mean over pairs of the mean over the divergence span of -log sigmoid(s_b[t] - s_w[t] - margin).

    better_scores, worse_scores, span: [B, T].
    """
    per_token = -F.log_sigmoid(better_scores - worse_scores - margin) * span
    per_pair = per_token.sum(axis=1) / paddle.clip(span.sum(axis=1), min=1.0)
    return per_pair.mean()


def score_regularization(better_end, worse_end) -> paddle.Tensor:
    """mean of squared end scores: keeps the reward scale near zero."""
    return (better_end.square().mean() + worse_end.square().mean()) / 2
