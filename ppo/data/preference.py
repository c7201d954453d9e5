"""Preference data for the DPO stage: the file layouts people hold, and the tokenized pairs.

Raw layouts (each reads a local file or folder given as the spec's path,
``NAME:proportion:/data/train.jsonl``):

* ``paddlenlp-dpo``: PaddleNLP's DPO JSONL: ``src`` (user turns, a string or a list), ``tgt``
  (the assistant turns between them, one fewer), ``response`` (two answers) and ``sort`` (two
  numbers: the larger marks the chosen answer);
* ``prompt-chosen-rejected``: ``prompt``, ``chosen``, ``rejected`` as plain strings, or as chat
  messages (``[{"role", "content"}]``: the prompt's turns, and the assistant's answer);
* ``prompt-completion-label``: KTO's unpaired layout, ``prompt``, ``completion`` and ``label``
  (true: desirable).

Tokenized datasets: ``PairDataset`` (every paired loss; any preference NAME works as is) keeps the
prompt's length, so the loss reads only the answers' tokens; ``UnpairedDataset`` (KTO) keeps the
prompt and the completion apart, so the trainer can pair a completion with another prompt for
KTO's KL estimate.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import paddle

from ppo.core.errors import UserError
from ppo.data.base import RawSample, SampleListDataset, describe_source, load_records, require_fields, _short
from ppo.data.datasets import PreferenceDataset, TokenizedDataset, _is_bool, _tensors, encode_answer, pad_sequences


def _turns(value, source: str, index: int, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return list(value)
    raise UserError(f"{source} record {index} field '{field}' is {type(value).__name__} {_short(value)}; "
                    "expected a string or a list of strings")


def _check_answers(chosen: str, rejected: str, source: str, index: int) -> None:
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise UserError(f"{source} record {index} has an empty {name} answer; every pair needs two non-empty "
                            "answers")
    if chosen == rejected:
        raise UserError(f"{source} record {index} has identical chosen and rejected answers {_short(chosen)}; a "
                        "pair must express a preference")


def _need_path(name: str, path: str | None) -> str:
    if path is None:
        raise UserError(f"dataset '{name}' reads a local file: give its path, '{name}:1.0:/data/train.jsonl'")
    return path


class PaddleNLPDPO(SampleListDataset):
    """PaddleNLP's DPO layout (``llm/alignment/dpo``): multi-turn ``src``/``tgt``, ``response``, ``sort``."""

    NAME = "paddlenlp-dpo"
    FIELDS = ("src", "tgt", "response", "sort")

    def __init__(self, path: str | None = None):
        source = describe_source(self.NAME, _need_path(self.NAME, path))
        self.samples = []
        for i, record in enumerate(load_records(path, name=self.NAME)):
            if isinstance(record, dict) and record.get("tgt") is None:
                record = {**record, "tgt": []}  # a single-turn record may leave tgt out
            require_fields(record, self.FIELDS, source, i)
            users = _turns(record["src"], source, i, "src")
            assistants = _turns(record["tgt"], source, i, "tgt") if record["tgt"] != "" else []
            if len(assistants) != len(users) - 1:
                raise UserError(f"{source} record {i} has {len(users)} user turns (src) and {len(assistants)} "
                                f"assistant turns (tgt); expected {len(users) - 1} (one fewer: the last user turn "
                                "is answered by response)")
            response, sort = record["response"], record["sort"]
            if not (isinstance(response, list) and len(response) == 2 and all(isinstance(r, str) for r in response)):
                raise UserError(f"{source} record {i} field 'response' is {_short(response)}; expected a list of "
                                "two answer strings")
            if not (isinstance(sort, list) and len(sort) == 2 and all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in sort)
                    and sort[0] != sort[1]):
                raise UserError(f"{source} record {i} field 'sort' is {_short(sort)}; expected two different "
                                "finite numbers (the larger marks the chosen answer)")
            chosen, rejected = (response[0], response[1]) if sort[0] > sort[1] else (response[1], response[0])
            _check_answers(chosen, rejected, source, i)
            dialogue = [t for pair in zip(users[:-1], assistants) for t in pair] + [users[-1]]
            self.samples.append(RawSample(input=dialogue if len(dialogue) > 1 else dialogue[0], answer=chosen,
                                          other_answer=rejected, better=True))


