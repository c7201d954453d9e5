"""Tokenized datasets of the three stages and their collators.

* ``PromptOnlyDataset`` (PPO rollouts): ``{"input_ids"}`` of de-duplicated prompts, left-padded.
* ``PreferenceDataset`` (reward model): ``{"better_input_ids", "worse_input_ids"}``, right-padded.
* ``SupervisedDataset`` (SFT): ``{"input_ids", "labels"}`` with prompt tokens labelled -100.

A spec such as ``"PKU-SafeRLHF/train:0.5,alpaca"`` names registered raw datasets; they are
mixed by proportion and tokenized up front into ``self.data`` (lists of python ints).  Every
attention mask comes from sequence lengths, so a pad token equal to eos never hides a real eos.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import paddle
from tqdm import tqdm

from ppo.data.base import RawDataset, RawSample, import_user_modules, parse_dataset_spec
from ppo.data.chat import CHAT, ChatRenderer, load_chat_template
from ppo.data.template import DEFAULT_FOLLOW_TEMPLATE, DEFAULT_TEMPLATE
from ppo.data.tokenizer_utils import ensure_pad_token
from ppo.core.errors import UserError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens the loss skips (prompt and user turns, padding)


def answer_mask(labels):
    """[B, T-1] bool: positions t whose next token (t+1) is a labelled answer token, aligned with
    next-token log-probs and logits[:, :-1]; labels [B, T]."""
    return labels[:, 1:] != IGNORE_INDEX


def _check_template(template: Any, which: str) -> None:
    if not isinstance(template, str):
        raise UserError(f"prompt template '{which}' is a {type(template).__name__}; expected a string "
                        "with an {input} placeholder")
    marker = "\x00"
    try:
        text = template.format(input=marker)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"prompt template {template!r} is not a valid format string ({type(e).__name__}: {e}); "
                        "use {input} for the user text and {{ }} for literal braces") from None
    if marker not in text:
        raise UserError(f"prompt template {template!r} has no {{input}} placeholder; expected e.g. "
                        f"{DEFAULT_TEMPLATE!r}")


@dataclass
class PromptTemplate:
    """How user text becomes a prompt.

    ``first`` wraps the first (or only) user turn; ``follow`` wraps each later user turn of a
    dialogue, which comes right after the previous assistant turn and its eos token.
    """

    first: str = DEFAULT_TEMPLATE
    follow: str = DEFAULT_FOLLOW_TEMPLATE
    chat: str | None = None  # the tokenizer's chat template (jinja source): replaces first / follow

    def __post_init__(self):
        _check_template(self.first, "first")
        _check_template(self.follow, "follow")
        self.renderer = ChatRenderer(self.chat) if self.chat is not None else None


def mix_indices(n: int, proportion: float, seed: int) -> list[int]:
    """Indices taken from a dataset of ``n`` samples for ``proportion``.

    ``floor(proportion)`` full passes plus ``round(frac * n)`` distinct indices drawn with
    ``numpy.random.default_rng(seed)`` (sorted), so counts are exact and reproducible.
    """
    whole = math.floor(proportion)
    extra = round((proportion - whole) * n)
    indices = list(range(n)) * whole
    if extra:
        indices += sorted(np.random.default_rng(seed).choice(n, size=extra, replace=False).tolist())
    return indices


def encode_answer(tokenizer, answer: str, template: PromptTemplate | None = None) -> list[int]:
    """Ids of ``" " + answer`` without special tokens, then eos: ``[A]``.  With a chat template: the
    template's assistant turn (its text after the generation prompt, trailing whitespace dropped),
    then eos unless the turn already ends with it."""
    if template is None or template.renderer is None:
        return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    user = [{"role": "user", "content": "?"}]
    prompt = template.renderer.render(user, True, tokenizer)
    full = template.renderer.render(user + [{"role": "assistant", "content": answer}], False, tokenizer)
    ids = tokenizer(_after(prompt, full).rstrip(), add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def _after(prefix: str, text: str) -> str:
    """``text`` without ``prefix``; UserError when the chat template does not render turn by turn."""
    if not text.startswith(prefix):
        raise UserError("prompt_template 'chat': the tokenizer's chat template renders a conversation differently "
                        "once a turn is added (not turn by turn), so turns cannot be masked; give a prompt_template "
                        "with an {input} placeholder instead")
    return text[len(prefix):]


def _encode_chat(tokenizer, template: PromptTemplate, turns: list[str]) -> tuple[list[int], list[bool]]:
    """``encode_prompt`` with the chat template: the conversation rendered one message more at a time,
    each new piece tokenized on its own (assistant pieces trainable; user pieces, with the
    assistant header that follows them, not)."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    ids, trainable, done = [], [], ""
    for j in range(1, len(messages) + 1):
        assistant = messages[j - 1]["role"] == "assistant"
        text = template.renderer.render(messages[:j], not assistant, tokenizer)
        piece = tokenizer(_after(done, text), add_special_tokens=False)["input_ids"]
        ids += piece
        trainable += [assistant] * len(piece)
        done = text
    return ids, trainable


