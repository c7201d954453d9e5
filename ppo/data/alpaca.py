"""Stanford Alpaca instruction data (``tatsu-lab/alpaca``): supervised samples, no preferences."""

from __future__ import annotations

from ppo.data.base import (
    RawSample,
    SampleListDataset,
    describe_source,
    load_records,
    require_fields,
    require_type,
)

FIELDS = ("instruction", "output")  # plus an optional 'input' giving context to the instruction


def to_sample(record: dict, source: str, index: int) -> RawSample:
    """``input`` is the instruction, followed by a blank line and the record's input when it has one."""
    require_fields(record, FIELDS, source, index)
    instruction = require_type(record, "instruction", str, source, index, "a string")
    answer = require_type(record, "output", str, source, index, "a string")
    context = record.get("input") or ""
    if not isinstance(context, str):
        require_type(record, "input", str, source, index, "a string or nothing")
    return RawSample(input=instruction + ("\n\n" + context if context else ""), answer=answer)


class Alpaca(SampleListDataset):
    NAME = "alpaca"
    ALIASES = ("tatsu-lab/alpaca",)
    HUB_ID = "tatsu-lab/alpaca"

    def __init__(self, path: str | None = None):
        records = load_records(path, "train", hub_id=self.HUB_ID, name=self.NAME)
        source = describe_source(self.NAME, path, self.HUB_ID)
        self.samples = [to_sample(r, source, i) for i, r in enumerate(records)]
