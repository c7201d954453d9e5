"""A lean decode path for rollout over the live weights of a paddlenlp decoder-only causal LM.

Why: paddlenlp's forward spends most of a decode step outside arithmetic (on this CPU build its
attention multiplies by a transposed key view, a slow batched-matmul path, and the KV cache grows
by concatenation every step).  ``InferenceModel`` runs the same computation with

* a KV cache preallocated once per rollout in ``[layers, B, kv_heads, T_max, head_dim]`` layout,
  written in place; unwritten slots are masked, so the cache is never sliced or concatenated;
* attention as ``matmul(q, K, transpose_y=True)`` on that layout (the fast path);
* the model's own parameters and rotary tables, read at every call: there is no copy to refresh,
  so a rollout always sees the training model's current weights;
* for the prompt prefill and scoring, fewer operators on dense tensors: the residual add and
  RMSNorm as one fused kernel, rotary as ``x * cos + roll(x) * signed_sin`` with the attention
  scale folded into the queries' factors, SwiGLU in one kernel, and paddle's dense view kernels
  (``ppo.models.fast_paths.dense_kernels``).

Prompts of unequal lengths are prefilled in groups of similar length (``length_groups``), each cut
to its own longest prompt, so the prefill computes little padding.  With the toolkit's CPU kernels
a decode step's layers run as one call into them (``ppo.models.decode_kernels.decode_layers``: the
products through paddle's own MKL GEMM called from the C, no Python in between), planned once per
rollout for models with separate projections and no biases or LoRA adapters, without tensor
parallel; anything else decodes per operator.  The measurements behind both, and a fused step that
was measured and not adopted, are in ``docs/performance.md``.

It implements the decoder protocol (``ppo.rollout.decoding.RolloutDecoder``), so sampling, EOS handling
and masks are shared with the reference path.  It is family-agnostic: it reads the model through its
family's ``DecoderLayout`` (``ppo.models.families``): separate or fused projections, optional
projection biases, tied or untied LM head, LoRA adapters.  Logits agree with the paddlenlp forward
to float rounding (tested, 1e-5).

``static_decode``: the decode step as one static graph (``paddle.jit.to_static``), compiled once
per shape (batch x cache length: one per rollout bucket).  The parameters enter the program by
reference, so it also runs the current weights.  On this CPU build it measured no faster than the
eager step (``benchmarks/rollout_speed.py``): the step's time is in its kernels, not in launching
them; it is off by default and meant for accelerators, where launches cost more.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F

from ppo.distributed import parallel, vocab
from ppo.core.algorithms import gather_log_probs
from ppo.core.batching import length_groups
from ppo.rollout.decoding import RolloutDecoder
from ppo.models import cpu_gemm, cpu_kernels, decode_kernels
from ppo.models.families import DecoderLayout, LayerWeights, Projection, family_of_model
from ppo.models.fast_paths import dense_kernels
from ppo.rollout.layer_ops import (add_rms_norm, linear, matmul, rms_norm, rotary, rotary_sign, rotation_matrix,
                                   write_prefill)
from ppo.models.score_model import last_token_index, position_ids_from_mask


class InferenceModel(RolloutDecoder):
    """KV-cache decoding for a causal LM of any registered family, sharing the model's parameters;
    also no-grad scoring (log-probs, score-model scores) of full sequences on the same fast layout."""

    # a prefill group's fixed cost in prompt tokens (``length_groups``): its ~100 operators and
    # smaller products, measured on the 33.5M model (benchmarks/rollout_speed.py)
    PREFILL_GROUP_OVERHEAD = 32

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
        self._plan = None  # the decode step's kernel plan, per rollout (``_decode_plan``)

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
        return cpu_gemm.matmul(hidden, head, transpose_w=self.lm_head_transposed)

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
        # LoRA: this rank's rows of A, B whole, so the sum of x_k W_k + s x_k A_k B is x W + s x A B
        y = self._reduce(matmul(x, projection))
        return y if projection.bias is None else y + projection.bias

    def _qkv(self, h, weights: LayerWeights):
        if weights.qkv is None:
            return linear(h, weights.q), linear(h, weights.k), linear(h, weights.v)
        # paddlenlp's fused layout: per kv head, its group of query heads, then its key and value
        mixed = linear(h, weights.qkv).reshape([-1, self.n_kv, (self.n_heads // self.n_kv + 2) * self.head_dim])
        q, k, v = paddle.split(mixed, [self.n_heads // self.n_kv * self.head_dim, self.head_dim, self.head_dim],
                               axis=-1)
        return q.reshape([-1, self.n_heads * self.head_dim]), k.reshape([-1, self.n_kv * self.head_dim]), \
            v.reshape([-1, self.n_kv * self.head_dim])

    def _head_norms(self, q, k, weights: LayerWeights):
        """q, k [..., heads, D] with each head RMS-normalised (Qwen3's q_norm / k_norm), or as they are."""
        if weights.q_norm is None:
            return q, k
        return rms_norm(q, weights.q_norm, self.eps), rms_norm(k, weights.k_norm, self.eps)

    def _mlp(self, h, weights: LayerWeights):
        if weights.gate_up is None:
            gate, up = linear(h, weights.gate), linear(h, weights.up)
            # silu(gate) * up, one op (the toolkit's CPU kernel where it runs)
            act = cpu_kernels.swiglu_forward(gate, up) if cpu_kernels.ready(gate, up) else F.swiglu(gate, up)
        else:
            act = F.swiglu(linear(h, weights.gate_up))  # [gate | up]
        return self._row_parallel(act, weights.down)

    def _forward(self, ids, positions, key_bias, rows=None, slot: int = 0):
        """Prefill ``ids`` [B, S] into the rollout cache's slots slot .. slot+S-1 of rows ``rows`` (its
        rows in order when None); returns the last position's logits [B, V].

        positions [B, S] are RoPE positions (real tokens counted); key_bias [B, 1, S, S] is 0 where
        a query may attend and the dtype's minimum elsewhere.
        """
        B, S = ids.shape
        layout = self.layout()
        # dense kernels: the cache writes index the whole tensors, not views; inputs that are views
        # (a bucket's columns of the prompts) are made dense first, as those kernels need
        ids, positions = ids.contiguous(), positions.contiguous()
        with dense_kernels():
            x = self._hidden(ids, positions, key_bias, layout, self.cache, rows, slot)
        return self._full_logits(x.reshape([B, S, -1])[:, -1], layout.lm_head)

    def _prefill_in_groups(self, input_ids, attention_mask, position_ids, lengths, groups):
        """Prefill the rows ``groups`` (index arrays, ``length_groups`` of the prompts' ``lengths``
        [B]) one group at a time, each cut to its own longest prompt, into the rollout's cache at
        the prompts' columns; returns the logits [B, V] for the first new token.  A row's keys, values and logits are those of the
        whole-batch prefill within float rounding (left padding is masked either way; a row without
        any real token has no meaningful logits in either): only the padding goes."""
        B, P = input_ids.shape
        logits, order = [], []
        for rows in groups:
            S = max(1, int(lengths[rows].max()))
            index = paddle.to_tensor(rows, dtype="int64")
            ids, mask, positions = (paddle.index_select(t, index)[:, P - S:] for t in
                                    (input_ids, attention_mask, position_ids))
            logits.append(self._forward(ids, positions, self._bias(mask.astype("int64"), S, 0), rows, P - S))
            order.extend(int(r) for r in rows)
        inverse = paddle.to_tensor(np.argsort(np.asarray(order)), dtype="int64")
        return paddle.index_select(paddle.concat(logits, axis=0), inverse)

    def _hidden(self, ids, positions, key_bias, layout: DecoderLayout, cache=None, rows=None, slot: int = 0):
        """Hidden states [B*S, hidden] after the final norm; the sequence attends to itself.  With a
        ``cache`` (prefill) its keys and values are also written to cache slots slot .. slot+S-1 of
        the cache rows ``rows`` (all, in order, when None)."""
        B, S = ids.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        # activations stay 2-D [B*S, hidden]: paddle's CPU matmul is 2-3x faster on 2-D inputs
        h = self._embed(ids.reshape([-1]), layout.embed_tokens)
        scale = 1.0 / math.sqrt(D)
        kernels = cpu_kernels.ready(h, layout.cos)  # the toolkit's CPU kernels: rotary, softmax
        if kernels:  # tables [B, S, D], the queries' with the attention scale folded in
            cos, sin = layout.cos[positions], layout.sin[positions]
            cos_q, sin_q = cos * scale, sin * scale
            key_bias = key_bias.contiguous()
        else:
            sign = rotary_sign(D, layout.cos.dtype)
            cos = layout.cos[positions].unsqueeze(1)  # [B, 1, S, D]
            sin = (layout.sin * sign)[positions].unsqueeze(1)
            # broadcast factors expanded once for all layers (paddle's CPU kernels broadcast slowly),
            # the queries' with the attention scale folded in; the mask for a prompt prefill too (a
            # long scored sequence keeps it [B, 1, S, T])
            cos_q, sin_q = (t.expand([B, H, S, D]) * scale for t in (cos, sin))
            cos_k, sin_k = (t.expand([B, KV, S, D]) for t in (cos, sin))
            if cache is not None:
                key_bias = key_bias.expand([B, H, S, S])
        layers = layout.layers
        x = rms_norm(h, layers[0].input_norm, self.eps)
        for i, weights in enumerate(layers):
            q, k, v = self._qkv(x, weights)
            q, k = self._head_norms(q.reshape([B, S, H, D]), k.reshape([B, S, KV, D]), weights)
            if kernels:  # [B, S, heads, D] -> rotated [B, heads, S, D] in one pass
                q, k = decode_kernels.rotary_heads_first(q, cos_q, sin_q), decode_kernels.rotary_heads_first(k, cos, sin)
            else:
                q = rotary(q.transpose([0, 2, 1, 3]), cos_q, sin_q)
                k = rotary(k.transpose([0, 2, 1, 3]), cos_k, sin_k)
            v = v.reshape([B, S, KV, D]).transpose([0, 2, 1, 3])
            if cache is not None:
                write_prefill(cache[0], i, k, rows, slot)
                write_prefill(cache[1], i, v, rows, slot)
            keys, values = k, v
            if KV != H:
                keys = paddle.repeat_interleave(keys, H // KV, axis=1)
                values = paddle.repeat_interleave(values, H // KV, axis=1)
            scores = cpu_kernels.attention_matmul(q, keys, transpose_b=True)  # (paddle.matmul where not taken)
            if kernels and cpu_kernels.softmax_bias_ready(scores, key_bias):
                probs = cpu_kernels.softmax_bias(scores, key_bias)
            else:
                probs = F.softmax((scores + key_bias).astype("float32"), axis=-1).astype(q.dtype)
            out = cpu_kernels.attention_matmul(probs, values, heads_last=True).reshape([B * S, -1])
            x, h = add_rms_norm(self._row_parallel(out, weights.o), h, weights.post_attention_norm, self.eps)
            following = layers[i + 1].input_norm if i + 1 < len(layers) else layout.norm
            x, h = add_rms_norm(self._mlp(x, weights), h, following, self.eps)
        return x

    # -- scoring: every position of full sequences, no cache ------------------------------------

    @paddle.no_grad()
    def final_hidden(self, sequences, attention_mask):
        """The backbone's last hidden states [B, L, hidden] (after the final norm), as the family's
        paddlenlp backbone returns them, for right- or left-padded ``sequences`` [B, L]."""
        B, L = sequences.shape
        sequences, attention_mask = sequences.contiguous(), attention_mask.contiguous()  # (dense kernels' inputs)
        with dense_kernels():
            x = self._hidden(sequences, position_ids_from_mask(attention_mask),
                             self._bias(attention_mask.astype("int64"), L, 0), self.layout())
        return x.reshape([B, L, -1])

    @paddle.no_grad()
    def log_probs(self, sequences, attention_mask, temperature: float = 1.0):
        """Log-probs [B, L-1] of tokens 1..L-1 (``ppo.rollout.collect.forward_log_probs`` without grad)."""
        B, L = sequences.shape
        hidden = self.final_hidden(sequences, attention_mask)[:, :-1].reshape([B * (L - 1), -1])
        head = self.layout().lm_head
        logits = self._logits(hidden, head)
        if self._vocab_split(head):  # no rank gathers the [B, L, V] logits
            return vocab.vocab_parallel_log_probs(logits.reshape([B, L - 1, -1]), sequences[:, 1:], temperature)[0]
        return gather_log_probs(logits, sequences[:, 1:].reshape([-1]), temperature,
                                cpu_kernels.token_log_probs).reshape([B, L - 1])

    @paddle.no_grad()
    def scores(self, sequences, attention_mask):
        """A score model's per-token scores [B, L, score_dim] and end scores [B, score_dim]."""
        hidden = self.final_hidden(sequences, attention_mask)
        head = self.model.score_head
        scores = head(hidden.astype(head.weight.dtype))
        index = last_token_index(attention_mask)
        end = paddle.take_along_axis(scores, index.reshape([-1, 1, 1]).expand([-1, 1, scores.shape[-1]]), axis=1)
        return scores, end.squeeze(1)

    def _decode_step(self, token, cos, sin, cache_bias):
        """``_decode`` eagerly, or as its compiled static graph (``static_decode``)."""
        if not self.static_decode or self.mp > 1:  # (tensor parallel decodes eagerly: collectives)
            return self._decode(token, cos, sin, cache_bias, self.cache)
        if self._static_step is None:
            if not paddle.is_compiled_with_cuda():
                # the static executor's thread pool only adds hand-offs to a CPU step
                paddle.set_flags({"FLAGS_new_executor_serial_run": True})

            def step(token, cos, sin, cache_bias, keys, values):
                return self._decode(token, cos, sin, cache_bias, (keys, values))

            self._static_step = paddle.jit.to_static(step, full_graph=True)
        return self._static_step(token, cos, sin, cache_bias, self.cache[0], self.cache[1])

    def _decode(self, token, cos, sin, cache_bias, cache):
        """One new token per row against the cache; returns (logits [B, V], new keys, new values).

        The cache holds only earlier tokens: the new token's own key and value enter the softmax as
        one extra column, and are written to the cache after the step (two writes per step instead
        of two per layer).  New keys and values come stacked: [layers, B, kv_heads, 1, head_dim].
        """
        layout = self.layout()
        B = token.shape[0]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        h = self._embed(token, layout.embed_tokens)                        # [B, hidden]
        scale = 1.0 / math.sqrt(D)
        kernels = cpu_kernels.ready(h, cos)  # the toolkit's CPU kernels: rotary in one pass
        if kernels:  # tables [B, 1, D], the queries' with the attention scale folded in
            cos_k, sin_k = cos.reshape([B, 1, D]), sin.reshape([B, 1, D])
            cos_q, sin_q = cos_k * scale, sin_k * scale
        else:
            (cos_q, sin_q), (cos_k, sin_k) = self._per_head(cos, sin)
            cache_bias = cache_bias.expand([B, H, 1, cache_bias.shape[-1]])
        layers = layout.layers
        x = rms_norm(h, layers[0].input_norm, self.eps)
        plan = self._decode_plan(layout) if kernels else None
        if plan is not None:  # every layer in one call of the toolkit's kernels: x and h updated in place
            tables = (t.reshape([B, D]) for t in (cos_q, sin_q, cos_k, sin_k))
            new_keys, new_values = decode_kernels.decode_layers(plan, x, h, *tables, cache[0], cache[1], cache_bias)
            return self._full_logits(x, layout.lm_head), new_keys, new_values
        new_keys, new_values = [], []
        for i, weights in enumerate(layers):
            q, k, v = self._qkv(x, weights)
            q, k = self._head_norms(q.reshape([B, H, 1, D]), k.reshape([B, KV, 1, D]), weights)
            v = v.reshape([B, KV, 1, D])
            if kernels:
                q, k = decode_kernels.rotary_forward(q, cos_q, sin_q, 2), decode_kernels.rotary_forward(k, cos_k, sin_k, 2)
            else:  # rotary with rotate_half as one matmul by a signed permutation (instead of 4 ops)
                q = (q * cos_q + paddle.matmul(q, self.rotation) * sin_q) * scale
                k = k * cos_k + paddle.matmul(k, self.rotation) * sin_k
            new_keys.append(k)
            new_values.append(v)
            if kernels:  # the whole attention in one pass, the cache read in place
                out = decode_kernels.decode_attention(q, k, v, cache[0], cache[1], i, cache_bias)
            else:
                out = self._cache_attention(q, k, v, cache[0][i], cache[1][i], cache_bias)
            # the residual adds with the norms after them (one op each where fused)
            x, h = add_rms_norm(self._row_parallel(out.reshape([B, H * D]), weights.o), h,
                                 weights.post_attention_norm, self.eps)
            following = layers[i + 1].input_norm if i + 1 < len(layers) else layout.norm
            x, h = add_rms_norm(self._mlp(x, weights), h, following, self.eps)
        return self._full_logits(x, layout.lm_head), paddle.stack(new_keys), paddle.stack(new_values)

    def _decode_plan(self, layout: DecoderLayout):
        """The decode step's layers as one kernel call (``decode_kernels.decode_layers``), planned at a
        rollout's first step; None where a layer needs the per-operator path (tensor parallel, fused
        projections, biases, LoRA adapters, other dtypes)."""
        if self._plan is None:
            self._plan = False
            layers, tensors = layout.layers, []
            for i, w in enumerate(layers):
                projections = (w.q, w.k, w.v, w.o, w.gate, w.up, w.down)
                if self.mp > 1 or any(p is None or p.bias is not None or p.lora_a is not None for p in projections):
                    return None
                following = layers[i + 1].input_norm if i + 1 < len(layers) else layout.norm
                tensors.append([p.weight for p in projections] + [w.post_attention_norm, following, w.q_norm, w.k_norm])
            try:
                self._plan = decode_kernels.DecodePlan(tensors, self.n_heads, self.n_kv, self.head_dim, self.eps)
            except ValueError:  # (weights the kernels do not take: the per-operator path)
                return None
        return self._plan or None

    def _cache_attention(self, q, k, v, keys, values, cache_bias):
        """q [B, H, 1, D] against one layer's cache ``keys`` / ``values`` [B, KV, T, D] (``cache_bias``
        [B, H, 1, T]) and its own new k, v [B, KV, 1, D] as one extra column; returns [B, H, 1, D]."""
        B, H, _, D = q.shape
        if self.n_kv != H:
            keys, values = (paddle.repeat_interleave(t, H // self.n_kv, axis=1) for t in (keys, values))
            k, v = (paddle.repeat_interleave(t, H // self.n_kv, axis=1) for t in (k, v))
        scores = paddle.concat([paddle.matmul(q, keys, transpose_y=True) + cache_bias,
                                (q * k).sum(-1, keepdim=True)], axis=-1)
        probs = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
        return paddle.matmul(probs[..., :-1], values) + probs[..., -1:].expand([B, H, 1, D]) * v

    def _per_head(self, cos, sin):
        """RoPE factors [B, 1, S, D] expanded to the query and the key heads, once for all layers:
        paddle's CPU kernels broadcast slowly (8x for [B, 1, 1, D] against [B, H, 1, D])."""
        B, _, S, D = cos.shape
        query = (cos.expand([B, self.n_heads, S, D]), sin.expand([B, self.n_heads, S, D]))
        if self.n_kv == self.n_heads:
            return query, query
        return query, (cos.expand([B, self.n_kv, S, D]), sin.expand([B, self.n_kv, S, D]))

    def _bias(self, key_mask, S: int, start: int):
        """[B, 1, S, T_max] additive mask: padding, unwritten cache slots and the causal order."""
        T = key_mask.shape[1]
        minimum = paddle.finfo(paddle.float32).min
        slots = paddle.arange(T).unsqueeze(0)
        query = paddle.arange(start, start + S).unsqueeze(1)
        allowed = (slots <= query).unsqueeze(0) & key_mask.astype("bool").unsqueeze(1)  # [B, S, T]
        return paddle.where(allowed, paddle.zeros([1], "float32"), paddle.full([1], minimum, "float32")).unsqueeze(1)

    # -- the decoder protocol (ppo.rollout.decoding.RolloutDecoder) -------------------------------------

    def start(self, input_ids, attention_mask, position_ids, max_new_tokens: int):
        """Prefill a left-padded prompt batch; returns the logits [B, V] for the first new token."""
        B, P = input_ids.shape
        T = P + max_new_tokens
        layout = self.layout()
        dtype = layout.embed_tokens.dtype
        L = len(layout.layers)
        # one tensor per K and V for all layers: a decode step writes each with a single assignment
        self._plan = None  # (planned again at the first step: the weights may have changed since the last rollout)
        self.cache = (paddle.zeros([L, B, self.n_kv, T, self.head_dim], dtype),
                      paddle.zeros([L, B, self.n_kv, T, self.head_dim], dtype))
        self.key_mask = paddle.concat([attention_mask.astype("int64"), paddle.zeros([B, max_new_tokens], "int64")], 1)
        self.length = P
        self.cos_table = layout.cos  # [max_positions, D]
        self.rotation = rotation_matrix(self.head_dim, self.cos_table.dtype)
        self.sin_table = layout.sin
        # prompts of unequal lengths: prefilled in groups of similar length, not padded to the longest,
        # where the prompts are left padded (a group keeps its last columns) and the kernels write the
        # cache in place (a group's rows are written one at a time; paddle's assignment copies the
        # whole cache per write on CPU)
        mask = attention_mask.numpy() != 0
        lengths = mask.sum(axis=1)
        left_padded = bool((np.cumprod(mask[:, ::-1], axis=1).sum(axis=1) == lengths).all())
        in_place = cpu_kernels.ready(self.cache[0]) and self.cache[0].is_contiguous()
        groups = length_groups(lengths, self.PREFILL_GROUP_OVERHEAD) if left_padded and in_place else [None]
        if len(groups) > 1:
            return self._prefill_in_groups(input_ids, attention_mask, position_ids, lengths, groups)
        return self._forward(input_ids, position_ids, self._bias(attention_mask.astype("int64"), P, 0))

    def step(self, token, token_mask, position_ids):
        """Append one token per row (token_mask 0 for rows that already finished); next logits [B, V]."""
        minimum = paddle.finfo(paddle.float32).min
        # the cache's earlier slots: real tokens only (unwritten slots have key_mask 0)
        cache_bias = ((1 - self.key_mask).astype("float32") * minimum).reshape([token.shape[0], 1, 1, -1])
        pos = position_ids.reshape([-1])
        cos = self.cos_table[pos].reshape([-1, 1, 1, self.head_dim])
        sin = self.sin_table[pos].reshape([-1, 1, 1, self.head_dim])
        logits, keys, values = self._decode_step(token, cos, sin, cache_bias)
        # a finished row's token is padding: written but masked from later steps
        for cache, new in zip(self.cache, (keys, values)):
            if not decode_kernels.write_cache(cache, new, self.length):  # (a copy in place, where it runs)
                cache[:, :, :, self.length] = new.squeeze(3)
        self.key_mask[:, self.length] = token_mask.astype("int64")
        self.length += 1
        return logits

    def release(self) -> None:
        """Drop the KV cache (memory back before the training phases)."""
        self.cache = None
        self._plan = None