def encode_prompt(tokenizer, template: PromptTemplate, input: str | list[str]) -> tuple[list[int], list[bool]]:
    """Ids of the prompt ``[P]`` (with the tokenizer's bos) and, per id, whether it belongs to an
    assistant turn of a dialogue (those are trained in SFT; user turns and template text are not).

    A dialogue ``[u1, a1, u2, ..., uk]`` becomes
    ``first(u1) + " " + a1 + <eos> + follow(u2) + ... + follow(uk)``; the pieces are tokenized
    one by one so every id is known to belong to one turn.
    """
    turns = [input] if isinstance(input, str) else list(input)
    if template.renderer is not None:
        return _encode_chat(tokenizer, template, turns)
    ids = list(tokenizer(template.first.format(input=turns[0]))["input_ids"])
    trainable = [False] * len(ids)
    for k in range(1, len(turns), 2):
        answer = encode_answer(tokenizer, turns[k])
        user = tokenizer(template.follow.format(input=turns[k + 1]), add_special_tokens=False)["input_ids"]
        ids += answer + user
        trainable += [True] * len(answer) + [False] * len(user)
    return ids, trainable


# ---------------------------------------------------------------------------------------------
# Collators


def pad_sequences(seqs: list[list[int]], value: int, left: bool = False,
                  length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [B, T], mask [B, T])`` int64, ``T = length`` or the longest sequence.

    The mask is 1 exactly on each sequence's own positions (from its length, never from ids).
    """
    T = length if length is not None else max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), value, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for i, seq in enumerate(seqs):
        span = slice(T - len(seq), T) if left else slice(0, len(seq))
        ids[i, span] = seq
        mask[i, span] = 1
    return ids, mask


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, paddle.Tensor]:
    return {key: paddle.to_tensor(value, dtype="int64") for key, value in arrays.items()}


def collate_prompts(batch: list[dict], pad_token_id: int) -> dict[str, paddle.Tensor]:
    """Left-padded prompts (generation appends on the right): ``input_ids``, ``attention_mask`` [B, T]."""
    ids, mask = pad_sequences([item["input_ids"] for item in batch], pad_token_id, left=True)
    return _tensors({"input_ids": ids, "attention_mask": mask})


def collate_preference(batch: list[dict], pad_token_id: int) -> dict[str, paddle.Tensor]:
    """Right-padded pairs, both sides to one T: ``better_/worse_`` ``input_ids``, ``attention_mask`` [B, T]."""
    better = [item["better_input_ids"] for item in batch]
    worse = [item["worse_input_ids"] for item in batch]
    T = max(len(s) for s in better + worse)
    better_ids, better_mask = pad_sequences(better, pad_token_id, length=T)
    worse_ids, worse_mask = pad_sequences(worse, pad_token_id, length=T)
    return _tensors({"better_input_ids": better_ids, "better_attention_mask": better_mask,
                     "worse_input_ids": worse_ids, "worse_attention_mask": worse_mask})


def collate_supervised(batch: list[dict], pad_token_id: int) -> dict[str, paddle.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padded with -100) [B, T]."""
    ids, mask = pad_sequences([item["input_ids"] for item in batch], pad_token_id)
    labels, _ = pad_sequences([item["labels"] for item in batch], IGNORE_INDEX)
    return _tensors({"input_ids": ids, "attention_mask": mask, "labels": labels})


