"""Score models: a family's paddlenlp backbone with a scalar score head (``ScoreModel``).

Used as the reward model (``score_type="reward"``) and as the PPO critic (``score_type="critic"``).
The head and the normaliser statistics are stored in the model config, so ``save_pretrained`` /
``from_pretrained`` round-trip exactly and a causal-LM checkpoint can seed a new score model
(its ``lm_head`` is ignored and the head starts from a fixed-seed random init).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn as nn
from paddlenlp.transformers.model_outputs import ModelOutput

from ppo.models.normalizer import Normalizer


def position_ids_from_mask(attention_mask: paddle.Tensor) -> paddle.Tensor:
    """[B, T] positions counted over real tokens only, so left and right padding give the same RoPE."""
    mask = attention_mask.astype("int64")
    return paddle.clip(paddle.cumsum(mask, axis=-1) - 1, min=0)


def last_token_index(attention_mask: paddle.Tensor) -> paddle.Tensor:
    """[B] index of the last real token: correct for right padding and for left padding."""
    T = attention_mask.shape[-1]
    positions = paddle.arange(T, dtype="int64").unsqueeze(0)
    return (positions * attention_mask.astype("int64")).max(axis=-1)


@dataclass
class ScoreOutput(ModelOutput):
    """A ModelOutput (an ordered dict) so data-parallel wrappers can find its tensors."""

    scores: paddle.Tensor = None      # [B, T, score_dim] score after every token
    end_scores: paddle.Tensor = None  # [B, score_dim] score at the last real token


class ScoreModel:
    """A backbone with a linear score head (mixed into a family's paddlenlp ``PretrainedModel``).

    A family's score model is ``class XModelForScore(ScoreModel, XPretrainedModel)`` with
    ``backbone_class = XModel``; the backbone sits at the paddlenlp ``base_model_prefix`` attribute
    (``llama``, ``qwen2``), so parameter names match the causal LM's.  Config keys: score_dim,
    score_bias, score_type, normaliser stats.
    """

    backbone_class: type

    def __init__(self, config):
        super().__init__(config)
        setattr(self, self.base_model_prefix, self.backbone_class(config))
        config.score_dim = int(getattr(config, "score_dim", 1))
        config.score_bias = bool(getattr(config, "score_bias", True))
        config.score_type = getattr(config, "score_type", "reward")
        self.score_head = nn.Linear(config.hidden_size, config.score_dim,
                                    bias_attr=None if config.score_bias else False)
        self.normalizer = Normalizer.from_config(config)

    def forward(self, input_ids, attention_mask, position_ids=None) -> ScoreOutput:
        """input_ids, attention_mask [B, T] -> scores [B, T, score_dim], end_scores [B, score_dim]."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        backbone = getattr(self, self.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, return_dict=True).last_hidden_state
        scores = self.score_head(hidden.astype(self.score_head.weight.dtype))
        index = last_token_index(attention_mask)
        end_scores = paddle.take_along_axis(scores, index.reshape([-1, 1, 1]).expand(
            [scores.shape[0], 1, scores.shape[-1]]), axis=1).squeeze(1)
        return ScoreOutput(scores=scores, end_scores=end_scores)

    def sync_normalizer_to_config(self) -> None:
        for key, value in self.normalizer.to_config().items():
            setattr(self.config, key, value)

    def save_pretrained(self, save_dir, *args, **kwargs):
        self.sync_normalizer_to_config()
        return super().save_pretrained(save_dir, *args, **kwargs)


def init_score_head(model, seed: int = 0) -> None:
    """A new head: normal(0, initializer_range) from its own numpy stream, zero bias.

    Independent of paddle's global generator, so every rank and every parallel layout (whose
    layers consume random numbers differently) starts from the same head.
    """
    head = model.score_head
    std = float(getattr(model.config, "initializer_range", 0.02))
    rng = np.random.default_rng(seed)
    weight = paddle.to_tensor(rng.normal(0.0, std, head.weight.shape).astype("float32"))
    head.weight.set_value(weight.astype(head.weight.dtype))
    if head.bias is not None:
        head.bias.set_value(paddle.zeros(head.bias.shape, dtype=head.bias.dtype))
