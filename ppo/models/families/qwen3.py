"""Qwen3 (dense; transformers ``qwen3``), built on paddlenlp's Qwen2 layers, which paddlenlp 3.0.0b4
lacks as a model.

Qwen3 is Qwen2 with three differences, each implemented here and each checked by a test that fails
without it (``tests/test_qwen3.py``):

* **per-head q/k RMSNorm**: after the q and k projections are split into heads, each head's vector
  is RMS-normalised with a learned ``[head_dim]`` weight (``self_attn.q_norm``, ``self_attn.k_norm``),
  before the rotary embedding;
* **decoupled head_dim**: ``head_dim`` is its own config key (128 in every released Qwen3), so the
  projections are ``hidden -> heads * head_dim`` and ``heads * head_dim -> hidden``, which need not
  be ``hidden -> hidden`` (Qwen3-0.6B: 1024 -> 2048);
* **no q/k/v biases** unless ``attention_bias`` says so (Qwen2 always has them).

Everything else (embedding, MLP, RMSNorm, rotary tables, causal LM head, tied embeddings of the
small models) is paddlenlp's Qwen2 code.  The attention forward is paddlenlp's Qwen2 forward for
separate projections without sequence parallel, with the two norms inserted; its core attention is
``attn_func`` (so the toolkit's fast CPU attention applies) and ``recompute_granularity core_attn``
recomputes it as paddlenlp does.  Under tensor parallel each rank normalises its own heads with the
replicated norm weights, so their gradients are partial there: the weights are marked and training
sums their gradients over the group.  Parameters are named ``qwen3.*`` (``model.*`` in transformers
folders).  What it refuses with one line: fused q/k/v (``fuse_attention_qkv``), sequence parallel,
and, under pipeline parallel, tied embeddings (as for Qwen2).  Its pipeline stages are paddlenlp's
Qwen2 stages with Qwen3 decoder layers, assembled by the toolkit (:func:`decoder_pipeline_parts`).
"""

from __future__ import annotations

import dataclasses

import paddle
import paddle.nn as nn
from paddlenlp.transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model, Qwen2PretrainedModel
from paddlenlp.transformers import linear_utils
from paddlenlp.transformers.qwen2.modeling import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2LMHead,
    Qwen2PretrainingCriterion,
    Qwen2RotaryEmbedding,
    recompute,  # fleet's, as paddlenlp's Qwen2 attention recomputes with it
    repeat_kv,
)
from paddlenlp.transformers.qwen2 import modeling as qwen2_modeling
from paddlenlp.transformers.refined_recompute import get_skip_recompute_ops

from ppo.models.families.base import ModelFamily, PipelineParts, config_value, register
from ppo.models.families.qwen2 import qwen2_stage_layers
from ppo.models.score_model import ScoreModel


