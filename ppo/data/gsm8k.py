"""GSM8K grade-school math (``openai/gsm8k``, configuration ``main``) and a generic prompt + reference schema.

GSM8K records hold ``question`` and ``answer``, a worked solution ending in ``#### <final answer>``.
A sample's ``input`` is the question, its ``answer`` the whole solution (for SFT) and its
``reference`` the final answer after ``####`` (for reward functions such as ``math_exact``).
"""

from __future__ import annotations

import glob
import os
from typing import ClassVar

from ppo.data.base import (
    RawSample,
    SampleListDataset,
    describe_source,
    load_records,
    require_fields,
    require_type,
)
from ppo.core.errors import UserError

FIELDS = ("question", "answer")


def final_answer(solution: str) -> str | None:
    """The text after the last ``####`` of a GSM8K solution, stripped (``"1,234"`` stays as written)."""
    if "####" not in solution:
        return None
    return solution.rsplit("####", 1)[1].strip() or None


def to_sample(record: dict, source: str, index: int) -> RawSample:
    require_fields(record, FIELDS, source, index)
    question = require_type(record, "question", str, source, index, "a string")
    solution = require_type(record, "answer", str, source, index, "a string ending in '#### <final answer>'")
    reference = final_answer(solution)
    if reference is None:
        raise UserError(f"{source} record {index} field 'answer' has no '#### <final answer>' line "
                        f"(ends {solution[-40:]!r}); expected a GSM8K solution")
    return RawSample(input=question, answer=solution, reference=reference)


def gsm8k_files(folder: str, split: str) -> list[str]:
    """Shards of ``split`` in a local copy of the hub repository (``main/{split}-*.parquet``) or of
    its ``main`` folder (``{split}-*.parquet``); [] when neither is there."""
    for pattern in (os.path.join("main", f"{split}-*.parquet"), f"{split}-*.parquet"):
        files = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
        if files:
            return files
    return []


class GSM8KBase(SampleListDataset):
    """``SPLIT`` of hub dataset openai/gsm8k (main), or a local copy: the repository folder (with
    ``main/{split}-*.parquet``), its ``main`` folder, any folder ``load_records`` reads, or one
    ``.jsonl``/``.json``/``.parquet`` file with fields ``question`` and ``answer``."""

    HUB_ID: ClassVar[str] = "openai/gsm8k"
    HUB_CONFIG: ClassVar[str] = "main"
    SPLIT: ClassVar[str]

    def __init__(self, path: str | None = None):
        folder = os.path.expanduser(path) if path is not None else None
        files = gsm8k_files(folder, self.SPLIT) if folder is not None and os.path.isdir(folder) else []
        if files:
            records = [r for file in files for r in load_records(file)]
        else:
            records = load_records(path, self.SPLIT, hub_id=self.HUB_ID, name=self.NAME, hub_config=self.HUB_CONFIG)
        source = describe_source(self.NAME, path, self.HUB_ID)
        self.samples = [to_sample(r, source, i) for i, r in enumerate(records)]


class GSM8KTrain(GSM8KBase):
    NAME = "gsm8k/train"
    ALIASES = ("gsm8k", "openai/gsm8k/train")
    SPLIT = "train"


class GSM8KTest(GSM8KBase):
    NAME = "gsm8k/test"
    ALIASES = ("openai/gsm8k/test",)
    SPLIT = "test"


class PromptReference(SampleListDataset):
    """A local file of ``{"prompt": str, "reference": str | number}`` records (and an optional
    ``answer`` string for SFT), e.g. JSON lines; numbers are kept as their text (``42`` -> ``"42"``).

    A folder holds ``train.jsonl`` (or the other forms ``load_records`` reads).
    """

    NAME = "prompt-reference"

    def __init__(self, path: str | None = None):
        if path is None:
            raise UserError("dataset 'prompt-reference' needs a local path: give it as "
                            "'prompt-reference:1.0:/path/to/file.jsonl' with fields prompt, reference")
        source = describe_source(self.NAME, path)
        self.samples = []
        for i, record in enumerate(load_records(path, name=self.NAME)):
            require_fields(record, ("prompt", "reference"), source, i)
            sample = RawSample(input=require_type(record, "prompt", str, source, i, "a string"),
                               reference=_reference_text(record, source, i))
            if record.get("answer") is not None:
                sample["answer"] = require_type(record, "answer", str, source, i, "a string or nothing")
            self.samples.append(sample)


def _reference_text(record: dict, source: str, index: int) -> str:
    value = require_type(record, "reference", (str, int, float), source, index, "a string or a number")
    if isinstance(value, bool):
        require_type(record, "reference", str, source, index, "a string or a number")
    return value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
