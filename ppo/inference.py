"""A lean decode path for rollout over the live weights of a paddlenlp decoder-only causal LM.

Why: paddlenlp's forward spends most of a decode step outside arithmetic (on this CPU build its
attention multiplies by a transposed key view, a slow batched-matmul path, and the KV cache grows
by concatenation every step).  ``InferenceModel`` runs the same computation with

* a KV cache preallocated once per rollout, one ``[B, kv_heads, T_max, head_dim]`` tensor per layer
  for keys and for values, written in place; unwritten slots are masked, so the cache is never
  sliced or concatenated;
* attention as ``matmul(q, K, transpose_y=True)`` on that layout (the fast path);
* the model's own parameters and rotary tables, read at every call, so a rollout always sees the
  training model's current weights.  The decode step multiplies by larger matrices made from them
  once per rollout, in ``start``: q, k and v side by side (one GEMM), gate and up side by side
  (one GEMM); they cannot go stale within a rollout;
* fewer, fused operators per decode step (``benchmarks/rollout_speed.py``): the residual add and
  RMSNorm as one fused kernel, one rotary multiply-add for queries, keys and values together (the
  attention scale folded into the queries' factors), and the new keys and values written into the
  cache before attention (no separate column for the current token).

It implements the decoder protocol (``ppo.decoding.RolloutDecoder``), so sampling, EOS handling
and masks are shared with the reference path.  It is family-agnostic: it reads the model through its
family's ``DecoderLayout`` (``ppo.models.families``): separate or fused projections, optional
projection biases, tied or untied LM head, LoRA adapters.  Logits agree with the paddlenlp forward
to float rounding (tested, 1e-5).

``static_decode``: the decode step as one static graph (``paddle.jit.to_static``), compiled once
per shape (batch x cache length: one per rollout bucket).  The step's weights, cache and slot are
program inputs, so it runs the current weights.  On this CPU build it measured no faster than the
eager step: the step's time is in its kernels, not in launching them; it is off by default and
meant for accelerators, where launches cost more.
"""

from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F

from ppo import parallel
from ppo.algorithms import gather_log_probs
from ppo.decoding import RolloutDecoder
from ppo.models.families import DecoderLayout, LayerWeights, Projection, family_of_model
from ppo.models.fast_paths import FUSED_RMS_NORM, dense_kernels
from ppo.models.score_model import last_token_index, position_ids_from_mask


def _rms_norm(x, weight, eps):
    if FUSED_RMS_NORM is not None and x.dtype == weight.dtype:
        # paddle's fused kernel (CPU too): 8x faster than the composed ops at decode size
        return FUSED_RMS_NORM(x, weight, None, eps, x.ndim - 1)[0]
    # every op counts in a decode step: no dtype casts when everything is float32 already
    x32 = x if x.dtype == paddle.float32 else x.astype("float32")
    variance = (x32 * x32).mean(-1, keepdim=True)  # x * x: paddle's pow kernel is ~50x slower on CPU
    normed = paddle.rsqrt(variance + eps) * x
    return (normed if normed.dtype == weight.dtype else normed.astype(weight.dtype)) * weight


def _add_rms_norm(x, residual, weight, eps):
    """(RMSNorm of ``x + residual``, ``x + residual``): the residual stream's add and the next norm,
    one fused kernel where the build has it."""
    if FUSED_RMS_NORM is not None and x.dtype == weight.dtype == residual.dtype:
        normed, summed = FUSED_RMS_NORM(x, weight, None, eps, x.ndim - 1, residual=residual)[:2]
        return normed, summed
    summed = x + residual
    return _rms_norm(summed, weight, eps), summed


