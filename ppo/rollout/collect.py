"""Rollout: generate responses with the actor, score them with every model -> ``Experience``.

Generation is an explicit KV-cache decode loop (not paddlenlp's ``generate``) so that sampling
follows exactly the processors of ``ppo.rollout.sampling`` (repetition penalty -> temperature ->
top-k -> top-p), the same temperature is applied when the trainer recomputes log-probs, and an EOS
the model generates is kept as the last action of its response even when pad == eos.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from ppo.distributed import parallel, transfer, vocab
from ppo.core.algorithms import entropy_from_logits, gather_log_probs, log_probs_and_entropy
from ppo.rollout.decoding import RolloutDecoder, current_weights
from ppo.data.tokenizer_utils import decode_without_special, encode_scored_text
from ppo.core.batching import length_groups
from ppo.core.experience import Experience, real_spans, shift_left
from ppo.rollout.inference import InferenceModel
from ppo.rollout.sampling import GenerationConfig, next_token
from ppo.models import cpu_gemm, cpu_kernels, position_ids_from_mask
from ppo.distributed.parallel import unwrap


# ---------------------------------------------------------------------------------------------
# Generation


class PaddleNLPDecoder(RolloutDecoder):
    """The reference decoder: the paddlenlp model's own forward with its ``past_key_values``."""

    def __init__(self, model):
        self.model = model
        self.vocab_size = model.config.vocab_size

    def start(self, input_ids, attention_mask, position_ids, max_new_tokens: int):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, return_dict=True)
        self.past, self.mask = out.past_key_values, attention_mask
        return out.logits[:, -1]

    def step(self, token, token_mask, position_ids):
        self.mask = paddle.concat([self.mask, token_mask.astype(self.mask.dtype).unsqueeze(1)], axis=1)
        out = self.model(input_ids=token.unsqueeze(1), attention_mask=self.mask, position_ids=position_ids,
                         past_key_values=self.past, use_cache=True, return_dict=True)
        self.past = out.past_key_values
        return out.logits[:, -1]

    def release(self) -> None:
        self.past = None


def decoder_model_parallel(decoder) -> int:
    """The tensor-parallel degree a decoder runs at (its ranks decode the same rows together)."""
    model = getattr(decoder, "model", decoder)
    return int(getattr(getattr(model, "config", None), "tensor_parallel_degree", 1) or 1)


def decoder_for(model) -> RolloutDecoder:
    """A decoder for ``model``: itself when it is one already, else its own forward's."""
    return model if isinstance(model, RolloutDecoder) else PaddleNLPDecoder(model)


@paddle.no_grad()
def generate(model, input_ids, attention_mask, config: GenerationConfig, eos_token_id: int, pad_token_id: int,
             return_log_probs: bool = False):
    """KV-cache decoding from left-padded prompts with ``model`` (a causal LM or a decoder).

    input_ids, attention_mask: [B, P] (left padded).  Returns (sequences [B, P + R], attention_mask
    [B, P + R]) with R <= max_new_tokens the longest response; a response ends with the EOS it
    generated (mask 1) and is right-padded after it (mask 0).  With ``return_log_probs`` also the
    response tokens' log-probs [B, R] (``sampled_log_probs``; 0 after a row finished).
    """
    # (the weights stay as they are over the decode steps: bf16 copies made once, cpu_gemm)
    with vocab.full_vocab_logits(None if isinstance(model, RolloutDecoder) else unwrap(model)), \
            cpu_gemm.frozen_weights():
        return _generate(decoder_for(model), input_ids, attention_mask, config, eos_token_id, pad_token_id,
                         return_log_probs)


