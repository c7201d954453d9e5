"""The one place the toolkit reads its files: JSON configs, model and tokenizer configs,
tokenizer files, checkpoint state, pickled random states and paddle weights (pickles only after
``ppo.storage.safe_pickle.check_pickle`` found nothing but data in them).

Every reader turns what a damaged or mistyped file raises (missing, unreadable, not UTF-8,
invalid or truncated JSON, duplicate keys, an unpickling or paddle load failure) into one
``UserError`` line that names the file and what was expected.  Data files go through
``ppo.data.base.load_records``, which does the same for the ``datasets`` parsers.
"""

from __future__ import annotations

import json
import os
import pickle
from contextlib import contextmanager

from ppo.core.errors import UserError
from ppo.storage.safe_pickle import allow_unsafe_pickle, check_pickle  # noqa: F401  (re-exported)


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an exception (at most 200 characters of it)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _no_duplicates(path: str, what: str):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                # json keeps the last value silently: a config with a key twice means one is ignored
                raise UserError(f"{what} '{path}' is not valid: key '{key}' appears twice in one object; "
                                "give each key once")
            seen.add(key)
        return dict(pairs)
    return hook


def require_file(path: str, what: str) -> None:
    """UserError naming ``path`` unless it is a file (missing, or a folder where the file belongs)."""
    if os.path.isdir(path):
        raise UserError(f"{what} '{path}' is a folder, not a file")
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist")


def read_text(path: str, what: str = "file") -> str:
    """The UTF-8 text of ``path``; UserError naming it when it is missing, a folder, unreadable or
    not UTF-8."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {e.start}); the file is damaged or not "
                        "a text file") from None
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read: {first_line(e)}") from None


def read_json(path: str, what: str = "JSON file", object_only: bool = True, unique_keys: bool = True):
    """The parsed JSON of ``path`` (an object unless ``object_only`` is false); duplicate keys are an
    error unless ``unique_keys`` is false (files written by other tools: the last one counts)."""
    text = read_text(path, what)
    if not text.strip():
        raise UserError(f"{what} '{path}' is empty (truncated?); expected a JSON object")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates(path, what) if unique_keys else None)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} '{path}' is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if object_only and not isinstance(data, dict):
        raise UserError(f"{what} '{path}' must hold a JSON object, got a {type(data).__name__}")
    return data


def read_sentencepiece(path: str, what: str = "sentencepiece model"):
    """The sentencepiece model at ``path`` loaded (a ``SentencePieceProcessor``); UserError naming the
    file when it is truncated, empty or not a sentencepiece model."""
    import sentencepiece

    require_file(path, what)
    try:
        return sentencepiece.SentencePieceProcessor(model_file=path)
    except Exception as e:  # RuntimeError "could not parse ModelProto", "unk is not defined", OSError
        raise UserError(f"{what} '{path}' cannot be read (damaged or truncated?): {first_line(e)}") from None


# a tokenizer folder's files: JSON (what it is called, whether a key twice is an error: the
# vocabularies are written by tokenizer libraries, which keep the last), text, sentencepiece
TOKENIZER_JSON = {"tokenizer_config.json": ("tokenizer config", True), "special_tokens_map.json":
                  ("special tokens map", True), "added_tokens.json": ("added tokens file", True),
                  "tokenizer.json": ("tokenizer file", False), "vocab.json": ("tokenizer vocabulary", False)}
TOKENIZER_TEXT = {"merges.txt": "tokenizer merges file", "vocab.txt": "tokenizer vocabulary"}


def check_tokenizer_files(folder: str) -> None:
    """Read every tokenizer file of ``folder`` once (JSON parsed, text decoded, ``*.model``
    sentencepiece models loaded), so a damaged one is a UserError naming it before paddlenlp parses
    it with its own errors.  Files a folder lacks are not checked here."""
    for name, (what, unique) in TOKENIZER_JSON.items():
        if os.path.lexists(os.path.join(folder, name)):  # a folder of that name: the reader says so
            read_json(os.path.join(folder, name), what, unique_keys=unique)
    for name, what in TOKENIZER_TEXT.items():
        if os.path.lexists(os.path.join(folder, name)):
            read_text(os.path.join(folder, name), what)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".model"):
            read_sentencepiece(os.path.join(folder, name))


def read_pickle(path: str, what: str = "file"):
    """The unpickled content of ``path`` (random states of older checkpoints), after
    ``check_pickle`` found only data in it."""
    require_file(path, what)
    check_pickle(path, what)
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as e:  # truncation and damage raise EOFError, UnpicklingError, ValueError, ...
        raise UserError(f"{what} '{path}' cannot be read (damaged or truncated?): {first_line(e)}") from None


def load_paddle_state(path: str, what: str = "weights file"):
    """``paddle.load(path)``; UserError naming the file when it is missing, truncated or damaged."""
    import paddle

    require_file(path, what)
    check_pickle(path, what)
    try:
        return paddle.load(path)
    except Exception as e:  # paddle raises pickle, value and runtime errors for a damaged file
        raise UserError(f"{what} '{path}' cannot be read (damaged or truncated?): {first_line(e)}") from None


@contextmanager
def reading(path: str, what: str):
    """Whatever the body raises while it reads or decodes ``path`` (a checkpoint file: paddle,
    pickle and json raise many kinds on a damaged one) as one line naming it; a ``UserError`` of a
    reader above passes through."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read the {what} '{path}' ({first_line(e)}); the file is damaged: "
                        "resume from another checkpoint") from None