def _message_turns(messages, source: str, index: int, field: str, answer: bool):
    """The text turns of chat messages (system messages go first into the first user turn)."""
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in (
                "system", "user", "assistant") for m in messages)):
        raise UserError(f"{source} record {index} field '{field}' is {_short(messages)}; expected a string or a "
                        "list of {\"role\": system|user|assistant, \"content\": string} messages")
    if answer:
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise UserError(f"{source} record {index} field '{field}' must be one assistant message")
        return messages[0]["content"]
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    roles = [m["role"] for m in turns]
    expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(turns))]
    if not turns or roles != expected or roles[-1] != "user":
        raise UserError(f"{source} record {index} field '{field}' must alternate user and assistant messages, "
                        f"starting and ending with user; got roles {roles}")
    texts = [m["content"] for m in turns]
    if system:
        texts[0] = system + "\n" + texts[0]
    return texts if len(texts) > 1 else texts[0]


def _prompt_and_answer(record, source, index, prompt_field, answer_field):
    prompt, answer = record[prompt_field], record[answer_field]
    prompt = prompt if isinstance(prompt, str) else _message_turns(prompt, source, index, prompt_field, False)
    answer = answer if isinstance(answer, str) else _message_turns(answer, source, index, answer_field, True)
    return prompt, answer


class PromptChosenRejected(SampleListDataset):
    """The common ``prompt``/``chosen``/``rejected`` layout (TRL's), as text or as chat messages."""

    NAME = "prompt-chosen-rejected"
    FIELDS = ("prompt", "chosen", "rejected")

    def __init__(self, path: str | None = None):
        source = describe_source(self.NAME, _need_path(self.NAME, path))
        self.samples = []
        for i, record in enumerate(load_records(path, name=self.NAME)):
            require_fields(record, self.FIELDS, source, i)
            prompt, chosen = _prompt_and_answer(record, source, i, "prompt", "chosen")
            _, rejected = _prompt_and_answer(record, source, i, "prompt", "rejected")
            _check_answers(chosen, rejected, source, i)
            self.samples.append(RawSample(input=prompt, answer=chosen, other_answer=rejected, better=True))


class PromptCompletionLabel(SampleListDataset):
    """KTO's unpaired layout: ``prompt``, ``completion``, ``label`` (true: desirable)."""

    NAME = "prompt-completion-label"
    FIELDS = ("prompt", "completion", "label")

    def __init__(self, path: str | None = None):
        source = describe_source(self.NAME, _need_path(self.NAME, path))
        self.samples = []
        for i, record in enumerate(load_records(path, name=self.NAME)):
            require_fields(record, self.FIELDS, source, i)
            prompt, completion = _prompt_and_answer(record, source, i, "prompt", "completion")
            if not completion.strip():
                raise UserError(f"{source} record {i} has an empty completion")
            if not _is_bool(record["label"]):
                raise UserError(f"{source} record {i} field 'label' is {_short(record['label'])}; expected true "
                                "(desirable) or false (undesirable)")
            self.samples.append(RawSample(input=prompt, answer=completion, desirable=bool(record["label"])))


# ---------------------------------------------------------------------------------------------
# Tokenized


def answer_masks(lengths, prompt_lengths, T: int) -> np.ndarray:
    """``[B, T - 1]`` float32: 1 where next-token position t predicts an answer token, i.e.
    ``prompt_length - 1 <= t < length - 1`` (the log-prob at t scores token t + 1)."""
    t = np.arange(T - 1)[None, :]
    lengths, prompts = np.asarray(lengths)[:, None], np.asarray(prompt_lengths)[:, None]
    return ((t >= prompts - 1) & (t < lengths - 1)).astype(np.float32)


def collate_pairs(batch: list[dict], pad_token_id: int) -> dict:
    """Right-padded pairs as ``collate_preference`` gives them, plus ``better_answer_mask`` and
    ``worse_answer_mask`` ``[B, T - 1]`` (``answer_masks``)."""
    better = [item["better_input_ids"] for item in batch]
    worse = [item["worse_input_ids"] for item in batch]
    prompts = [item["prompt_length"] for item in batch]
    T = max(len(s) for s in better + worse)
    out = {}
    for side, seqs in (("better", better), ("worse", worse)):
        ids, mask = pad_sequences(seqs, pad_token_id, length=T)
        out.update(_tensors({f"{side}_input_ids": ids, f"{side}_attention_mask": mask}))
        out[f"{side}_answer_mask"] = paddle.to_tensor(answer_masks([len(s) for s in seqs], prompts, T))
    return out


class PairDataset(PreferenceDataset):
    """``PreferenceDataset``'s items plus ``prompt_length``: the tokens before the answer, shared by
    both sides of a pair.  ``packed``: the collator packs each pair into one row."""

    packed = False

    def tokenize(self, sample):
        item = super().tokenize(sample)
        if item is not None:
            item["prompt_length"] = len(self.encode_prompt(sample["input"])[0])
        return item

    def get_collator(self):
        collate = collate_packed_pairs if self.packed else collate_pairs
        return functools.partial(collate, pad_token_id=self.tokenizer.pad_token_id)