def generate_in_buckets(model, input_ids, attention_mask, config: GenerationConfig, eos_token_id: int,
                        pad_token_id: int, return_log_probs: bool = False):
    """``generate`` over groups of at most ``config.micro_batch_size`` rows with similar prompt lengths.

    Rows are sorted by prompt length (stable), each group is cut to its own longest prompt (less
    padding, a shorter KV cache) and decoded alone; the results come back in the input order and in
    ``generate``'s layout: prompts left padded to the batch's prompt width, responses right padded
    to the longest response.  Greedy results equal ``generate``'s; sampling draws in another order.
    With ``return_log_probs`` also the response log-probs [B, R], as ``generate`` returns them.
    """
    # a decoder with its own weight copy (the fused GPU model) refreshes it once for all buckets
    with current_weights(model):
        return _generate_in_buckets(model, input_ids, attention_mask, config, eos_token_id, pad_token_id,
                                    return_log_probs)


def _generate_in_buckets(model, input_ids, attention_mask, config: GenerationConfig, eos_token_id: int,
                         pad_token_id: int, return_log_probs: bool):
    B, P = input_ids.shape
    size = config.micro_batch_size
    if size <= 0 or size >= B:
        return generate(model, input_ids, attention_mask, config, eos_token_id, pad_token_id, return_log_probs)
    lengths = attention_mask.astype("int64").sum(axis=1).numpy()
    order = np.argsort(-lengths, kind="stable")
    pieces = []
    for start in range(0, B, size):
        rows = order[start:start + size]
        index = paddle.to_tensor(rows, dtype="int64")
        cut = P - int(lengths[rows].max())  # padding every row of the group has
        ids = paddle.index_select(input_ids, index)[:, cut:]
        mask = paddle.index_select(attention_mask, index)[:, cut:]
        seq, seq_mask, *lp = generate(model, ids, mask, config, eos_token_id, pad_token_id, return_log_probs)
        pieces.append((rows, cut, seq.numpy(), seq_mask.numpy(), lp[0].numpy() if lp else None))
    R = max(seq.shape[1] - (P - cut) for _, cut, seq, _, _ in pieces)
    out = np.full((B, P + R), pad_token_id, dtype=np.int64)
    out_mask = np.zeros((B, P + R), dtype=pieces[0][3].dtype)
    out_lp = np.zeros((B, R), dtype=np.float32)
    for rows, cut, seq, seq_mask, lp in pieces:
        width = seq.shape[1]
        out[rows, cut:cut + width] = seq
        out_mask[rows, cut:cut + width] = seq_mask
        if lp is not None:
            out_lp[rows, :lp.shape[1]] = lp
    result = (paddle.to_tensor(out), paddle.to_tensor(out_mask))
    return result + (paddle.to_tensor(out_lp),) if return_log_probs else result


def sampled_log_probs(logits, token, temperature: float):
    """log_softmax(logits / temperature)[b, token[b]] -> [B] from a decode step's full-vocabulary
    logits [B, V]: what the scoring forward computes for that token (``InferenceModel.log_probs``),
    so before the repetition penalty and the top-k / top-p filters, which only steer sampling."""
    return gather_log_probs(logits.astype("float32").unsqueeze(1), token.unsqueeze(1), temperature,
                            cpu_kernels.token_log_probs).squeeze(1)


