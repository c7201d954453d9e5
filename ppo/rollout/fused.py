"""Rollout on PaddleNLP's fused multi-transformer models (GPU builds with ``paddlenlp_ops``).

Which decoder rolls out (``rollout_decoder``):

* a GPU build where the ``paddlenlp_ops`` custom operators import: the model family's fused
  inference model (``ModelFamily.fused_inference_class``, e.g. PaddleNLP's fused LLaMA: fused QKV
  and FFN GEMMs, rotary and cached attention in fused kernels, the KV cache written in place);
* a GPU build without them (or whose paddle lacks an operator PaddleNLP's fused module imports),
  or a model the fused kernels cannot reproduce (rotary scaling; heads not divisible by the
  tensor-parallel degree; a family without a fused model): ``ppo.rollout.inference.InferenceModel``, after
  one warning naming the reason;
* a CPU build: ``ppo.rollout.inference.InferenceModel`` (the operators are CUDA-only; no warning).

Both implement the decoder protocol (``ppo.rollout.decoding.RolloutDecoder``: ``start`` / ``step`` /
``release``), so sampling, top-k / top-p, repetition penalty, EOS handling and the tensor-parallel
token broadcast are the same code on both paths.  Only generation moves to the fused model: the
no-grad scoring of rollouts (log-probs, values, rewards) keeps ``InferenceModel``.

Weights.  The fused model holds its own copy in its own layout (QKV concatenated, projections
transposed, cast to the training precision).  ``refresh`` rebuilds that copy from the actor's
current state dict through PaddleNLP's ``set_state_dict``, which takes this rank's
tensor-parallel shards as they are (the fused model is built with the actor's tensor-parallel
degree and rank).  The trainer marks the copy stale whenever the actor's weights change (every
actor update, every export to a rollout copy); a generation call then refreshes it once before
its first bucket, so a rollout never decodes stale weights and unchanged weights are not copied
again (evaluation batches).  The copy stays allocated between rollouts (no offload level moves
it).  The fused path runs in the training's half precision (``bf16`` / ``fp16``); float32
training rolls out on ``InferenceModel``.  PaddleNLP names the fused
parameters by layer index, so a process holds one fused model (the actor's).

Input contract (PaddleNLP's dynamic-batching inference model): the prefill takes the prompts
right-padded with their lengths (``seq_len_encoder``), positions ``0 .. len - 1`` and an additive
causal mask over each row's real tokens, and returns the logits of each row's last token; each
decode step takes one token per row at position ``tgt_pos`` with ``seq_len_decoder`` tokens
already cached, and per-layer caches ``[2, B, kv_heads, T, head_dim]``.

Testing.  The operators cannot run in this project's CPU CI.  The CPU tests cover the selection
(with its single warning) and this adapter's bookkeeping against a stand-in model that checks the
contract above and computes the logits with the training model.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import numpy as np
import paddle
from paddlenlp.transformers.conversion_utils import split_param_func

from ppo.distributed import parallel
from ppo.rollout.decoding import RolloutDecoder, WeightCopyDecoder
from ppo.rollout.inference import InferenceModel
from ppo.models.families import family_of
from ppo.models.lora import is_lora

logger = logging.getLogger("ppo")
_warned = False
_UNAVAILABLE: list = []  # the cached reason (one import attempt per process)


def fused_unavailable_reason() -> str | None:
    """Why PaddleNLP's fused inference model cannot be used in this process (None: it can).

    Both ``paddlenlp_ops`` and PaddleNLP's fused model package must import: the package also needs
    fused operators of the installed paddle (some paddle releases dropped one it imports).
    """
    if not _UNAVAILABLE:
        try:
            import paddlenlp_ops  # noqa: F401
            import paddlenlp.experimental.transformers  # noqa: F401

            _UNAVAILABLE.append(None)
        except Exception as e:  # ImportError, or an error raised while the modules import
            _UNAVAILABLE.append(f"{type(e).__name__}: {e}".splitlines()[0])
    return _UNAVAILABLE[0]


def unsupported_config(config) -> str | None:
    """Why the fused model cannot reproduce ``config``'s model (None: it can)."""
    family = family_of(config)
    if family.fused_inference_name is None:
        return f"PaddleNLP has no fused inference model for the {family.name} family"
    mp = max(1, int(getattr(config, "tensor_parallel_degree", 1) or 1))
    if (getattr(config, "rope_scaling_type", None) or float(getattr(config, "rope_scaling_factor", 1.0)) != 1.0
            or getattr(config, "use_long_sequence_strategies", False)):
        return "rotary scaling (the fused rotary kernel takes rope_theta only)"
    if config.num_key_value_heads % mp or config.num_attention_heads % mp:
        return f"attention heads not divisible by tensor_parallel_degree {mp}"
    return None