# ---------------------------------------------------------------------------------------------
# Datasets


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, int) and value in (0, 1))


class TokenizedDataset(paddle.io.Dataset):
    """Raw datasets named by ``spec``, mixed by proportion and tokenized.

    ``self.data`` holds one dict of python int lists per sample, in spec order (shuffling is
    the loader's job); ``self.counts`` counts samples skipped or changed while tokenizing.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ("input",)
    KIND: ClassVar[str] = "samples"

    def __init__(self, spec: str | list, tokenizer, max_length: int, seed: int = 42,
                 template: PromptTemplate | str | None = None):
        super().__init__()
        self.specs = parse_dataset_spec(spec)
        named = Counter((s.name, s.path) for s in self.specs)
        for (name, path), count in named.items():
            if count > 1:
                logger.warning("dataset '%s'%s is named %d times in '%s': its samples are taken once per "
                               "entry (add the proportions instead)", name, f" at '{path}'" if path else "",
                               count, spec)
        self.spec = spec.strip() if isinstance(spec, str) else ",".join(
            f"{s.name}:{s.proportion:g}" + (f":{s.path}" if s.path else "") for s in self.specs)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise UserError(f"max_length={max_length!r} for '{self.spec}' must be a positive integer")
        self.tokenizer = ensure_pad_token(tokenizer)
        self.max_length = max_length
        self.seed = seed
        if template is None:
            template = PromptTemplate()
        elif isinstance(template, str):
            template = PromptTemplate(first=template)
        self.template = template

        picks: list[tuple[RawDataset, str, int]] = []
        for i, entry in enumerate(self.specs):
            raw = RawDataset.load(entry.name, entry.path)
            indices = mix_indices(len(raw), entry.proportion, seed + i)
            if not indices:
                logger.warning("proportion %g of '%s' (%d samples) in '%s' takes no sample",
                               entry.proportion, entry.name, len(raw), self.spec)
            picks.extend((raw, entry.name, j) for j in indices)

        self.counts: Counter = Counter()
        self._prompt_cache: dict[Any, tuple[list[int], list[bool]]] = {}
        self.data: list[dict[str, list[int]]] = []
        for raw, name, index in tqdm(picks, desc=f"tokenizing {self.spec}", disable=len(picks) <= 1000):
            sample = raw[index]
            self._check_sample(sample, name, index)
            item = self.tokenize(sample)
            if item is not None:
                self.data.append(item)
        self._prompt_cache = {}  # only useful while tokenizing
        self._report(len(picks))

    # -- tokenization --------------------------------------------------------------------------

    def encode_prompt(self, input: str | list[str]) -> tuple[list[int], list[bool]]:
        """``encode_prompt`` of the template, cached: mixed datasets repeat prompts a lot."""
        key = input if isinstance(input, str) else tuple(input)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = encode_prompt(self.tokenizer, self.template, input)
        return self._prompt_cache[key]

    def tokenize(self, sample: RawSample) -> dict[str, list[int]] | None:
        """The item of one sample, or None to skip it (after counting why in ``self.counts``)."""
        raise NotImplementedError

    def _check_sample(self, sample: Any, name: str, index: int) -> None:
        where = f"dataset '{name}' sample {index}"
        if not isinstance(sample, dict):
            raise UserError(f"{where} is a {type(sample).__name__}; __getitem__ must return a RawSample dict "
                            f"with fields {', '.join(self.REQUIRED)}")
        missing = [f for f in self.REQUIRED if sample.get(f) is None]
        if missing:
            raise UserError(f"{where} has no field(s) {', '.join(repr(m) for m in missing)}; "
                            f"{type(self).__name__} needs {', '.join(self.REQUIRED)}")
        turns = sample["input"]
        if not isinstance(turns, str) and not (
                isinstance(turns, (list, tuple)) and len(turns) % 2 == 1 and all(isinstance(t, str) for t in turns)):
            raise UserError(f"{where} field 'input' is {type(turns).__name__} {str(turns)[:40]!r}; expected a string "
                            "or a dialogue list of strings [user, assistant, ..., user] of odd length")
        for field in ("answer", "other_answer"):
            if field in self.REQUIRED and not isinstance(sample[field], str):
                raise UserError(f"{where} field '{field}' is {type(sample[field]).__name__}; expected a string")
        if sample.get("reference") is not None and not isinstance(sample["reference"], str):
            raise UserError(f"{where} field 'reference' is {type(sample['reference']).__name__}; expected a string "
                            "(the answer reward functions check responses against) or nothing")
        if "better" in self.REQUIRED and not _is_bool(sample["better"]):
            raise UserError(f"{where} field 'better' is {sample['better']!r}; expected True or False")

    def _report(self, total: int) -> None:
        n, m, spec = self.counts, self.max_length, self.spec
        if n["truncated"]:
            logger.warning("%d of %d prompts of '%s' are longer than max_length=%d tokens; kept the last %d tokens "
                           "of each", n["truncated"], total, spec, m, m)
        if n["too_long"]:
            logger.warning("skipped %d of %d %s of '%s': the prompt alone fills max_length=%d tokens, leaving no "
                           "room for the answer", n["too_long"], total, self.KIND, spec, m)
        if n["identical"]:
            logger.warning("skipped %d of %d pairs of '%s': both answers are identical (after truncation to "
                           "max_length=%d), so they express no preference", n["identical"], total, spec, m)
        if n["duplicate"]:
            logger.info("dropped %d duplicate prompts of '%s'", n["duplicate"], spec)
        if not self.data:
            if not total:
                raise UserError(f"'{spec}' selects no samples: its proportions are too small for the sizes of "
                                "its datasets")
            if n["identical"] == total:
                raise UserError(f"all {total} pairs of '{spec}' have identical answers; a preference dataset needs "
                                "pairs whose answers differ")
            reasons = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in n.items() if count)
            raise UserError(f"'{spec}' gives no {self.KIND} after tokenization ({reasons or 'no samples'}); "
                            f"check the data or raise max_length={m}")

    # -- access --------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.data[index]

    def __len__(self) -> int:
        return len(self.data)

    def split(self, eval_ratio: float, seed: int | None = None) -> tuple[TokenizedSubset, TokenizedSubset]:
        """``(train, eval)``: a seeded random ``round(eval_ratio * len)`` items held out for eval.

        Both keep dataset order; the same seed gives the same split.
        """
        if not isinstance(eval_ratio, (int, float)) or not 0 <= eval_ratio < 1:
            raise UserError(f"eval_split_ratio={eval_ratio!r} for '{self.spec}' is outside [0, 1); give the share "
                            "of the training data to hold out, e.g. 0.1")
        n = len(self)
        n_eval = round(n * eval_ratio)
        if eval_ratio > 0:
            n_eval = max(n_eval, 1)
            if n_eval >= n:
                raise UserError(f"'{self.spec}' has {n} {self.KIND}, too few to hold out eval_split_ratio="
                                f"{eval_ratio} and keep some for training")
        perm = np.random.default_rng(self.seed if seed is None else seed).permutation(n)
        return (TokenizedSubset(self, sorted(perm[n_eval:].tolist())),
                TokenizedSubset(self, sorted(perm[:n_eval].tolist())))

    def get_collator(self):
        """``list[item] -> dict[str, paddle.Tensor]`` (int64), as ``DataLoader(collate_fn=...)``."""
        raise NotImplementedError


class TokenizedSubset(paddle.io.Dataset):
    """The items ``indices`` of a TokenizedDataset (one side of ``split``)."""

    def __init__(self, dataset: TokenizedDataset, indices: list[int]):
        super().__init__()
        self.dataset = dataset
        self.indices = indices

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.dataset[self.indices[index]]

    def __len__(self) -> int:
        return len(self.indices)

    def get_collator(self):
        return self.dataset.get_collator()

    def references(self, indices) -> list[str | None]:
        """References of items ``indices`` of this subset (PromptOnlyDataset only)."""
        return self.dataset.references([self.indices[i] for i in indices])


class PromptOnlyDataset(TokenizedDataset):
    """Items ``{"input_ids": [P]}``: each distinct prompt once (first occurrence kept).

    A prompt longer than ``max_length`` keeps its last ``max_length`` tokens (the end of the
    prompt, where the answer starts, matters most).  Each item's reference answer (``None`` when
    its sample has none; the first occurrence's for a repeated prompt) is ``references([i])``:
    kept beside the items so the collated batch stays tensors only.
    """

    KIND = "prompts"

    def __init__(self, *args, **kwargs):
        self._seen: set = set()  # inputs already taken, for the de-duplication in tokenize
        self._references: list[str | None] = []
        super().__init__(*args, **kwargs)
        del self._seen

    def references(self, indices) -> list[str | None]:
        """Reference answers of items ``indices`` (e.g. the indices a prompt batch was collated from)."""
        return [self._references[int(i)] for i in indices]

    def tokenize(self, sample):
        key = sample["input"] if isinstance(sample["input"], str) else tuple(sample["input"])
        if key in self._seen:
            self.counts["duplicate"] += 1
            return None
        self._seen.add(key)
        ids, _ = self.encode_prompt(sample["input"])
        if len(ids) > self.max_length:
            self.counts["truncated"] += 1
            ids = ids[-self.max_length:]
        self._references.append(sample.get("reference"))  # every kept prompt yields one item
        return {"input_ids": ids}

    def get_collator(self):
        return functools.partial(collate_prompts, pad_token_id=self.tokenizer.pad_token_id)


class PreferenceDataset(TokenizedDataset):
    """Items ``{"better_input_ids": [L1], "worse_input_ids": [L2]}``: prompt + answer + eos each,
    cut at ``max_length``; ``better`` of the sample says which answer is the better one."""

    REQUIRED = ("input", "answer", "other_answer", "better")
    KIND = "pairs"

    def tokenize(self, sample):
        prompt, _ = self.encode_prompt(sample["input"])
        if len(prompt) >= self.max_length:
            self.counts["too_long"] += 1
            return None
        first = (prompt + encode_answer(self.tokenizer, sample["answer"], self.template))[:self.max_length]
        other = (prompt + encode_answer(self.tokenizer, sample["other_answer"], self.template))[:self.max_length]
        if sample["answer"] == sample["other_answer"] or first == other:
            self.counts["identical"] += 1
            return None
        better, worse = (first, other) if sample["better"] else (other, first)
        return {"better_input_ids": better, "worse_input_ids": worse}

    def get_collator(self):
        return functools.partial(collate_preference, pad_token_id=self.tokenizer.pad_token_id)


class SupervisedDataset(TokenizedDataset):
    """Items ``{"input_ids": [L], "labels": [L]}``: prompt + answer + eos cut at ``max_length``;
    labels are -100 on the prompt's template and user-turn tokens, the ids on assistant tokens
    (including each eos)."""

    REQUIRED = ("input", "answer")

    def tokenize(self, sample):
        prompt, trainable = self.encode_prompt(sample["input"])
        if len(prompt) >= self.max_length:
            self.counts["too_long"] += 1
            return None
        answer = encode_answer(self.tokenizer, sample["answer"], self.template)
        ids = (prompt + answer)[:self.max_length]
        labels = ([t if keep else IGNORE_INDEX for t, keep in zip(prompt, trainable)] + answer)[:self.max_length]
        return {"input_ids": ids, "labels": labels}

    def get_collator(self):
        return functools.partial(collate_supervised, pad_token_id=self.tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# a stage's datasets from its arguments


def build_template(args):
    """The prompt template of the stage arguments ``args`` (``prompt_template``, or the default);
    ``chat``: the chat template of the model's tokenizer (the actor's in PPO)."""
    if args.prompt_template == CHAT:
        what = "model_name_or_path" if hasattr(args, "model_name_or_path") else "actor_model_name_or_path"
        return PromptTemplate(chat=load_chat_template(getattr(args, what), what))
    return PromptTemplate(first=args.prompt_template) if args.prompt_template else PromptTemplate()


def load_datasets(cls, args, tokenizer):
    """(train, eval or None) of dataset class ``cls`` from train/eval specs or a held-out split."""
    if args.extra_modules:
        import_user_modules([m for m in args.extra_modules.split(",") if m])
    template = build_template(args)
    train = cls(args.train_datasets, tokenizer, args.max_length, seed=args.seed, template=template)
    if args.eval_datasets:
        return train, cls(args.eval_datasets, tokenizer, args.max_length, seed=args.seed, template=template)
    if args.eval_split_ratio > 0:
        return train.split(args.eval_split_ratio, seed=args.seed)
    return train, None
