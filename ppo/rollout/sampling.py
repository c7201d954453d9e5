"""Sampling one token: the generation settings and the logit processors, applied in this order:
repetition penalty -> temperature -> top-k -> top-p (``next_token``).  Pure: [B, V] -> [B, V]."""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn.functional as F


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    micro_batch_size: int = 0       # rows generated at a time, grouped by prompt length (0: all at once)
    # keep each sampled token's log-prob from the decode step's logits (the actor's old log-probs
    # without a scoring forward): the model's tempered distribution, no penalty / top-k / top-p
    keep_log_probs: bool = False


def apply_repetition_penalty(logits, seen_mask, penalty: float):
    """CTRL-style penalty on tokens already in the sequence: divide positive logits, multiply negative.

    logits [B, V]; seen_mask [B, V] bool (token occurs in prompt or response so far).
    """
    if penalty == 1.0:
        return logits
    penalised = paddle.where(logits > 0, logits / penalty, logits * penalty)
    return paddle.where(seen_mask, penalised, logits)


def top_k_filter(logits, k: int):
    """Keep the k largest logits per row (ties at the k-th value kept); the rest -> -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = paddle.topk(logits, k, axis=-1)[0][:, -1:]
    return paddle.where(logits < kth, paddle.full_like(logits, float("-inf")), logits)


def top_p_filter(logits, p: float):
    """Nucleus filter: keep the smallest set of top tokens whose probability reaches p (at least one).

    Implemented as a per-row threshold on the logits, so tokens tied with the last kept one stay.
    """
    if p >= 1.0:
        return logits
    sorted_logits = paddle.sort(logits, axis=-1, descending=True)
    probs = F.softmax(sorted_logits, axis=-1)
    # a token is dropped when the tokens ranked before it already reach p
    drop = (paddle.cumsum(probs, axis=-1) - probs) >= p
    threshold = paddle.where(drop, paddle.full_like(sorted_logits, float("inf")), sorted_logits).min(
        axis=-1, keepdim=True)
    return paddle.where(logits < threshold, paddle.full_like(logits, float("-inf")), logits)


def next_token(logits, config: GenerationConfig, seen_mask=None):
    """Pick the next token for each row of ``logits`` [B, V] -> [B] int64."""
    logits = logits.astype("float32")
    if seen_mask is not None:
        logits = apply_repetition_penalty(logits, seen_mask, config.repetition_penalty)
    if not config.do_sample:
        return paddle.argmax(logits, axis=-1)
    logits = logits / config.temperature
    logits = top_p_filter(top_k_filter(logits, config.top_k), config.top_p)
    return paddle.multinomial(F.softmax(logits, axis=-1), num_samples=1).squeeze(-1)
