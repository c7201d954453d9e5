"""The rollout decoder protocol: what ``ppo.rollout.collect.generate`` drives a decoder through.

Implemented by ``ppo.rollout.collect.PaddleNLPDecoder`` (the model's own forward, the reference),
``ppo.rollout.inference.InferenceModel`` (the lean CPU/GPU path) and ``ppo.rollout.fused.FusedInferenceModel``
(PaddleNLP's fused GPU model).  A decoder that holds its own copy of the weights is also a
:class:`WeightCopyDecoder`: it is told when the trained weights change and refreshes its copy at most
once per generation call.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol, runtime_checkable

import paddle


@runtime_checkable
class RolloutDecoder(Protocol):
    """KV-cache decoding of a left-padded prompt batch, one token per row and step.

    ``generate`` calls ``start`` once, ``step`` once per new token, then ``release``.
    """

    vocab_size: int  # V: the width of the logits every call returns

    def start(self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor, position_ids: paddle.Tensor,
              max_new_tokens: int) -> paddle.Tensor:
        """Prefill prompts input_ids / attention_mask / position_ids [B, P] (left padded), with room for
        ``max_new_tokens`` more; returns the logits [B, V] of the first new token."""
        ...

    def step(self, token: paddle.Tensor, token_mask: paddle.Tensor, position_ids: paddle.Tensor) -> paddle.Tensor:
        """Append token [B] (token_mask [B]: 0 for rows already finished, whose token is padding) at
        position_ids [B, 1]; returns the next logits [B, V]."""
        ...

    def release(self) -> None:
        """Drop the KV cache (memory back before the training phases)."""
        ...


@runtime_checkable
class WeightCopyDecoder(RolloutDecoder, Protocol):
    """A decoder over its own copy of the trained weights (the fused GPU model)."""

    def weights_changed(self) -> None:
        """The trained weights moved (an optimizer step, an export): refresh before decoding again."""
        ...

    def current_weights(self) -> ContextManager:
        """Within it, every ``start`` decodes the current weights; the copy is refreshed at most once."""
        ...


def current_weights(decoder) -> ContextManager:
    """``decoder.current_weights()`` for a weight-copy decoder; nothing to do for any other model."""
    return decoder.current_weights() if isinstance(decoder, WeightCopyDecoder) else contextlib.nullcontext()
