"""LLaMA (paddlenlp ``llama``): bias-free projections, untied or tied embeddings.

Pipeline parallel needs untied embeddings here: paddlenlp's LLaMA pipeline does not share one
weight between the first and the last stage.
"""

from __future__ import annotations

from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, LlamaPretrainedModel

from ppo.models.families.base import ModelFamily, PipelineParts, register
from ppo.models.score_model import ScoreModel


class LlamaModelForScore(ScoreModel, LlamaPretrainedModel):
    """LLaMA + linear score head (parameters ``llama.*``, ``score_head.*``)."""

    backbone_class = LlamaModel


@register
class Llama(ModelFamily):
    name = "llama"
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM", "LlamaModelForScore")
    prefix = "llama"
    rotary_module = "paddlenlp.transformers.llama.modeling"
    config_class = LlamaConfig
    causal_lm_class = LlamaForCausalLM
    backbone_class = LlamaModel
    score_model_class = LlamaModelForScore
    fused_inference_name = "LlamaForCausalLMInferenceModel"

    def pipeline_parts(self) -> PipelineParts:
        from paddlenlp.transformers import LlamaForCausalLMPipe
        from paddlenlp.transformers.llama.modeling_pp import (
            LlamaDecoderLayerPipe,
            LlamaEmbeddingPipe,
            LlamaRMSNormPipe,
        )

        return PipelineParts(causal_lm=LlamaForCausalLMPipe, embedding=LlamaEmbeddingPipe,
                             decoder_layer=LlamaDecoderLayerPipe, norm=LlamaRMSNormPipe,
                             decoder_layer_name="LlamaDecoderLayer")
