"""ERNIE 4.5 dense (transformers ``ernie4_5``, e.g. ERNIE-4.5-0.3B), built on paddlenlp's Qwen2
layers as ``families/qwen3.py`` is, which paddlenlp 3.0.0b4 lacks as a model.

ERNIE 4.5 differs from LLaMA in four places, each handled here and each checked by a test that
fails without it (``tests/test_ernie4_5.py``):

* **interleaved rotary**: its rotary embedding rotates the pairs (0, 1), (2, 3), ... of each head
  (GLM style) rather than (i, i + head_dim/2).  Attention scores are unchanged when the query and
  key features of every head are permuted alike, so the transformers folder is converted with each
  head's q and k projection rows (and biases) reordered evens-then-odds: the converted model is an
  ordinary half-split rotary model with the same outputs, and the export reorders them back
  (``from_hf`` / ``to_hf``).  Weights are permuted, not copied: the lean decoder, tensor parallel
  and LoRA see an ordinary model;
* **its own head_dim** (128 in ERNIE-4.5-0.3B, whose hidden_size / heads is 64);
* **the bias switch** ``use_bias``: biases on q/k/v/o and on the MLP's three projections, or none;
* **a tied head** in the small models (transformers' default, left out of their config.json: the
  conversion reads it from the weights).

Parameters are named ``ernie.*`` (``model.*`` in transformers folders).  Refused with one line:
fused q/k/v or gate/up, sequence parallel, tied embeddings under pipeline parallel (its stages are
Qwen3's with ERNIE layers, ``qwen3.decoder_pipeline_parts``), and the mixture-of-experts configs (``moe_num_experts``: ERNIE 4.5 MoE is the next step, see
``families/base.py``).
"""

from __future__ import annotations

import numpy as np
import paddle
from paddlenlp.transformers import Qwen2Config
from paddlenlp.transformers.qwen2.modeling import Qwen2MLP

from ppo.models.families.base import ModelFamily, PipelineParts, config_value, register
from ppo.models.families.qwen3 import (
    Qwen3Attention,
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3PretrainedModel,
    decoder_pipeline_parts,
    linear_pair,
)
from ppo.models.score_model import ScoreModel


