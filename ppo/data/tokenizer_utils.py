"""Tokenizer set-up shared by every dataset."""

from __future__ import annotations

import logging

from ppo.core.errors import UserError

logger = logging.getLogger(__name__)


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _special(tokenizer, name: str):
    """The tokenizer's ``<name>_token`` or None, read without the error log paddlenlp's accessor
    writes when it is unset."""
    if hasattr(tokenizer, f"_{name}_token"):
        return getattr(tokenizer, f"_{name}_token")
    return getattr(tokenizer, f"{name}_token", None)


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a pad token (its eos token) when it has none; returns it.

    Reusing eos for padding is safe here because every attention mask and label mask is built
    from sequence lengths, never from ``ids == pad_token_id``.
    """
    if _special(tokenizer, "pad") is not None and tokenizer.pad_token_id is not None:
        return tokenizer
    if _special(tokenizer, "eos") is None or tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer at '{tokenizer_name(tokenizer)}' has neither a pad nor an eos token; add one "
                        "(e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it")
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning("tokenizer at '%s' has no pad token; padding with its eos token '%s' (id %d). Attention masks "
                   "come from sequence lengths, so real eos tokens stay visible and trained.",
                   tokenizer_name(tokenizer), tokenizer.eos_token, tokenizer.eos_token_id)
    return tokenizer


def decode_without_special(tokenizer, rows: list) -> list[str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` of every id list in ``rows``.

    The same text, faster: paddlenlp's slow tokenizers rebuild their list of special ids for every
    token when asked to skip them (21 ms per 30-token row on the tiny tokenizer, 2 s of a tiny PPO
    run's evaluation); the special ids are dropped here once per call, then decoded without the check.
    """
    special = set(tokenizer.all_special_ids)
    return [tokenizer.decode([int(t) for t in ids if int(t) not in special], skip_special_tokens=False)
            for ids in rows]


def encode_scored_text(tokenizer, prompt: str, response: str, ended: bool, max_length: int) -> list[int]:
    """The ids a score model reads for ``prompt`` + ``response`` given as text: the prompt encoded
    as the tokenizer encodes a text (its special tokens included), the response after one space
    without them, the tokenizer's eos when the response ``ended`` (the actor stopped on its eos),
    and the last ``max_length`` ids kept.  The PPO rollout re-encodes for a reward model with
    another vocabulary this way, and the reward server encodes its requests this way, so both
    score the same ids."""
    ids = list(tokenizer(prompt)["input_ids"]) + list(
        tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"])
    if ended:
        ids.append(tokenizer.eos_token_id)
    return [int(t) for t in ids[-max_length:]]
