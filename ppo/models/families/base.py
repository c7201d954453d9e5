"""The model seam: what the toolkit needs to know about a model family, and the family registry.

A family is one file in this package: a :class:`ModelFamily` subclass that names paddlenlp's classes
for it (config, causal LM, backbone, pipeline stages, fused inference model), defines its score model
(backbone + score head, :class:`ppo.models.score_model.ScoreModel`) and registers itself.  Every
other module reaches a family through :func:`family_of` / :func:`family_named`, never by its class
names, so adding a family touches no other module.

The default :meth:`ModelFamily.layer_weights` reads paddlenlp's common decoder naming
(``self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``, ...), shared by LLaMA, Qwen2 and
Mistral; a projection's bias is whatever the layer holds (None when built without one), so a family
with q/k/v biases needs no code of its own for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import paddle
import paddle.nn as nn

from ppo.core.errors import UserError, closest


@dataclass(frozen=True, slots=True)
class Projection:
    """A linear map ``x @ weight (+ bias)``: weight [in, out] (paddle's layout; this rank's shard under
    tensor parallel), bias [out] or None."""

    weight: paddle.Tensor
    bias: paddle.Tensor | None = None
    # a LoRA adapter (ppo.models.lora): the map adds x @ lora_a [in, r] @ lora_b [r, out] * lora_scale
    lora_a: paddle.Tensor | None = None
    lora_b: paddle.Tensor | None = None
    lora_scale: float = 0.0


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One decoder layer as the lean decoder (``ppo.rollout.inference``) computes it.

    Attention inputs come either as separate ``q`` / ``k`` / ``v`` or as paddlenlp's fused ``qkv``
    (per kv head: its group of query heads, then its key and its value, on the output axis); the MLP
    as separate ``gate`` / ``up`` or fused ``gate_up`` ([gate | up] on the output axis).
    Norm weights are [hidden].
    """

    input_norm: paddle.Tensor
    post_attention_norm: paddle.Tensor
    o: Projection
    down: Projection
    q: Projection | None = None
    k: Projection | None = None
    v: Projection | None = None
    qkv: Projection | None = None
    gate: Projection | None = None
    up: Projection | None = None
    gate_up: Projection | None = None
    # per-head RMSNorm weights [head_dim] applied to each query / key head before the rotary
    # embedding (Qwen3), or None
    q_norm: paddle.Tensor | None = None
    k_norm: paddle.Tensor | None = None


@dataclass(frozen=True, slots=True)
class DecoderLayout:
    """A decoder-only model's weights (live parameters, not copies) and attention geometry.

    embed_tokens [V, hidden] (a [V / mp, hidden] slice under a vocabulary-split tensor parallel);
    norm [hidden] (the final norm); lm_head [hidden, V], or [V, hidden] when ``lm_head_transposed``
    (tied to the embedding); None for a score model.  cos / sin: the rotary tables [max_positions,
    head_dim].  num_heads / num_kv_heads: this rank's heads.
    """

    embed_tokens: paddle.Tensor
    layers: list[LayerWeights]
    norm: paddle.Tensor
    lm_head: paddle.Tensor | None
    lm_head_transposed: bool
    tied: bool
    cos: paddle.Tensor
    sin: paddle.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    kv_indices: object = None  # paddlenlp's key/value head selection when kv heads < tensor-parallel degree


@dataclass(frozen=True)
class PipelineParts:
    """paddlenlp's pipeline stage classes of a family (fleet ``PipelineLayer`` pieces).

    embedding / decoder_layer / norm: the stages a score model is assembled from (its head is the
    toolkit's); decoder_layer_name: the layer class name fleet segments stages by
    (``seg_method="layer:<name>"``); causal_lm: paddlenlp's whole causal LM as stages, or None, and
    then the toolkit assembles it from the stages above and ``lm_head`` (an untied head stage), as
    it does the score model.
    """

    embedding: type
    decoder_layer: type
    norm: type
    decoder_layer_name: str
    causal_lm: type | None = None
    lm_head: type | None = None


def _projection(linear, adapters: bool = True) -> Projection:
    # a live LoRA adapter (not switched off, not merged into the weight) is part of the map
    if adapters and hasattr(linear, "lora_A") and not linear.disable_lora and not linear.merged:
        return Projection(linear.weight, getattr(linear, "bias", None), linear.lora_A, linear.lora_B, linear.scaling)
    return Projection(linear.weight, getattr(linear, "bias", None))