def _generate(decoder: RolloutDecoder, input_ids, attention_mask, config: GenerationConfig, eos_token_id: int,
              pad_token_id: int, return_log_probs: bool = False):
    B, P = input_ids.shape
    V = decoder.vocab_size
    position_ids = position_ids_from_mask(attention_mask)
    logits = decoder.start(input_ids, attention_mask, position_ids, config.max_new_tokens)
    next_pos = position_ids[:, -1:] + 1
    seen = None
    if config.repetition_penalty != 1.0:
        # [B, V] which tokens the real prompt tokens already used
        counts = paddle.put_along_axis(paddle.zeros([B, V], "int64"), input_ids, attention_mask.astype("int64"),
                                       axis=1, reduce="add")
        seen = counts > 0
    finished = paddle.zeros([B], dtype="bool")
    tokens, masks, log_probs = [], [], []
    split_model = decoder_model_parallel(decoder) > 1
    for _ in range(config.max_new_tokens):
        token = next_token(logits, config, seen)
        if split_model:
            token = parallel.broadcast_model_parallel(token)
        alive = ~finished
        token = paddle.where(alive, token, paddle.full_like(token, pad_token_id))
        tokens.append(token)
        masks.append(alive.astype(attention_mask.dtype))
        if return_log_probs:  # (every tensor-parallel rank holds the gathered logits and the token)
            log_probs.append(sampled_log_probs(logits, token, config.temperature) * masks[-1].astype("float32"))
        finished = finished | (token == eos_token_id)
        if bool(finished.all()):
            break
        if seen is not None:
            seen = seen | F.one_hot(token, V).astype("bool")
        logits = decoder.step(token, masks[-1], next_pos)
        next_pos = next_pos + 1
    decoder.release()
    response = paddle.stack(tokens, axis=1)
    response_mask = paddle.stack(masks, axis=1)
    result = (paddle.concat([input_ids, response], axis=1), paddle.concat([attention_mask, response_mask], axis=1))
    return result + (paddle.stack(log_probs, axis=1),) if return_log_probs else result


# ---------------------------------------------------------------------------------------------
# Scoring


def forward_log_probs(model, sequences, attention_mask, temperature: float = 1.0, with_entropy: bool = False,
                      entropy_grad: bool = True):
    """Log-probs [B, L-1] of tokens 1..L-1 under ``model`` at ``temperature`` (+ entropy [B, L-1]).

    A tensor-parallel model with split logits gets the vocabulary-parallel computation.  With
    ``entropy_grad=False`` the entropy is a statistic only: computed without a backward graph.
    """
    out = model(input_ids=sequences, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), return_dict=True)
    return log_probs_from_logits(out.logits, sequences, temperature, vocab.vocab_is_split(unwrap(model)),
                                 with_entropy, entropy_grad)


def log_probs_from_logits(logits, sequences, temperature: float = 1.0, split: bool = False,
                          with_entropy: bool = False, entropy_grad: bool = True):
    """``forward_log_probs`` from the logits [B, L, V] (or this rank's vocabulary slice, ``split``)."""
    # every position is scored against the next token (the last one against a dummy) and the last
    # column dropped afterwards: slicing the [B, L, V] logits instead costs a full-size copy forward
    # and a zero-filled [B, L, V] gradient backward
    labels = paddle.concat([sequences[:, 1:], sequences[:, -1:]], axis=1)
    if split:
        log_probs, entropy = vocab.vocab_parallel_log_probs(logits, labels, temperature,
                                                               with_entropy and entropy_grad)
    elif with_entropy and not entropy_grad:  # the entropy a statistic: one pass over the logits
        return tuple(t[:, :-1] for t in log_probs_and_entropy(logits, labels, temperature,
                                                               cpu_kernels.token_log_probs))
    else:
        log_probs = gather_log_probs(logits, labels, temperature, cpu_kernels.token_log_probs)
        entropy = entropy_from_logits(logits, temperature) if with_entropy and entropy_grad else None
    if with_entropy and not entropy_grad:
        with paddle.no_grad():
            detached = logits.detach()
            entropy = (vocab.vocab_parallel_entropy(detached, temperature) if split
                       else entropy_from_logits(detached, temperature))
    return log_probs[:, :-1], (entropy[:, :-1] if entropy is not None else None)


def action_mask_of(attention_mask, prompt_length: int):
    """[B, L-1]: 1 where token t+1 is a real response token (the EOS it generated included)."""
    mask = attention_mask[:, 1:].astype("float32").clone()
    mask[:, : prompt_length - 1] = 0.0
    return mask


def same_vocabulary(tok_a, tok_b) -> bool:
    return tok_a is tok_b or (len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab())