def rollout_decoder(model, static_decode: bool = False, dtype: str | None = None) -> RolloutDecoder:
    """The rollout decoder over ``model`` (a causal LM of a registered family): fused on GPU builds
    where PaddleNLP's fused model is usable, else ``InferenceModel`` (see the module docstring).
    ``dtype``: the training precision (bfloat16 / float16; None for float32)."""
    global _warned
    if parallel.device() == "gpu":
        missing = fused_unavailable_reason()
        # its weight copy would hold the base weights only: LoRA adapters are applied by InferenceModel
        reason = missing or ("LoRA adapters" if is_lora(model) else None) or unsupported_config(model.config) or (
            None if dtype in ("bfloat16", "float16") else "float32 training: it runs in the bf16 / fp16 precision")
        if reason is None:
            return FusedInferenceModel(model, dtype=dtype)
        if not _warned:
            hint = " (install paddlenlp_ops built for this paddle for the fused GPU path)" if missing else ""
            logger.warning("PaddleNLP's fused inference model is not used (%s): rollout runs on "
                           "ppo.rollout.inference.InferenceModel%s", reason, hint)
            _warned = True
    return InferenceModel(model, static_decode=static_decode)


def _paddlenlp_fused_model(config, dtype: str):
    """The family's fused inference model (PaddleNLP's) for ``config``, its weights in ``dtype``."""
    from paddlenlp.transformers.model_utils import dtype_guard

    fused_class = family_of(config).fused_inference_class()
    with dtype_guard(dtype):
        return fused_class(config)


def right_packed(input_ids, attention_mask):
    """Left-padded prompts moved to the left edge: (ids [B, longest prompt] right padded with 0,
    lengths [B] int64).  The width must be the longest prompt: the fused model's padding offsets
    assume it."""
    ids = input_ids.numpy()
    mask = attention_mask.numpy().astype(bool)
    lengths = mask.sum(axis=1)
    out = np.zeros((ids.shape[0], int(lengths.max())), dtype=ids.dtype)
    for b in range(ids.shape[0]):
        out[b, :lengths[b]] = ids[b][mask[b]]
    return paddle.to_tensor(out), lengths.astype("int64")


