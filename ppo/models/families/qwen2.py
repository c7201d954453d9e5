"""Qwen2 / Qwen2.5 (paddlenlp ``qwen2``): q/k/v projection biases, untied or tied embeddings.

The biases need no code here: the base layout reads whatever bias a projection holds.  A tied LM
head is paddlenlp's ``Qwen2LMHead(transpose_y=True)`` over the embedding weight [V, hidden]; the
base layout reports it as ``lm_head_transposed`` and ``tied``.  paddlenlp ignores Qwen2's
``sliding_window`` (as the toolkit does): results differ from a windowed reference only for
sequences longer than the window.

Pipeline parallel needs untied embeddings: the toolkit's pipeline stages do not share one weight
between the first and the last stage.
"""

from __future__ import annotations

from paddlenlp.transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model, Qwen2PretrainedModel

from ppo.models.families.base import ModelFamily, PipelineParts, config_value, register
from ppo.models.score_model import ScoreModel


class Qwen2ModelForScore(ScoreModel, Qwen2PretrainedModel):
    """Qwen2 + linear score head (parameters ``qwen2.*``, ``score_head.*``)."""

    backbone_class = Qwen2Model


def qwen2_stage_layers() -> tuple[type, type, type]:
    """paddlenlp's Qwen2 pipeline stages (embedding, final norm, untied LM head) for the toolkit's
    stage input (ids, mask, position_ids [B, T] int64); imported on use (fleet's hybrid group)."""
    import paddle
    from paddlenlp.transformers.qwen2.modeling_pp import Qwen2EmbeddingPipe, Qwen2LMHeadPipe, Qwen2RMSNormPipe

    class EmbeddingPipe(Qwen2EmbeddingPipe):
        """Reads the toolkit's stage input: paddlenlp's Qwen2 embedding takes a third tensor for
        attention row indices (its decoder layers tell the two apart by dtype, this stage does not)."""

        def forward(self, args):
            if isinstance(args, tuple) and len(args) == 3 and args[2].dtype == paddle.int64:
                args = (args[0], args[1], None, args[2])
            return super().forward(args)

    return EmbeddingPipe, Qwen2RMSNormPipe, Qwen2LMHeadPipe


@register
class Qwen2(ModelFamily):
    name = "qwen2"
    model_types = ("qwen2",)
    architectures = ("Qwen2ForCausalLM", "Qwen2ModelForScore")
    prefix = "qwen2"
    rotary_module = "paddlenlp.transformers.qwen2.modeling"
    config_class = Qwen2Config
    causal_lm_class = Qwen2ForCausalLM
    backbone_class = Qwen2Model
    score_model_class = Qwen2ModelForScore
    fused_inference_name = "Qwen2ForCausalLMInferenceModel"

    def pipeline_parts(self) -> PipelineParts:
        from paddlenlp.transformers import Qwen2ForCausalLMPipe
        from paddlenlp.transformers.qwen2.modeling_pp import Qwen2DecoderLayerPipe, Qwen2EmbeddingPipe

        EmbeddingPipe, norm, _ = qwen2_stage_layers()

        class CausalLMPipe(Qwen2ForCausalLMPipe):
            def __init__(self, config):
                super().__init__(config)
                for layer in self.run_function:  # this stage's layers: the embedding reads positions
                    if type(layer) is Qwen2EmbeddingPipe:
                        layer.__class__ = EmbeddingPipe

        return PipelineParts(causal_lm=CausalLMPipe, embedding=EmbeddingPipe, decoder_layer=Qwen2DecoderLayerPipe,
                             norm=norm, decoder_layer_name="Qwen2DecoderLayer")

    def attention_window(self, config) -> int | None:
        # a window applies only where the config switches it on (Qwen2 / Qwen2.5 ship it off)
        if config_value(config, "use_sliding_window", False) and config_value(config, "sliding_window"):
            return int(config_value(config, "sliding_window"))
        return None