def _rotary_sign(D: int, dtype):
    """[D]: -1 on the first half, 1 on the second: ``rotate_half(x) == roll(x, D/2) * sign``, so a
    rotary ``x * cos + rotate_half(x) * sin`` is ``x * cos + roll(x, D/2) * (sin * sign)``."""
    return paddle.concat([paddle.full([D // 2], -1.0, dtype), paddle.full([D - D // 2], 1.0, dtype)])


def _rotary(x, cos, signed_sin):
    """RoPE of x [..., D] with factors broadcast to it (``signed_sin``: sin times ``_rotary_sign``)."""
    return x * cos + paddle.roll(x, x.shape[-1] // 2, axis=-1) * signed_sin


def _matmul(x, projection: Projection):
    """x [N, in] @ weight [in, out] (+ the LoRA term x @ A [in, r] @ B [r, out] * scale, applied on
    the fly: always the current adapters) -> [N, out]."""
    y = paddle.matmul(x, projection.weight)
    if projection.lora_a is not None:
        y = y + paddle.matmul(paddle.matmul(x, projection.lora_a), projection.lora_b) * projection.lora_scale
    return y


def _linear(x, projection: Projection):
    """x [N, in] @ weight [in, out] (+ bias [out]) -> [N, out]."""
    y = _matmul(x, projection)
    return y if projection.bias is None else y + projection.bias


# The decode step's weights are plain tuples (a static program takes nested tuples of tensors as
# inputs, not dataclasses): a projection is (weight [in, out], bias [out] | None, lora_a [in, r] |
# None, lora_b [r, out] | None) with the LoRA scale folded into lora_b; a layer is (input_norm, qkv,
# o, post_attention_norm, gate_up, down); the step's weights (embed_tokens, layers, norm, lm_head).


def _step_projection(projection: Projection) -> tuple:
    lora_b = None if projection.lora_a is None else projection.lora_b * projection.lora_scale
    return projection.weight, projection.bias, projection.lora_a, lora_b


def _side_by_side(parts: list[Projection]) -> tuple:
    """One step projection computing ``parts`` at once: weights (and biases) concatenated on the
    output axis; LoRA as x @ [A_1 | A_2 ..] @ blockdiag(B_1 s_1, B_2 s_2, ..) (zero blocks for
    parts without an adapter).  A copy: made once per rollout."""
    weight = paddle.concat([p.weight for p in parts], axis=1)
    widths = [p.weight.shape[1] for p in parts]
    bias = None
    if any(p.bias is not None for p in parts):
        bias = paddle.concat([p.bias if p.bias is not None else paddle.zeros([w], weight.dtype)
                              for p, w in zip(parts, widths)])
    adapted = [i for i, p in enumerate(parts) if p.lora_a is not None]
    if not adapted:
        return weight, bias, None, None
    lora_a = paddle.concat([parts[i].lora_a for i in adapted], axis=1)
    lora_b = paddle.zeros([lora_a.shape[1], sum(widths)], weight.dtype)
    row = 0
    for i in adapted:
        rank, col = parts[i].lora_a.shape[1], sum(widths[:i])
        lora_b[row:row + rank, col:col + widths[i]] = parts[i].lora_b * parts[i].lora_scale
        row += rank
    return weight, bias, lora_a, lora_b


def _columns(projection: Projection, index) -> tuple:
    """A step projection with the output columns ``index`` (int64 [out]) of ``projection``."""
    weight, bias, lora_a, lora_b = _step_projection(projection)
    pick = lambda t: None if t is None else paddle.index_select(t, index, axis=t.ndim - 1)  # noqa: E731
    return pick(weight), pick(bias), lora_a, pick(lora_b)


def _project(x, projection: tuple):
    """x [N, in] through a step projection (no bias: callers add it) -> [N, out]."""
    weight, _, lora_a, lora_b = projection
    y = paddle.matmul(x, weight)
    return y if lora_a is None else y + paddle.matmul(paddle.matmul(x, lora_a), lora_b)


class InferenceModel(RolloutDecoder):
    """KV-cache decoding for a causal LM of any registered family, sharing the model's parameters;
    also no-grad scoring (log-probs, score-model scores) of full sequences on the same fast layout."""

    @classmethod
    def of(cls, model) -> "InferenceModel":
        """The (cached) inference view of ``model``: it reads the live parameters, so one per model."""
        view = getattr(model, "_ppo_inference_view", None)
        if view is None:
            view = cls(model)
            model._ppo_inference_view = view
        return view

    def __init__(self, model, static_decode: bool = False):
        self.model = model
        self.static_decode = static_decode
        self._static_step = None
        config = model.config
        self.family = family_of_model(model)
        layout = self.family.layout(model)
        # tensor parallel: this rank's heads, MLP columns and vocabulary slice; the partial sums of
        # the row-parallel projections and of the vocabulary-split embedding are all-reduced here
        self.mp = max(1, int(getattr(config, "tensor_parallel_degree", 1) or 1))
        if self.mp > 1 and (layout.kv_indices is not None or getattr(config, "sequence_parallel", False)):
            raise ValueError("InferenceModel: key/value heads not divisible by tensor_parallel_degree and sequence "
                             "parallel are not supported")
        self.vocab_size = config.vocab_size
        self.n_heads = layout.num_heads
        self.n_kv = layout.num_kv_heads
        self.head_dim = layout.head_dim
        self.eps = layout.rms_norm_eps
        self.lm_head_transposed = layout.lm_head_transposed
        self.max_positions = config.max_position_embeddings
        self.cache = None
        self.step_weights = None

    # -- tensor parallel ---------------------------------------------------------------------

    def _reduce(self, x):
        """Sum of the row-parallel partial results over the tensor-parallel group (in place)."""
        return parallel.model_parallel_all_reduce(x) if self.mp > 1 else x

    def layout(self) -> DecoderLayout:
        """The model's weights, read afresh on every call (no copy: always the current parameters)."""
        return self.family.layout(self.model)

    def _embed(self, ids, weight):
        """Rows of the embedding table ``weight`` (this rank's vocabulary slice under tensor parallel)."""
        rows = weight.shape[0]
        if self.mp == 1 or rows == self.vocab_size:
            return F.embedding(ids, weight)
        local = ids - parallel.context().tp_rank * rows      # VocabParallelEmbedding's slice of the ids
        inside = ((local >= 0) & (local < rows)).astype(weight.dtype).unsqueeze(-1)
        return self._reduce(F.embedding(paddle.clip(local, 0, rows - 1), weight) * inside)

    def _vocab_split(self, head=None) -> bool:
        """Whether this rank holds a slice of the LM head's vocabulary (tensor parallel)."""
        head = self.layout().lm_head if head is None else head
        width = head.shape[0] if self.lm_head_transposed else head.shape[-1]
        return self.mp > 1 and width != self.vocab_size

    def _logits(self, hidden, head):
        """Logits of this rank's vocabulary slice (all of it without tensor parallel)."""
        return paddle.matmul(hidden, head, transpose_y=self.lm_head_transposed)

    def _full_logits(self, hidden, head):
        """Full-vocabulary logits [N, V] in float32 (gathered over tensor parallel to sample from)."""
        logits = self._logits(hidden, head)
        if self._vocab_split(head):
            logits = parallel.model_parallel_concat(logits, axis=-1)
        return logits.astype("float32")

    # -- the computation ---------------------------------------------------------------------

    def _row_parallel(self, x, projection: Projection):
        """A row-parallel projection (attention output, MLP down): the partial products summed over
        tensor parallel, then the bias (held whole by every rank: added once, after the sum)."""
        y = self._reduce(_matmul(x, projection))  # (LoRA runs unsplit: tensor parallel refuses it)
        return y if projection.bias is None else y + projection.bias

    def _qkv(self, h, weights: LayerWeights):
        if weights.qkv is None:
            return _linear(h, weights.q), _linear(h, weights.k), _linear(h, weights.v)
        # paddlenlp's fused layout: per kv head, its group of query heads, then its key and value
        mixed = _linear(h, weights.qkv).reshape([-1, self.n_kv, (self.n_heads // self.n_kv + 2) * self.head_dim])
        q, k, v = paddle.split(mixed, [self.n_heads // self.n_kv * self.head_dim, self.head_dim, self.head_dim],
                               axis=-1)
        return q.reshape([-1, self.n_heads * self.head_dim]), k.reshape([-1, self.n_kv * self.head_dim]), \
            v.reshape([-1, self.n_kv * self.head_dim])

    def _mlp(self, h, weights: LayerWeights):
        if weights.gate_up is None:
            act = F.swiglu(_linear(h, weights.gate), _linear(h, weights.up))  # silu(gate) * up, one op
        else:
            act = F.swiglu(_linear(h, weights.gate_up))  # [gate | up]
        return self._row_parallel(act, weights.down)

    def _forward(self, ids, positions, start: int, key_bias):
        """Run positions ``start .. start+S-1`` for ``ids`` [B, S]; returns last-position logits [B, V].

        positions [B, S] are RoPE positions (real tokens counted); key_bias [B, 1, S, T_max] is 0 where
        a query may attend and the dtype's minimum elsewhere.
        """
        B, S = ids.shape
        layout = self.layout()
        # dense kernels: the cache writes go to whole tensors, not through views; inputs that are
        # views (a bucket's columns of the prompts) are made dense first, as those kernels need
        ids, positions = ids.contiguous(), positions.contiguous()
        with dense_kernels():
            x = self._hidden(ids, positions, start, key_bias, layout, self.cache)
        return self._full_logits(x.reshape([B, S, -1])[:, -1], layout.lm_head)

    def _hidden(self, ids, positions, start: int, key_bias, layout: DecoderLayout, cache=None):
        """Hidden states [B*S, hidden] after the final norm.  With a ``cache`` (prefill) keys and
        values are written to it at ``start``; without one (scoring) the sequence attends to itself."""
        B, S = ids.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        # activations stay 2-D [B*S, hidden]: paddle's CPU matmul is 2-3x faster on 2-D inputs
        h = self._embed(ids.reshape([-1]), layout.embed_tokens)
        sign = _rotary_sign(D, layout.cos.dtype)
        cos = layout.cos[positions].unsqueeze(1)  # [B, 1, S, D]
        sin = (layout.sin * sign)[positions].unsqueeze(1)
        # broadcast factors expanded once for all layers (paddle's CPU kernels broadcast slowly),
        # the queries' with the attention scale folded in; the mask for a prompt prefill too (a
        # long scored sequence keeps it [B, 1, S, T])
        scale = 1.0 / math.sqrt(D)
        cos_q, sin_q = (t.expand([B, H, S, D]) * scale for t in (cos, sin))
        cos_k, sin_k = (t.expand([B, KV, S, D]) for t in (cos, sin))
        if cache is not None:
            key_bias = key_bias.expand([B, H, S, key_bias.shape[-1]])
        layers = layout.layers
        x = _rms_norm(h, layers[0].input_norm, self.eps)
        for i, weights in enumerate(layers):
            q, k, v = self._qkv(x, weights)
            q = _rotary(q.reshape([B, S, H, D]).transpose([0, 2, 1, 3]), cos_q, sin_q)
            k = _rotary(k.reshape([B, S, KV, D]).transpose([0, 2, 1, 3]), cos_k, sin_k)
            v = v.reshape([B, S, KV, D]).transpose([0, 2, 1, 3])
            if cache is not None:
                keys, values = cache[0][i], cache[1][i]
                keys[:, :, start:start + S] = k
                values[:, :, start:start + S] = v
            else:
                keys, values = k, v
            if KV != H:
                keys = paddle.repeat_interleave(keys, H // KV, axis=1)
                values = paddle.repeat_interleave(values, H // KV, axis=1)
            scores = paddle.matmul(q, keys, transpose_y=True) + key_bias
            probs = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
            out = paddle.matmul(probs, values).transpose([0, 2, 1, 3]).reshape([B * S, -1])
            x, h = _add_rms_norm(self._row_parallel(out, weights.o), h, weights.post_attention_norm, self.eps)
            following = layers[i + 1].input_norm if i + 1 < len(layers) else layout.norm
            x, h = _add_rms_norm(self._mlp(x, weights), h, following, self.eps)
        return x

    # -- scoring: every position of full sequences, no cache ------------------------------------

    @paddle.no_grad()
    def final_hidden(self, sequences, attention_mask):
        """The backbone's last hidden states [B, L, hidden] (after the final norm), as the family's
        paddlenlp backbone returns them, for right- or left-padded ``sequences`` [B, L]."""
        B, L = sequences.shape
        sequences, attention_mask = sequences.contiguous(), attention_mask.contiguous()  # (dense kernels' inputs)
        with dense_kernels():
            x = self._hidden(sequences, position_ids_from_mask(attention_mask), 0,
                             self._bias(attention_mask.astype("int64"), L, 0), self.layout())
        return x.reshape([B, L, -1])

    @paddle.no_grad()
    def log_probs(self, sequences, attention_mask, temperature: float = 1.0):
        """Log-probs [B, L-1] of tokens 1..L-1 (``ppo.rollout.forward_log_probs`` without grad)."""
        B, L = sequences.shape
        hidden = self.final_hidden(sequences, attention_mask)[:, :-1].reshape([B * (L - 1), -1])
        head = self.layout().lm_head
        logits = self._logits(hidden, head)
        if self._vocab_split(head):  # no rank gathers the [B, L, V] logits
            return parallel.vocab_parallel_log_probs(logits.reshape([B, L - 1, -1]), sequences[:, 1:], temperature)[0]
        return gather_log_probs(logits, sequences[:, 1:].reshape([-1]), temperature).reshape([B, L - 1])

    @paddle.no_grad()
    def scores(self, sequences, attention_mask):
        """A score model's per-token scores [B, L, score_dim] and end scores [B, score_dim]."""
        hidden = self.final_hidden(sequences, attention_mask)
        head = self.model.score_head
        scores = head(hidden.astype(head.weight.dtype))
        index = last_token_index(attention_mask)
        end = paddle.take_along_axis(scores, index.reshape([-1, 1, 1]).expand([-1, 1, scores.shape[-1]]), axis=1)
        return scores, end.squeeze(1)

    # -- decoding: one token per row and step -----------------------------------------------------

    def _step_weights(self, layout: DecoderLayout) -> tuple:
        """The decode step's weights (module comment above ``_step_projection``): q, k, v side by
        side in that order (a family's fused layout reordered to it), gate and up side by side."""
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        G = H // KV
        qkv_order = None
        layers = []
        for w in layout.layers:
            if w.qkv is None:
                qkv = _side_by_side([w.q, w.k, w.v])
            else:  # paddlenlp's fused layout, per kv head [its G query heads | key | value] -> [q | k | v]
                if qkv_order is None:
                    group = [[kv * (G + 2) * D + g * D + d for g in range(G) for d in range(D)] for kv in range(KV)]
                    q = [c for cols in group for c in cols]
                    k = [kv * (G + 2) * D + G * D + d for kv in range(KV) for d in range(D)]
                    qkv_order = paddle.to_tensor(q + k + [c + D for c in k], dtype="int64")
                qkv = _columns(w.qkv, qkv_order)
            gate_up = _side_by_side([w.gate, w.up]) if w.gate_up is None else _step_projection(w.gate_up)
            layers.append((w.input_norm, qkv, _step_projection(w.o), w.post_attention_norm, gate_up,
                           _step_projection(w.down)))
        return layout.embed_tokens, layers, layout.norm, layout.lm_head

    def _row_parallel_step(self, x, projection: tuple):
        y = self._reduce(_project(x, projection))
        return y if projection[1] is None else y + projection[1]

    def _decode(self, token, cos, sin, bias, slot, keys, values, weights):
        """One new token per row (token [B]) at cache slot ``slot`` (int64 0-D); its keys and values
        are written into the per-layer caches ``keys`` / ``values`` ([B, KV, T, D] each) first.

        cos / sin [B, H + 2 KV, D]: rotary factors for the fused q | k | v rows (queries' scaled by
        1/sqrt(D), sin signed for ``_rotary``, values' 1 and 0); bias [B, KV, H / KV, T]: 0 where a
        row may attend.  Returns the logits [B, V] (float32).
        """
        embed, layers, norm, head = weights
        B = token.shape[0]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        h = self._embed(token, embed)                                               # [B, hidden]
        x = _rms_norm(h, layers[0][0], self.eps)
        for i, (_, qkv, o, post_norm, gate_up, down) in enumerate(layers):
            mixed = _project(x, qkv)
            if qkv[1] is not None:
                mixed = mixed + qkv[1]
            q, k, v = paddle.split(_rotary(mixed.reshape([B, H + 2 * KV, D]), cos, sin), [H, KV, KV], axis=1)
            keys[i][:, :, slot] = k
            values[i][:, :, slot] = v
            # grouped heads without copies: query head j uses key head j // (H / KV)
            scores = paddle.matmul(q.reshape([B, KV, H // KV, D]), keys[i], transpose_y=True) + bias
            probs = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
            out = paddle.matmul(probs, values[i]).reshape([B, H * D])
            x, h = _add_rms_norm(self._row_parallel_step(out, o), h, post_norm, self.eps)
            act = _project(x, gate_up)
            gate, up = paddle.chunk(act if gate_up[1] is None else act + gate_up[1], 2, axis=-1)
            act = F.silu(gate) * up  # (at 16 rows paddle's fused swiglu kernel is 2x slower than these two)
            following = layers[i + 1][0] if i + 1 < len(layers) else norm
            x, h = _add_rms_norm(self._row_parallel_step(act, down), h, following, self.eps)
        return self._full_logits(x, head)

    def _decode_step(self, token, cos, sin, bias, slot):
        """``_decode`` eagerly, or as its compiled static graph (``static_decode``)."""
        args = (token, cos, sin, bias, slot, self.cache[0], self.cache[1], self.step_weights)
        if not self.static_decode or self.mp > 1:  # (tensor parallel decodes eagerly: collectives)
            return self._decode(*args)
        if self._static_step is None:
            if not paddle.is_compiled_with_cuda():
                # the static executor's thread pool only adds hand-offs to a CPU step
                paddle.set_flags({"FLAGS_new_executor_serial_run": True})

            def step(token, cos, sin, bias, slot, keys, values, weights):
                return self._decode(token, cos, sin, bias, slot, keys, values, weights)

            # (to_static converts functions and Layer methods, not a plain class's methods)
            self._static_step = paddle.jit.to_static(step, full_graph=True)
        return self._static_step(*args)

    def _bias(self, key_mask, S: int, start: int):
        """[B, 1, S, T_max] additive mask: padding, unwritten cache slots and the causal order."""
        T = key_mask.shape[1]
        minimum = paddle.finfo(paddle.float32).min
        slots = paddle.arange(T).unsqueeze(0)
        query = paddle.arange(start, start + S).unsqueeze(1)
        allowed = (slots <= query).unsqueeze(0) & key_mask.astype("bool").unsqueeze(1)  # [B, S, T]
        return paddle.where(allowed, paddle.zeros([1], "float32"), paddle.full([1], minimum, "float32")).unsqueeze(1)

    # -- the decoder protocol (ppo.decoding.RolloutDecoder) -------------------------------------

    def start(self, input_ids, attention_mask, position_ids, max_new_tokens: int):
        """Prefill a left-padded prompt batch; returns the logits [B, V] for the first new token.
        The decode step's fused weights are made here, from the current parameters."""
        B, P = input_ids.shape
        T = P + max_new_tokens
        layout = self.layout()
        dtype = layout.embed_tokens.dtype
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        # one tensor per layer for K and for V: a decode step writes each in place, no views
        self.cache = tuple([paddle.zeros([B, KV, T, D], dtype) for _ in layout.layers] for _ in range(2))
        self.key_mask = paddle.concat([attention_mask.astype("int64"), paddle.zeros([B, max_new_tokens], "int64")], 1)
        self.length = P
        self.step_weights = self._step_weights(layout)
        # the rotary factors of the fused q | k | v rows: a query row scales cos and sin by
        # 1/sqrt(D), a key row keeps them, a value row gets cos 1 and sin 0 (it passes unchanged)
        scale = 1.0 / math.sqrt(D)
        rows = [scale] * H + [1.0] * KV + [0.0] * KV
        self.row_scale = paddle.to_tensor(rows, dtype=dtype).reshape([1, -1, 1])
        self.row_shift = paddle.to_tensor([0.0] * (H + KV) + [1.0] * KV, dtype=dtype).reshape([1, -1, 1])
        self.cos_table = layout.cos  # [max_positions, D]
        self.signed_sin_table = layout.sin * _rotary_sign(D, layout.sin.dtype)
        return self._forward(input_ids, position_ids, 0, self._bias(self.key_mask, P, 0))

    def step(self, token, token_mask, position_ids):
        """Append one token per row (token_mask 0 for rows that already finished); next logits [B, V]."""
        B = token.shape[0]
        # a finished row's token is padding: written, but masked from every query (its own too)
        self.key_mask[:, self.length] = token_mask.astype("int64")
        minimum = paddle.finfo(paddle.float32).min
        bias = ((1 - self.key_mask).astype("float32") * minimum).reshape([B, 1, 1, -1])
        bias = bias.expand([B, self.n_kv, self.n_heads // self.n_kv, bias.shape[-1]])
        pos = position_ids.reshape([-1])
        cos = self.cos_table[pos].unsqueeze(1) * self.row_scale + self.row_shift  # [B, H + 2 KV, D]
        sin = self.signed_sin_table[pos].unsqueeze(1) * self.row_scale
        slot = paddle.full([], self.length, "int64")
        logits = self._decode_step(token, cos, sin, bias, slot)
        self.length += 1
        return logits

    def release(self) -> None:
        """Drop the KV cache and the step's weights (memory back before the training phases)."""
        self.cache = None
        self.step_weights = None