def collate_unpaired(batch: list[dict], pad_token_id: int, max_length: int) -> dict:
    """KTO's micro-batch: ``input_ids``/``attention_mask``/``answer_mask`` of each prompt with its own
    completion, the same three prefixed ``kl_`` of each prompt with the next item's completion (the
    mismatched pairs of KTO's KL estimate, cut at ``max_length``), and ``desirable`` [B] (int64)."""
    out = {"desirable": paddle.to_tensor([int(item["desirable"]) for item in batch], dtype="int64")}
    nxt = batch[1:] + batch[:1]
    for prefix, answers in (("", batch), ("kl_", nxt)):
        seqs = [(item["prompt_ids"] + a["answer_ids"])[:max_length] for item, a in zip(batch, answers)]
        prompts = [len(item["prompt_ids"]) for item in batch]
        ids, mask = pad_sequences(seqs, pad_token_id)
        out.update(_tensors({f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask}))
        out[f"{prefix}answer_mask"] = paddle.to_tensor(answer_masks([len(s) for s in seqs], prompts, ids.shape[1]))
    return out


class UnpairedDataset(TokenizedDataset):
    """KTO's items ``{"prompt_ids", "answer_ids", "desirable"}``; prompt + answer fit ``max_length``
    (the answer cut to the room the prompt leaves)."""

    REQUIRED = ("input", "answer", "desirable")
    KIND = "completions"

    def tokenize(self, sample):
        prompt, _ = self.encode_prompt(sample["input"])
        if len(prompt) >= self.max_length:
            self.counts["too_long"] += 1
            return None
        answer = encode_answer(self.tokenizer, sample["answer"], self.template)[:self.max_length - len(prompt)]
        return {"prompt_ids": prompt, "answer_ids": answer, "desirable": bool(sample["desirable"])}

    def get_collator(self):
        return functools.partial(collate_unpaired, pad_token_id=self.tokenizer.pad_token_id,
                                 max_length=self.max_length)


def packed_pair(item: dict) -> tuple[list[int], list[int], int, int, int]:
    """One pair as one row: ``(ids, positions, P, Lc, Lr)`` = prompt + chosen answer + rejected
    answer, the rejected answer's positions restarting after the prompt."""
    P = item["prompt_length"]
    chosen, rejected = item["better_input_ids"][P:], item["worse_input_ids"][P:]
    ids = item["better_input_ids"][:P] + chosen + rejected
    positions = list(range(P + len(chosen))) + list(range(P, P + len(rejected)))
    return ids, positions, P, len(chosen), len(rejected)


def collate_packed_pairs(batch: list[dict], pad_token_id: int) -> dict:
    """Pairs packed one per row (``packed_pair``), right-padded to T: ``packed_input_ids``,
    ``packed_position_ids`` [B, T], ``packed_attention_mask`` [B, T, T] bool (causal, and no rejected
    token attends to a chosen one; a padding position attends only to itself), ``packed_chosen_mask``
    / ``packed_rejected_mask`` [B, T - 1] (next-token positions that score a chosen token / a
    rejected token after its first), ``packed_first_rejected`` [B, 2] (the prompt's last position,
    which scores the rejected answer's first token, and that token)."""
    rows = [packed_pair(item) for item in batch]
    T = max(len(r[0]) for r in rows)
    B = len(rows)
    ids = np.full((B, T), pad_token_id, dtype=np.int64)
    positions = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T, T), dtype=bool)
    chosen = np.zeros((B, T - 1), dtype=np.float32)
    rejected = np.zeros((B, T - 1), dtype=np.float32)
    first = np.zeros((B, 2), dtype=np.int64)
    causal = np.tril(np.ones((T, T), dtype=bool))
    for b, (row, pos, P, Lc, Lr) in enumerate(rows):
        L = len(row)
        ids[b, :L], positions[b, :L] = row, pos
        mask[b] = causal
        mask[b, P + Lc:L, P:P + Lc] = False  # the rejected answer does not see the chosen one
        mask[b, L:, :] = False
        mask[b, np.arange(L, T), np.arange(L, T)] = True
        chosen[b, P - 1:P + Lc - 1] = 1.0
        rejected[b, P + Lc:L - 1] = 1.0
        first[b] = (P - 1, row[P + Lc])
    out = _tensors({"packed_input_ids": ids, "packed_position_ids": positions, "packed_first_rejected": first})
    out["packed_attention_mask"] = paddle.to_tensor(mask)
    out["packed_chosen_mask"] = paddle.to_tensor(chosen)
    out["packed_rejected_mask"] = paddle.to_tensor(rejected)
    return out
