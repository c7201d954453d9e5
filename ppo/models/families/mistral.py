"""Mistral (paddlenlp ``mistral``): LLaMA-shaped (no biases, grouped kv heads), untied embeddings.

What paddlenlp's Mistral lacks, and so what this family refuses with one line:

* pipeline parallel: paddlenlp has no Mistral pipeline class (the base ``pipeline_unsupported``);
* tied embeddings: its LM head is always a separate [hidden, V] weight;
* sequences longer than ``sliding_window``: paddlenlp's Mistral attends over the whole sequence
  (it ignores the window), so past the window its outputs differ from the model's own attention.
  ``attention_window`` reports the window and the run's ``max_length`` must stay within it.

No fused GPU inference model exists for it: rollout runs on the lean decoder (``ppo.rollout.inference``).

paddlenlp builds Mistral's embedding with ``padding_idx = pad_token_id``, and paddle's embedding
returns zeros there (torch's, which transformers checkpoints are made with, returns the stored
row): a model whose pad token is also a real token (often the EOS) would lose it.  This family's
classes build the embedding without it, under paddlenlp's class names, so saved configs and the
transformers export still say ``MistralForCausalLM``.
"""

from __future__ import annotations

import paddle.nn as nn
from paddlenlp.transformers import MistralConfig, MistralPreTrainedModel
from paddlenlp.transformers import MistralForCausalLM as PaddleNLPMistralForCausalLM
from paddlenlp.transformers import MistralModel as PaddleNLPMistralModel

from ppo.models.families.base import ModelFamily, config_value, register
from ppo.models.score_model import ScoreModel


def _without_padding_idx(backbone) -> None:
    if isinstance(backbone.embed_tokens, nn.Embedding):  # a vocabulary-parallel embedding has none
        backbone.embed_tokens._padding_idx = None


class MistralModel(PaddleNLPMistralModel):
    """paddlenlp's Mistral decoder stack whose embedding returns every token's row."""

    def __init__(self, config):
        super().__init__(config)
        _without_padding_idx(self)


class MistralForCausalLM(PaddleNLPMistralForCausalLM):
    """paddlenlp's Mistral causal LM whose embedding returns every token's row."""

    def __init__(self, config):
        super().__init__(config)
        _without_padding_idx(self.mistral)


class MistralModelForScore(ScoreModel, MistralPreTrainedModel):
    """Mistral + linear score head (parameters ``mistral.*``, ``score_head.*``)."""

    backbone_class = MistralModel


@register
class Mistral(ModelFamily):
    name = "mistral"
    model_types = ("mistral",)
    architectures = ("MistralForCausalLM", "MistralModelForScore")
    prefix = "mistral"
    rotary_module = "paddlenlp.transformers.mistral.modeling"
    config_class = MistralConfig
    causal_lm_class = MistralForCausalLM
    backbone_class = MistralModel
    score_model_class = MistralModelForScore

    def unsupported(self, config) -> str | None:
        if config_value(config, "tie_word_embeddings", False):
            return ("is a mistral model with tied input and output embeddings, which paddlenlp's Mistral "
                    "cannot build (its LM head is a separate weight); tie_word_embeddings must be false")
        return None

    def attention_window(self, config) -> int | None:
        window = config_value(config, "sliding_window")
        return int(window) if window else None
