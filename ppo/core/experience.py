"""The typed batch that flows from rollout through advantage estimation into the PPO updates.

Shapes: B sequences (prompts x num_return_sequences), L = prompt length P + response length R,
T = L - 1 per-token positions where column t is the action "token t+1 given tokens 0..t".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import paddle


def real_spans(attention_mask) -> tuple:
    """(first real column [B], real length [B]) of each row of ``attention_mask`` [B, L] (numpy
    int64): a rollout row's real tokens are contiguous (left-padded prompt, right-padded response)."""
    mask = np.asarray(attention_mask) > 0
    return mask.argmax(axis=1).astype(np.int64), mask.sum(axis=1).astype(np.int64)


def shift_left(x, first, width: int, valid):
    """x [B, C, ...] -> [B, width, ...] with row b's columns first[b] .. first[b]+width-1 (numpy),
    0 where ``valid`` [B, width] is False (past the row's end)."""
    x = np.asarray(x)
    index = np.minimum(first[:, None] + np.arange(width)[None, :], x.shape[1] - 1)
    out = x[np.arange(x.shape[0])[:, None], index]
    out[~valid] = 0
    return out


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

    def packed(self) -> "Experience":
        """The same rows with each one's real tokens moved to column 0 and the columns cut to the
        longest real row: [B, max real length] (per-token fields one column less).  A row's
        computation is unchanged (positions and attention follow the mask); only padding goes.
        ``prompt_length`` becomes 0: the prompts no longer end at one common column."""
        first, n = real_spans(self.attention_mask.numpy())
        W = int(n.max())
        L = int(self.sequences.shape[1])
        token_valid = np.arange(W)[None, :] < n[:, None]
        action_valid = np.arange(W - 1)[None, :] < (n - 1)[:, None]
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, paddle.Tensor) or value.ndim == 1:
                moved[f.name] = value
            elif value.shape[1] == L:
                moved[f.name] = paddle.to_tensor(shift_left(value.numpy(), first, W, token_valid))
            else:  # [B, L-1]: column t is token t+1, so the same shift
                moved[f.name] = paddle.to_tensor(shift_left(value.numpy(), first, W - 1, action_valid))
        moved["prompt_length"] = 0
        return Experience(**moved)

    @staticmethod
    def concat(exps: list["Experience"], pad_token_id: int = 0) -> "Experience":
        """One batch of the rows of ``exps``, in order.  Prompts are left-padded to the longest
        prompt and responses right-padded to the longest response (``sequences`` with
        ``pad_token_id``, every other [B, L] or [B, L-1] field with 0), so the layout stays
        'left-padded prompt, right-padded response' and position ids follow from the mask.
        Every tensor field is joined, so a new field cannot vanish; a field is None only when it is
        None in every part."""
        if len(exps) == 1:
            return exps[0]
        P = max(e.prompt_length for e in exps)
        R = max(int(e.sequences.shape[1]) - e.prompt_length for e in exps)
        same_layout = all(e.prompt_length == P and int(e.sequences.shape[1]) == P + R for e in exps)
        out: dict = {"prompt_length": P}
        for f in dataclasses.fields(Experience):
            if f.name == "prompt_length":
                continue
            values = [getattr(e, f.name) for e in exps]
            if values[0] is None:
                out[f.name] = None
            elif values[0].ndim == 1 or same_layout:  # nothing to pad: joined where the tensors are
                out[f.name] = paddle.concat(values, axis=0)
            else:  # per token ([B, L]) or per action ([B, L-1]): both shift with the prompt's padding
                fill = pad_token_id if f.name == "sequences" else 0
                parts = [np.pad(v.numpy(), [(0, 0), (P - e.prompt_length,
                                                     R - (int(e.sequences.shape[1]) - e.prompt_length))],
                                constant_values=fill) for e, v in zip(exps, values)]
                out[f.name] = paddle.to_tensor(np.concatenate(parts))
        return Experience(**out)

    def select(self, indices) -> "Experience":
        """Rows ``indices`` of every per-sequence field (a mini-batch)."""
        index = paddle.to_tensor(list(indices), dtype="int64")
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            picked[f.name] = paddle.index_select(value, index, axis=0) if isinstance(value, paddle.Tensor) else value
        return Experience(**picked)