def _rotary_table(table: paddle.Tensor) -> paddle.Tensor:
    # [1, positions, 1, head_dim] (LLaMA, Qwen2) or [positions, head_dim] (Mistral) -> [positions, head_dim]
    return table.reshape([-1, table.shape[-1]])


def config_value(config, key: str, default=None):
    """``key`` of a paddlenlp config or of a config.json dict."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


class ModelFamily:
    """Everything the toolkit needs from one model family; one subclass per file, registered with
    :func:`register`.

    Class attributes a family fills in: ``name``; ``model_types`` (config ``model_type`` values) and
    ``architectures`` (config ``architectures`` entries) it answers to; ``prefix``, the backbone's
    attribute name on the causal LM and the score model, which is also the parameter-name prefix
    (``llama.layers.0...``); ``config_class``, ``causal_lm_class``, ``backbone_class`` and
    ``score_model_class``; ``fused_inference_name`` when paddlenlp has a fused inference model for it.
    Methods with paddlenlp imports that need a running fleet or a GPU build
    import on use.

    Mixture-of-experts families (ERNIE 4.5 MoE, Qwen3-MoE) are the next step, and this interface is
    where they come in without changing the trainers: such a family adds (1) its router's auxiliary
    load-balancing loss, returned by the causal LM's forward next to the logits and added by the
    objectives (``ppo.stages.*``) with its coefficient, so the trainers ask the family for it
    rather than knowing about experts; (2) an expert-parallel degree in the layouts
    (``ppo.distributed``: expert groups beside the tensor, pipeline and sharding groups) and the
    experts' tensors in ``extra_layer_tensors``; (3) ``layer_weights`` giving the lean decoder the
    router and each expert's projections.  Until a family does, ``unsupported`` refuses MoE
    configs with one line.
    """

    name: ClassVar[str]
    # what a family's transformers folders hold beyond the common decoder naming: each layer's extra
    # tensors (``self_attn.q_norm`` -> ``layers.N.self_attn.q_norm.weight``, required when loading)
    # and the config keys its export writes besides the common ones
    extra_layer_tensors: ClassVar[tuple[str, ...]] = ()
    extra_config_keys: ClassVar[tuple[str, ...]] = ()
    # whether ``head_dim`` may differ from hidden_size / num_attention_heads (paddlenlp's LLaMA,
    # Qwen2 and Mistral compute it as that quotient)
    free_head_dim: ClassVar[bool] = False
    model_types: ClassVar[tuple[str, ...]]
    architectures: ClassVar[tuple[str, ...]]
    prefix: ClassVar[str]
    config_class: ClassVar[type]
    causal_lm_class: ClassVar[type]
    backbone_class: ClassVar[type]
    score_model_class: ClassVar[type]
    fused_inference_name: ClassVar[str | None] = None  # in paddlenlp.experimental.transformers
    # the paddlenlp module whose ``apply_rotary_pos_emb`` the family's attention calls: its
    # ``rotate_half`` gets the faster, bit-identical form on CPU (``ppo.models.fast_paths``)
    rotary_module: ClassVar[str | None] = None

    # -- models --------------------------------------------------------------------------------

    def backbone(self, model) -> nn.Layer:
        """The decoder stack (embedding, layers, final norm) of a causal LM or score model."""
        return getattr(model, self.prefix)

    def pipeline_parts(self) -> PipelineParts:
        """The pipeline stage classes (imported on use: paddlenlp's modules need fleet's hybrid group)."""
        raise NotImplementedError(f"model family {self.name!r} has no pipeline stages")

    def pipeline_unsupported(self, config) -> str | None:
        """Why ``config``'s model cannot train under pipeline parallel (None: it can), as the end of a
        sentence that starts with the model's path: a family without stages, or tied embeddings
        (no family's stages share one weight between the first and the last stage)."""
        if type(self).pipeline_parts is ModelFamily.pipeline_parts:
            return f"is a {self.name} model, which has no pipeline stages; pipeline_parallel_degree must be 1"
        if config_value(config, "tie_word_embeddings", False):  # the stages do not share one weight
            return ("ties its input and output embeddings; pipeline_parallel_degree > 1 needs untied "
                    "embeddings (tie_word_embeddings false)")
        return None

    def unsupported(self, config) -> str | None:
        """Why the toolkit cannot run ``config``'s model (a paddlenlp config or a config.json dict) at
        all (None: it can), as the end of a sentence that starts with the model's path."""
        return None

    def attention_window(self, config) -> int | None:
        """The sliding attention window of ``config``'s model (None: it attends over the whole
        sequence).  paddlenlp ignores such windows, so sequences must stay within it."""
        return None

    def fused_inference_class(self) -> type:
        """paddlenlp's fused GPU inference model for this family (``fused_inference_name``).  Its
        package imports only on GPU builds with ``paddlenlp_ops``: call after checking that."""
        import paddlenlp.experimental.transformers as fused

        return getattr(fused, self.fused_inference_name)

    def from_hf(self, name: str, value, config):
        """A transformers tensor (``name``, in transformers' [out, in] layout) as this toolkit stores
        it, before the transpose: unchanged except where a family's layout differs (ERNIE 4.5's
        interleaved rotary)."""
        return value

    def to_hf(self, name: str, value, config):
        """The inverse of :meth:`from_hf` on export (``name``: the transformers name, [out, in])."""
        return value

    # -- the lean decoder's view ---------------------------------------------------------------

    def layer_weights(self, layer, adapters: bool = True) -> LayerWeights:
        """One decoder layer's weights in paddlenlp's common naming (fused or separate projections);
        ``adapters`` False: LoRA adapters left out (the base model)."""
        attn, mlp = layer.self_attn, layer.mlp

        def proj(linear):
            return _projection(linear, adapters)

        if getattr(attn, "fuse_attention_qkv", False):
            attention = dict(qkv=proj(attn.qkv_proj))
        else:
            attention = dict(q=proj(attn.q_proj), k=proj(attn.k_proj), v=proj(attn.v_proj))
        if getattr(mlp, "fuse_attention_ffn", False):
            ffn = dict(gate_up=proj(mlp.gate_up_fused_proj))
        else:
            ffn = dict(gate=proj(mlp.gate_proj), up=proj(mlp.up_proj))
        return LayerWeights(input_norm=layer.input_layernorm.weight,
                            post_attention_norm=layer.post_attention_layernorm.weight,
                            o=proj(attn.o_proj), down=proj(mlp.down_proj), **attention, **ffn)

    def layout(self, model) -> DecoderLayout:
        """The weights and geometry of ``model`` (a causal LM or a score model of this family); a
        model flagged ``adapters_off`` (``ppo.models.lora.AdaptersOff``) gives its base weights."""
        adapters = not getattr(model, "adapters_off", False)
        backbone = self.backbone(model)
        attn = backbone.layers[0].self_attn
        rotary = attn.rotary_emb
        head = getattr(model, "lm_head", None)
        embed = backbone.embed_tokens.weight
        return DecoderLayout(
            embed_tokens=embed, layers=[self.layer_weights(layer, adapters) for layer in backbone.layers],
            norm=backbone.norm.weight, lm_head=None if head is None else head.weight,
            lm_head_transposed=bool(getattr(head, "transpose_y", False)),
            tied=head is not None and head.weight is embed,
            cos=_rotary_table(rotary.cos_cached), sin=_rotary_table(rotary.sin_cached),
            num_heads=attn.num_heads, num_kv_heads=attn.num_key_value_heads, head_dim=attn.head_dim,
            rms_norm_eps=model.config.rms_norm_eps, kv_indices=getattr(attn, "kv_indices", None))


# ---------------------------------------------------------------------------------------------
# the registry

_FAMILIES: dict[str, ModelFamily] = {}


def register(family_class: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make ``family_class`` findable by its name, model types and architectures."""
    _FAMILIES[family_class.name] = family_class()
    return family_class


def supported() -> list[str]:
    return sorted(_FAMILIES)


def family_named(name: str, what: str = "model family") -> ModelFamily:
    if name not in _FAMILIES:
        raise UserError(f"'{what}' = {name!r} is not a supported model family{closest(name, _FAMILIES)}; "
                        f"supported: {', '.join(supported())}")
    return _FAMILIES[name]


def family_of(config, what: str = "model_name_or_path", path: str | None = None) -> ModelFamily:
    """The family of a model config (a paddlenlp config, or a config.json dict): by ``model_type``,
    else by ``architectures``.  UserError naming ``what`` (and ``path``) for any other model."""
    model_type = config_value(config, "model_type") or ""
    architectures = list(config_value(config, "architectures") or [])
    for family in _FAMILIES.values():
        if model_type in family.model_types or any(a in family.architectures for a in architectures):
            return family
    found = model_type or (architectures[0] if architectures else "unknown")
    where = f"'{what}' = '{path}'" if path is not None else f"'{what}'"
    raise UserError(f"{where} is a {found!r} model; supported model families: {', '.join(supported())}")


def family_of_model(model) -> ModelFamily:
    """The family of a built model (a causal LM or a score model) by its config."""
    return family_of(model.config, what=type(model).__name__)