class Qwen3Config(Qwen2Config):
    """Qwen2's config plus ``head_dim`` (default hidden_size / num_attention_heads) and
    ``attention_bias`` (default false)."""

    model_type = "qwen3"

    def __init__(self, head_dim: int | None = None, attention_bias: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.head_dim = int(head_dim) if head_dim else self.hidden_size // self.num_attention_heads
        self.attention_bias = bool(attention_bias)


class Qwen3RMSNorm(nn.Layer):
    """RMSNorm over the last axis of size ``dim`` (a head's vector): ``x * rsqrt(mean(x^2) + eps) * w``,
    computed in float32 as transformers' Qwen3RMSNorm."""

    def __init__(self, dim: int, eps: float, tensor_parallel: bool = False):
        super().__init__()
        self.weight = paddle.create_parameter(shape=[dim], dtype=paddle.get_default_dtype(),
                                              default_initializer=nn.initializer.Constant(1.0))
        self.variance_epsilon = eps
        if tensor_parallel:
            # every rank holds the weight but normalises only its own heads: its gradient there is
            # partial, and training sums it over the group (ppo.distributed.parallel.PARTIAL_GRAD)
            self.weight.tensor_parallel_partial_grad = True

    def forward(self, x):
        with paddle.amp.auto_cast(False):
            h = x.astype("float32")
            h = paddle.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * h
        return h.astype(self.weight.dtype) * self.weight


def linear_pair(config, d_in: int, d_out: int, bias: bool, row: bool = False):
    """A ``d_in -> d_out`` linear as paddlenlp builds it: column- (or ``row``-) parallel under tensor
    parallel, else whole; with a bias or not."""
    if config.tensor_parallel_degree > 1:
        if row:
            return linear_utils.RowParallelLinear(d_in, d_out, has_bias=bias, input_is_parallel=True)
        return linear_utils.ColumnParallelLinear(d_in, d_out, has_bias=bias, gather_output=False)
    return linear_utils.Linear(d_in, d_out, bias_attr=bias)


class Qwen3Attention(Qwen2Attention):
    """paddlenlp's Qwen2 attention with Qwen3's projections (``head_dim``, ``attention_bias``) and
    per-head q/k norms.  ``head_norms`` False and ``biases`` give ERNIE 4.5's attention
    (``families/ernie4_5.py``)."""

    head_norms = True

    def biases(self, config) -> tuple[bool, bool]:
        """Whether the q/k/v projections and the output projection have biases."""
        return bool(config.attention_bias), False

    def __init__(self, config, layerwise_recompute: bool = True, skip_recompute_ops=None):
        super().__init__(config, layerwise_recompute, skip_recompute_ops)
        D, H, KV, hidden = config.head_dim, config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        qkv_bias, o_bias = self.biases(config)
        self.head_dim = D
        self.q_proj = linear_pair(config, hidden, H * D, qkv_bias)
        self.k_proj = linear_pair(config, hidden, KV * D, qkv_bias)
        self.v_proj = linear_pair(config, hidden, KV * D, qkv_bias)
        self.o_proj = linear_pair(config, H * D, hidden, o_bias, row=True)
        self.rotary_emb = Qwen2RotaryEmbedding(D, max_position_embeddings=self.max_position_embeddings,
                                               base=self.rope_theta)
        if self.head_norms:
            split = config.tensor_parallel_degree > 1
            self.q_norm = Qwen3RMSNorm(D, config.rms_norm_eps, split)
            self.k_norm = Qwen3RMSNorm(D, config.rms_norm_eps, split)

    def forward(self, hidden_states, position_ids=None, past_key_value=None, attention_mask=None,
                output_attentions: bool = False, use_cache: bool = False, attn_mask_startend_row_indices=None,
                **kwargs):
        query_states = self.q_proj(hidden_states).reshape([0, 0, self.num_heads, self.head_dim])
        key_states = self.k_proj(hidden_states).reshape([0, 0, self.num_key_value_heads, self.head_dim])
        if self.head_norms:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        value_states = self.v_proj(hidden_states).reshape([0, 0, self.num_key_value_heads, self.head_dim])

        kv_seq_len = key_states.shape[-3]
        if past_key_value is not None:
            kv_seq_len += past_key_value[0].shape[-3]
        cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
        # (read from the module at each call: on CPU the loaders put the toolkit's faster form there)
        query_states, key_states = qwen2_modeling.apply_rotary_pos_emb(query_states, key_states, cos, sin,
                                                                       position_ids)
        if past_key_value is not None:
            key_states = paddle.concat([past_key_value[0], key_states], axis=1)
            value_states = paddle.concat([past_key_value[1], value_states], axis=1)
        past_key_value = (key_states, value_states) if use_cache else None
        if not self.config.use_flash_attention:
            key_states = repeat_kv(key_states, self.num_key_value_groups)
            value_states = repeat_kv(value_states, self.num_key_value_groups)

        has_gradient = not (query_states.stop_gradient and key_states.stop_gradient and value_states.stop_gradient)
        arguments = (query_states, self.config, key_states, value_states, attention_mask, output_attentions)
        options = dict(attn_mask_startend_row_indices=attn_mask_startend_row_indices, training=self.training,
                       sequence_parallel=False)
        if (self.enable_recompute and self.layerwise_recompute and has_gradient
                and self.recompute_granularity == "core_attn"):
            outputs = recompute(self.attn_func, *arguments, use_reentrant=self.config.recompute_use_reentrant,
                                **options)
        else:
            outputs = self.attn_func(*arguments, **options)
        attn_output, attn_weights = outputs if output_attentions else (outputs, None)
        out = (self.o_proj(attn_output),)
        if output_attentions:
            out += (attn_weights,)
        if use_cache:
            out += (past_key_value,)
        return out[0] if len(out) == 1 else out


class Qwen3DecoderLayer(Qwen2DecoderLayer):
    attention_class = Qwen3Attention

    def __init__(self, config: Qwen3Config, layerwise_recompute: bool = False, skip_recompute_ops=None):
        super().__init__(config, layerwise_recompute, skip_recompute_ops)
        self.self_attn = self.attention_class(config, layerwise_recompute, skip_recompute_ops=skip_recompute_ops)


class Qwen3PretrainedModel(Qwen2PretrainedModel):
    config_class = Qwen3Config
    base_model_prefix = "qwen3"

    def _init_weights(self, layer):
        if isinstance(layer, Qwen3RMSNorm):  # ones, as transformers initialises them
            return
        # (named, not super(): the pipeline stages borrow this method without being subclasses)
        Qwen2PretrainedModel._init_weights(self, layer)


class Qwen3Model(Qwen3PretrainedModel, Qwen2Model):
    """paddlenlp's Qwen2 decoder stack of Qwen3 layers."""

    layer_class = Qwen3DecoderLayer

    def __init__(self, config: Qwen3Config):
        Qwen2Model.__init__(self, config)
        self.layers = nn.LayerList([
            self.layer_class(config, layerwise_recompute=i not in self.no_recompute_layers,
                             skip_recompute_ops=get_skip_recompute_ops(config, i))
            for i in range(config.num_hidden_layers)])


class Qwen3ForCausalLM(Qwen3PretrainedModel, Qwen2ForCausalLM):
    """paddlenlp's Qwen2 causal LM over the Qwen3 stack (parameters ``qwen3.*``, ``lm_head.*``); the
    stack sits at ``base_model_prefix`` (``stack_class``), which paddlenlp's Qwen2 forward reads as
    ``self.qwen2``."""

    stack_class = Qwen3Model

    def __init__(self, config):
        Qwen2PretrainedModel.__init__(self, config)  # (not Qwen2ForCausalLM's: it builds a Qwen2 stack)
        setattr(self, self.base_model_prefix, self.stack_class(config))
        stack = self.qwen2
        if config.tie_word_embeddings:
            self.lm_head = Qwen2LMHead(config, embedding_weights=stack.embed_tokens.weight, transpose_y=True)
            self.tie_weights()
        else:
            self.lm_head = Qwen2LMHead(config)
        self.criterion = Qwen2PretrainingCriterion(config)
        self.vocab_size = config.vocab_size

    @property
    def qwen2(self):
        return getattr(self, self.base_model_prefix)

    def get_input_embeddings(self):
        return self.qwen2.embed_tokens

    def set_input_embeddings(self, value):
        self.qwen2.embed_tokens = value

    def get_decoder(self):
        return self.qwen2


def decoder_pipeline_parts(decoder_layer: type) -> PipelineParts:
    """Pipeline stages for a family built on paddlenlp's Qwen2 layers with its own ``decoder_layer``
    class: paddlenlp's Qwen2 embedding, norm and LM head stages, and the decoder layer under
    paddlenlp's Qwen2 stage forward (which reads the stage tuple and recomputes as paddlenlp does).
    The causal LM is assembled by the toolkit from these (``PipelineParts.causal_lm`` None)."""
    from paddlenlp.transformers.qwen2.modeling_pp import Qwen2DecoderLayerPipe

    embedding, norm, lm_head = qwen2_stage_layers()
    layer = type(f"{decoder_layer.__name__}Pipe", (Qwen2DecoderLayerPipe, decoder_layer), {})
    return PipelineParts(embedding=embedding, decoder_layer=layer, norm=norm, lm_head=lm_head,
                         decoder_layer_name=decoder_layer.__name__)


class Qwen3ModelForScore(ScoreModel, Qwen3PretrainedModel):
    """Qwen3 + linear score head (parameters ``qwen3.*``, ``score_head.*``)."""

    backbone_class = Qwen3Model


@register
class Qwen3(ModelFamily):
    name = "qwen3"
    model_types = ("qwen3",)
    architectures = ("Qwen3ForCausalLM", "Qwen3ModelForScore")
    prefix = "qwen3"
    rotary_module = "paddlenlp.transformers.qwen2.modeling"
    config_class = Qwen3Config
    causal_lm_class = Qwen3ForCausalLM
    backbone_class = Qwen3Model
    score_model_class = Qwen3ModelForScore
    extra_layer_tensors = ("self_attn.q_norm", "self_attn.k_norm")
    extra_config_keys = ("head_dim",)
    free_head_dim = True

    def unsupported(self, config) -> str | None:
        if config_value(config, "fuse_attention_qkv", False):
            return "is a qwen3 model with fuse_attention_qkv, which its per-head q/k norms do not take; set it false"
        if config_value(config, "sequence_parallel", False):
            return "is a qwen3 model, which runs without sequence_parallel; set it false"
        return None

    def pipeline_parts(self) -> PipelineParts:
        return decoder_pipeline_parts(Qwen3DecoderLayer)

    def attention_window(self, config) -> int | None:
        if config_value(config, "use_sliding_window", False) and config_value(config, "sliding_window"):
            return int(config_value(config, "sliding_window"))
        return None

    def layer_weights(self, layer, adapters: bool = True):
        return dataclasses.replace(super().layer_weights(layer, adapters), q_norm=layer.self_attn.q_norm.weight,
                                   k_norm=layer.self_attn.k_norm.weight)