def retokenize(sequences, attention_mask, prompt_length: int, src_tokenizer, dst_tokenizer, max_length: int):
    """Decode actor sequences to text and re-encode them for a model with another tokenizer.

    The prompt and the response are decoded separately (without special tokens); a response that
    ended with EOS gets the destination EOS.  Returns right-padded (input_ids, attention_mask).
    """
    rows = []
    ids, mask = sequences.numpy(), attention_mask.numpy()
    for b in range(ids.shape[0]):
        prompt = [int(t) for t, m in zip(ids[b, :prompt_length], mask[b, :prompt_length]) if m]
        response = [int(t) for t, m in zip(ids[b, prompt_length:], mask[b, prompt_length:]) if m]
        ended = bool(response) and response[-1] == src_tokenizer.eos_token_id
        prompt_text, response_text = decode_without_special(src_tokenizer, [prompt, response])
        rows.append(encode_scored_text(dst_tokenizer, prompt_text, response_text, ended, max_length))
    T = max(len(r) for r in rows)
    pad = dst_tokenizer.pad_token_id
    out_ids = paddle.to_tensor([r + [pad] * (T - len(r)) for r in rows], dtype="int64")
    out_mask = paddle.to_tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], dtype="int64")
    return out_ids, out_mask


@dataclass
class Models:
    actor: object
    reference: object
    reward: object | None           # None without a reward model (end scores 0: reward functions score)
    critic: object | None           # None for critic-free advantage estimators
    actor_tokenizer: object
    reward_tokenizer: object | None
    decoder: object | None = None   # rollout decoder over the actor's weights (None: the actor's own forward)
    # the roles on ranks of their own (resource pools): ``roles``, ``submit(sequences,
    # attention_mask, prompt_length, fast, grouped)``, then ``results(sequences)`` -> {role: tensor};
    # with a rollout pool (``rollout_peer``) ``generate(...)`` as generate_in_buckets
    remote: object | None = None

    @property
    def rollout_pool(self):
        """The remote roles when a rollout pool generates (``remote.generate``), else None."""
        return self.remote if self.remote is not None and self.remote.rollout_peer is not None else None

    @property
    def critic_pool(self):
        """The remote roles when a critic pool scores and trains the critic (``remote.update_critic``), else None."""
        return self.remote if self.remote is not None and self.remote.critic_peer is not None else None


def score_in_length_groups(fn, sequences, attention_mask, kinds: tuple):
    """``fn(ids, mask)`` over length groups of the rows, each packed to its own longest row (real
    tokens from column 0, as ``Experience.packed``), its outputs put back in place: ``kinds`` says
    per output "token" ([b, W, ...] -> [B, L, ...]), "action" ([b, W-1] -> [B, L-1]) or "row"
    ([b, ...] -> [B, ...]).  Padding positions are 0.  A row's results equal the unpacked call's."""
    ids, mask = sequences.numpy(), attention_mask.numpy()
    first, n = real_spans(mask)
    B, L = ids.shape
    outs = [None] * len(kinds)
    for rows in length_groups(n):
        W = int(n[rows].max())
        valid = np.arange(W)[None, :] < n[rows][:, None]
        got = fn(paddle.to_tensor(shift_left(ids[rows], first[rows], W, valid)),
                 paddle.to_tensor(shift_left(mask[rows], first[rows], W, valid)))
        for k, (kind, value) in enumerate(zip(kinds, got)):
            value = value.numpy()
            if outs[k] is None:
                width = {"token": (L,), "action": (L - 1,), "row": ()}[kind]
                outs[k] = np.zeros((B,) + width + value.shape[1 + len(width):], value.dtype)
            if kind == "row":
                outs[k][rows] = value
                continue
            bi, bj = np.nonzero(np.arange(value.shape[1])[None, :] < (n[rows] - (kind == "action"))[:, None])
            outs[k][rows[bi], first[rows][bi] + bj] = value[bi, bj]
    return tuple(paddle.to_tensor(o) for o in outs)


