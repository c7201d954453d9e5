"""The typed batch that flows from rollout through advantage estimation into the PPO updates.

Shapes: B sequences (prompts x num_return_sequences), L = prompt length P + response length R,
T = L - 1 per-token positions where column t is the action "token t+1 given tokens 0..t".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import paddle


@dataclass
class Experience:
    sequences: paddle.Tensor          # [B, L] int64: left-padded prompt, then right-padded response
    attention_mask: paddle.Tensor     # [B, L] int64: 1 on real tokens (the generated EOS included)
    action_mask: paddle.Tensor        # [B, T] float32: 1 where token t+1 is a response token
    old_log_probs: paddle.Tensor      # [B, T] float32: actor log-probs at rollout time
    ref_log_probs: paddle.Tensor      # [B, T] float32: reference-model log-probs
    end_scores: paddle.Tensor         # [B] float32: reward-model score of the whole sequence
    response_lengths: paddle.Tensor   # [B] int64: response tokens, EOS included
    ended_with_eos: paddle.Tensor     # [B] bool: False when the response hit max_new_tokens
    prompt_length: int                # P
    values: paddle.Tensor | None = None      # [B, T] float32: critic values (None without a critic)
    kl: paddle.Tensor | None = None          # [B, T] float32: per-token KL(actor || ref) estimate
    rewards: paddle.Tensor | None = None     # [B, T] float32: shaped per-token rewards
    advantages: paddle.Tensor | None = None  # [B, T] float32
    returns: paddle.Tensor | None = None     # [B, T] float32: value targets

    @property
    def batch_size(self) -> int:
        return int(self.sequences.shape[0])

    def select(self, indices) -> "Experience":
        """Rows ``indices`` of every per-sequence field (a mini-batch)."""
        index = paddle.to_tensor(list(indices), dtype="int64")
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            picked[f.name] = paddle.index_select(value, index, axis=0) if isinstance(value, paddle.Tensor) else value
        return Experience(**picked)