class Ernie4_5Config(Qwen2Config):
    """Qwen2's config keys plus ``head_dim`` (default hidden_size / heads) and ``use_bias``.

    ``tie_word_embeddings`` keeps paddlenlp's default (false) so that a saved config always states
    a tied head: transformers' Ernie4_5Config defaults it to true and leaves it out of config.json
    then, and the conversion reads such a folder as tied from its weights (no ``lm_head.weight``)."""

    model_type = "ernie4_5"

    def __init__(self, head_dim: int | None = None, use_bias: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.head_dim = int(head_dim) if head_dim else self.hidden_size // self.num_attention_heads
        self.use_bias = bool(use_bias)


class Ernie4_5Attention(Qwen3Attention):
    head_norms = False

    def biases(self, config) -> tuple[bool, bool]:
        return bool(config.use_bias), bool(config.use_bias)


class Ernie4_5MLP(Qwen2MLP):
    """paddlenlp's SwiGLU MLP, its three projections biased when ``use_bias``."""

    def __init__(self, config, skip_recompute_ops=None):
        super().__init__(config, skip_recompute_ops=skip_recompute_ops)
        if config.use_bias:
            hidden, inner = config.hidden_size, config.intermediate_size
            self.gate_proj = linear_pair(config, hidden, inner, True)
            self.up_proj = linear_pair(config, hidden, inner, True)
            self.down_proj = linear_pair(config, inner, hidden, True, row=True)


class Ernie4_5DecoderLayer(Qwen3DecoderLayer):
    attention_class = Ernie4_5Attention

    def __init__(self, config, layerwise_recompute: bool = False, skip_recompute_ops=None):
        super().__init__(config, layerwise_recompute, skip_recompute_ops)
        self.mlp = Ernie4_5MLP(config, skip_recompute_ops=skip_recompute_ops)


class Ernie4_5PretrainedModel(Qwen3PretrainedModel):
    config_class = Ernie4_5Config
    base_model_prefix = "ernie"

    @classmethod
    def _get_tensor_parallel_mappings(cls, config, is_split=True):
        """paddlenlp's Qwen2 split actions (q/k/v weights and biases, o, gate, up, down), plus the MLP's
        gate and up biases, split with their columns; the o and down biases are whole on every rank."""
        mappings = super()._get_tensor_parallel_mappings(config, is_split)
        if getattr(config, "use_bias", False):
            column = mappings["layers.0.self_attn.q_proj.bias"]
            for i in range(config.num_hidden_layers):
                for name in ("gate_proj", "up_proj"):
                    mappings[f"layers.{i}.mlp.{name}.bias"] = column
        return mappings


class Ernie4_5Model(Ernie4_5PretrainedModel, Qwen3Model):
    """paddlenlp's Qwen2 decoder stack of ERNIE 4.5 layers."""

    layer_class = Ernie4_5DecoderLayer

    def __init__(self, config):  # (explicit: paddlenlp's init tracking would reach the PretrainedModel's)
        Qwen3Model.__init__(self, config)


class Ernie4_5ForCausalLM(Ernie4_5PretrainedModel, Qwen3ForCausalLM):
    """The causal LM over the ERNIE 4.5 stack (parameters ``ernie.*``, ``lm_head.*``)."""

    stack_class = Ernie4_5Model

    def __init__(self, config):
        Qwen3ForCausalLM.__init__(self, config)


class Ernie4_5ModelForScore(ScoreModel, Ernie4_5PretrainedModel):
    """ERNIE 4.5 + linear score head (parameters ``ernie.*``, ``score_head.*``)."""

    backbone_class = Ernie4_5Model


def evens_then_odds(heads: int, head_dim: int) -> np.ndarray:
    """Row order that turns each head's interleaved rotary pairs (2i, 2i+1) into half-split pairs
    (i, i + head_dim/2): per head, the even features, then the odd ones."""
    one = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return (np.arange(heads)[:, None] * head_dim + one[None, :]).reshape(-1)


def _take_rows(value, index: np.ndarray):
    if isinstance(value, np.ndarray):
        return value[index]
    return paddle.index_select(value, paddle.to_tensor(index, dtype="int64"), axis=0)


@register
class Ernie4_5(ModelFamily):
    name = "ernie4_5"
    model_types = ("ernie4_5",)
    architectures = ("Ernie4_5ForCausalLM", "Ernie4_5ModelForScore")
    prefix = "ernie"
    rotary_module = "paddlenlp.transformers.qwen2.modeling"
    config_class = Ernie4_5Config
    causal_lm_class = Ernie4_5ForCausalLM
    backbone_class = Ernie4_5Model
    score_model_class = Ernie4_5ModelForScore
    extra_config_keys = ("head_dim", "use_bias")
    free_head_dim = True

    def unsupported(self, config) -> str | None:
        for key in ("fuse_attention_qkv", "fuse_attention_ffn", "sequence_parallel"):
            if config_value(config, key, False):
                return f"is an ernie4_5 model with {key}, which this family does not build; set it false"
        if config_value(config, "moe_num_experts", 0):
            return ("is an ERNIE 4.5 mixture-of-experts model (moe_num_experts), which this toolkit does not train "
                    "yet; the dense ERNIE 4.5 models (e.g. ERNIE-4.5-0.3B) are supported")
        return None

    def pipeline_parts(self) -> PipelineParts:
        return decoder_pipeline_parts(Ernie4_5DecoderLayer)

    def _order(self, name: str, config) -> np.ndarray | None:
        """The row order of a transformers q/k projection tensor, or None for any other tensor."""
        if not name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                              "self_attn.k_proj.bias")):
            return None
        heads = config_value(config, "num_attention_heads") if ".q_proj." in name else \
            config_value(config, "num_key_value_heads", config_value(config, "num_attention_heads"))
        D = config_value(config, "head_dim") or config_value(config, "hidden_size") // config_value(
            config, "num_attention_heads")
        return evens_then_odds(int(heads), int(D))

    def from_hf(self, name: str, value, config):
        order = self._order(name, config)
        return value if order is None else _take_rows(value, order)

    def to_hf(self, name: str, value, config):
        order = self._order(name, config)
        return value if order is None else _take_rows(value, np.argsort(order))