def keeps_log_probs(setting: str, decoder) -> bool:
    """``rollout_log_probs`` resolved: 'auto' keeps them where the lean ``InferenceModel`` decodes
    the live weights (its step logits equal the scoring forward's to float rounding); the fused GPU
    model's kernels differ and paddlenlp's forward (no decoder) keeps the recompute."""
    return setting == "true" or (setting == "auto" and isinstance(decoder, InferenceModel))


def scoring_log_probs(model, sequences, attention_mask, temperature: float, fast: bool, grouped: bool):
    """Log-probs [B, L-1] of ``sequences`` under a scoring model (the actor's or the reference's):
    on the inference model's layout when ``fast`` (in packed length groups when ``grouped``), else
    the model's own forward."""
    if grouped:
        view = InferenceModel.of(model)
        return score_in_length_groups(lambda s, m: (view.log_probs(s, m, temperature),), sequences, attention_mask,
                                      ("action",))[0]
    if fast:
        return InferenceModel.of(model).log_probs(sequences, attention_mask, temperature)
    return forward_log_probs(model, sequences, attention_mask, temperature)[0]


def _scored(model, ids, mask, fast: bool, grouped: bool):
    """(scores [B, L, 1], end scores [B, 1]) of a score model (the layouts as ``scoring_log_probs``)."""
    if grouped:
        return score_in_length_groups(InferenceModel.of(model).scores, ids, mask, ("token", "row"))
    if fast:
        return InferenceModel.of(model).scores(ids, mask)
    out = model(ids, mask)
    return out.scores, out.end_scores


def critic_values(critic, sequences, attention_mask, fast: bool, grouped: bool):
    """The critic's values [B, L-1] (float32) of ``sequences``: column t values the state before token t+1."""
    return _scored(critic, sequences, attention_mask, fast, grouped)[0].squeeze(-1)[:, :-1].astype("float32")


def reward_end_scores(models: Models, sequences, attention_mask, prompt_length: int, max_length: int,
                      normalize_reward: bool, fast: bool, grouped: bool):
    """The reward model's end scores [B] of actor ``sequences`` (re-encoded first when its tokenizer
    differs; normalised with its saved statistics when ``normalize_reward``); 0 without one."""
    if models.reward is None:
        return paddle.zeros([sequences.shape[0]], dtype="float32")
    if same_vocabulary(models.actor_tokenizer, models.reward_tokenizer):
        end_scores = _scored(models.reward, sequences, attention_mask, fast, grouped)[1].squeeze(-1)
    else:
        r_ids, r_mask = retokenize(sequences, attention_mask, prompt_length, models.actor_tokenizer,
                                   models.reward_tokenizer, max_length)
        end_scores = _scored(models.reward, r_ids, r_mask, fast, grouped)[1].squeeze(-1)
    if normalize_reward:
        end_scores = models.reward.normalizer.normalize(end_scores)
    return end_scores