def fused_model_state(model, dtype: str = "float32") -> dict:
    """``model``'s state dict as numpy in ``dtype`` (its loader casts some weights, not the LM
    head), in a layout PaddleNLP's ``set_state_dict`` loads.

    PaddleNLP's fused LLaMA loads unfused or fully fused layers, but not a fused QKV next to
    separate gate and up projections: those are concatenated into the fused ``gate_up_fused_proj``
    ([gate | up] on the output axis, per tensor-parallel shard, PaddleNLP's fused layout).  Its
    fused Qwen2 reads the q/k/v biases by their separate names only: a fused ``qkv_proj.bias``
    (per kv head: its query heads, its key, its value) is split into them, as the weight is.
    """
    state = {name: value.astype(dtype).numpy() for name, value in model.state_dict().items()}
    for name in [n for n in state if n.endswith(".self_attn.qkv_proj.weight")]:
        prefix = name[:-len("self_attn.qkv_proj.weight")] + "mlp."
        if prefix + "gate_proj.weight" in state:
            gate, up = state.pop(prefix + "gate_proj.weight"), state.pop(prefix + "up_proj.weight")
            state[prefix + "gate_up_fused_proj.weight"] = np.concatenate([gate, up], axis=-1)
    mp = max(1, int(getattr(model.config, "tensor_parallel_degree", 1) or 1))
    for name in [n for n in state if n.endswith(".self_attn.qkv_proj.bias")]:
        prefix = name[:-len("qkv_proj.bias")]
        q, k, v = split_param_func()(state.pop(name), is_qkv=True, num_heads=model.config.num_attention_heads // mp,
                                     num_key_value_heads=model.config.num_key_value_heads // mp)
        state.update({prefix + "q_proj.bias": q, prefix + "k_proj.bias": k, prefix + "v_proj.bias": v})
    return state


class FusedInferenceModel(WeightCopyDecoder):
    """The decoder protocol over a family's PaddleNLP fused inference model (see the module docstring).

    ``factory(config, dtype)`` builds the fused model; PaddleNLP's by default.
    """

    def __init__(self, model, dtype: str | None = None, factory=_paddlenlp_fused_model):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.dtype = dtype or "float32"
        self.factory = factory
        self.fused = None
        self.cache = None
        self.stale = True  # the copy needs the actor's weights (set by weights_changed)
        self._held = False

    def weights_changed(self) -> None:
        """The actor's weights moved (an optimizer step, an export): refresh before decoding again."""
        self.stale = True

    def _build(self):
        config = copy.deepcopy(self.model.config)
        config.quant_type = ""            # plain weights ...
        config.cachekv_int8_type = None   # ... and a plain dense KV cache
        config.append_attn = False
        config.single_card_ptq = True
        config.sequence_parallel = False  # rows, not a sequence-parallel split, reach its LM head
        # its parameter initialisers draw random numbers: the run's random streams must not see them
        states = paddle.get_rng_state(), paddle.get_rng_state("cpu")
        try:
            fused = self.factory(config, self.dtype)
        finally:
            paddle.set_rng_state(states[0])
            paddle.set_rng_state(states[1], "cpu")
        fused.eval()
        return fused

    def refresh(self) -> None:
        """Copy the actor's current weights into the fused model (built on first use)."""
        from paddlenlp.transformers.model_utils import dtype_guard

        if self.fused is None:
            self.fused = self._build()
        with dtype_guard(self.dtype):  # it casts some weights to the default dtype
            self.fused.set_state_dict(fused_model_state(self.model, self.dtype))
        self.stale = False

    @contextlib.contextmanager
    def current_weights(self):
        """A generation call decodes the actor's current weights, refreshed at most once for all
        its buckets (and not at all while they have not changed)."""
        if self._held:
            yield
            return
        if self.stale:
            self.refresh()
        self._held = True
        try:
            yield
        finally:
            self._held = False

    def _logits(self, inputs):
        out = self.fused(**inputs)
        logits = out[0] if isinstance(out, (tuple, list)) else out.logits
        return logits.astype("float32")

    def start(self, input_ids, attention_mask, position_ids, max_new_tokens: int):
        """Prefill a left-padded prompt batch; logits [B, V] for the first new token."""
        if self.stale and not self._held:
            self.refresh()
        ids, lengths = right_packed(input_ids, attention_mask)
        B, P = ids.shape
        T = P + max_new_tokens  # a row's last decode position is its length + max_new_tokens - 1
        self.cache = [paddle.zeros(shape, self.dtype)
                      for shape in self.fused.get_cache_kvs_shape(self.fused.config, B, T)]
        slots = np.arange(P)
        real = slots[None, :] < lengths[:, None]                                     # [B, P]
        positions = np.where(real, slots[None, :], 0)
        causal = np.tril(np.ones((P, P), dtype=bool))[None] & real[:, None, :] & real[:, :, None]
        seq_lens = paddle.to_tensor(lengths.reshape(-1, 1).astype("int32"))
        # attention over every cached slot up to a row's own length (the kernel bounds it by seq_len_decoder)
        self.generation_mask = paddle.ones([B, 1, 1, T], self.dtype)
        inputs = self.fused.prepare_inputs_for_generation(
            ids, self.cache, seq_lens, seq_lens, None, None, None,
            position_ids=paddle.to_tensor(positions.astype("int64")),
            attention_mask=paddle.to_tensor(causal[:, None].astype("float32")).astype(self.dtype), cache=None)
        self.seq_lens = seq_lens
        return self._logits(inputs)

    def step(self, token, token_mask, position_ids):
        """One token per row at ``position_ids`` (a finished row's padding is decoded and ignored)."""
        token = token.reshape([-1, 1]).astype("int64")
        position = position_ids.reshape([-1, 1]).astype("int64")
        # right packed, a row's position is also the number of tokens already in its cache
        inputs = self.fused.prepare_inputs_for_generation(
            token, self.cache, self.seq_lens, position.astype("int32"), token, position, self.generation_mask,
            cache=0)
        return self._logits(inputs)

    def release(self) -> None:
        """Drop the KV cache (the weight copy stays for the next rollout)."""
        self.cache = None