@paddle.no_grad()
def collect(models: Models, prompt_ids, prompt_mask, config: GenerationConfig, max_length: int,
            normalize_reward: bool = False, before_scoring=None, group_scoring: bool = False) -> Experience:
    """Generate responses for a prompt batch and score them: everything PPO needs but advantages.

    Prompts are repeated ``num_return_sequences`` times consecutively (a group per prompt).
    ``before_scoring()`` runs between generation and scoring (the trainer brings offloaded
    scoring models back there).  Without a reward model (``models.reward`` None) the end scores
    are 0 (the trainer adds the reward functions' scores).  With ``config.keep_log_probs`` the
    actor's old log-probs are the decode steps' (no scoring forward of the actor); 0 outside the
    response tokens.  With ``group_scoring`` the inference model scores rows in packed length
    groups (``score_in_length_groups``); per-token results on padding are then 0.
    """
    tok = models.actor_tokenizer
    n = config.num_return_sequences
    if n > 1:
        prompt_ids = paddle.repeat_interleave(prompt_ids, n, axis=0)
        prompt_mask = paddle.repeat_interleave(prompt_mask, n, axis=0)
    P = prompt_ids.shape[1]
    was_training = models.actor.training
    models.actor.eval()
    if models.rollout_pool is not None:  # a rollout pool generates
        sequences, attention_mask, *kept = models.rollout_pool.generate(prompt_ids, prompt_mask, config,
                                                                        config.keep_log_probs)
    else:
        sequences, attention_mask, *kept = generate_in_buckets(models.decoder or models.actor, prompt_ids,
                                                               prompt_mask, config, tok.eos_token_id,
                                                               tok.pad_token_id, config.keep_log_probs)
    if before_scoring is not None:
        before_scoring()
    # scoring: no gradients; with the inference model in use (single-shard models) every model is
    # scored on its fast layout, otherwise through the model's own forward
    fast = models.decoder is not None
    grouped = fast and group_scoring
    remote = models.remote.roles if models.remote is not None else ()
    if remote:  # the roles on ranks of their own score while this pool scores the rest
        models.remote.submit(sequences, attention_mask, P, fast, grouped)

    with paddle.no_grad():
        if kept:
            # the decode steps' log-probs of the response tokens at their columns (P-1 ..); the
            # prompt's columns are 0 (never an action)
            old_log_probs = paddle.concat([paddle.zeros([sequences.shape[0], P - 1], "float32"), kept[0]], axis=1)
        else:
            old_log_probs = scoring_log_probs(models.actor, sequences, attention_mask, config.temperature, fast,
                                              grouped)
        if was_training:
            models.actor.train()
        ref_log_probs = None if "reference" in remote else \
            scoring_log_probs(models.reference, sequences, attention_mask, config.temperature, fast, grouped)
        action_mask = action_mask_of(attention_mask, P)
        end_scores = None if "reward" in remote else \
            reward_end_scores(models, sequences, attention_mask, P, max_length, normalize_reward, fast, grouped)
        values = None
        if models.critic is not None:
            values = critic_values(models.critic, sequences, attention_mask, fast, grouped)
        if remote:
            got = models.remote.results(sequences)
            ref_log_probs = got.get("reference", ref_log_probs)
            end_scores = got.get("reward", end_scores)
            values = got.get("critic", values)

    response_tokens = attention_mask[:, P:]
    response_lengths = response_tokens.astype("int64").sum(axis=1)
    last = paddle.take_along_axis(sequences[:, P:], paddle.clip(response_lengths - 1, min=0).unsqueeze(1),
                                  axis=1).squeeze(1)
    ended_with_eos = (last == tok.eos_token_id) & (response_lengths > 0)
    return Experience(
        sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
        old_log_probs=old_log_probs.astype("float32"), ref_log_probs=ref_log_probs.astype("float32"),
        values=values, end_scores=end_scores.astype("float32"), response_lengths=response_lengths,
        ended_with_eos=ended_with_eos, prompt_length=P)


def gather_experience(exp: Experience, group, pad_token_id: int) -> Experience:
    """The rollout shares of the ranks in ``group`` as one experience batch (in rank order),
    responses right-padded to the longest (sequences with ``pad_token_id``, the rest with 0).
    Every tensor field of ``Experience`` is gathered, so a new field cannot silently vanish."""
    names = [f.name for f in dataclasses.fields(Experience) if isinstance(getattr(exp, f.name), paddle.Tensor)]
    arrays = {n: getattr(exp, n).numpy() for n in names}
    arrays["_pad"] = {"sequences": pad_token_id}
    out = transfer.gather_rows(arrays, group)
    scalars = {f.name: getattr(exp, f.name) for f in dataclasses.fields(Experience) if f.name not in out}
    return Experience(**{n: paddle.to_tensor(v) for n, v in out.items()}, **scalars)
