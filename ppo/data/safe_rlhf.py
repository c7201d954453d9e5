"""PKU-Alignment's safe-rlhf preference data (PKU-SafeRLHF and its 30K/10K subsets).

Every record holds a prompt, two responses, which response is better (more helpful) and which
is safer, and a safety label per response.
"""

from __future__ import annotations

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

FIELDS = ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
          "is_response_0_safe", "is_response_1_safe")


def _response_id(record: dict, field: str, source: str, index: int) -> int:
    value = record[field]
    if isinstance(value, bool) or value not in (0, 1):
        raise UserError(f"{source} record {index} field '{field}' is {value!r}; expected 0 or 1")
    return int(value)


def to_sample(record: dict, source: str, index: int) -> RawSample:
    """One PKU-SafeRLHF record as a RawSample (response_0 is ``answer``, response_1 ``other_answer``)."""
    require_fields(record, FIELDS, source, index)
    for field in ("prompt", "response_0", "response_1"):
        require_type(record, field, str, source, index, "a string")
    for field in ("is_response_0_safe", "is_response_1_safe"):
        require_type(record, field, bool, source, index, "true or false")
    return RawSample(
        input=record["prompt"],
        answer=record["response_0"],
        other_answer=record["response_1"],
        better=_response_id(record, "better_response_id", source, index) == 0,
        safer=_response_id(record, "safer_response_id", source, index) == 0,
        is_safe=record["is_response_0_safe"],
        is_other_safe=record["is_response_1_safe"],
    )


class PKUSafeRLHFBase(SampleListDataset):
    """Loads ``SPLIT`` of hub dataset ``HUB_ID``, or a local file/folder with the same fields.

    The records are checked and converted up front: a bad record fails at start-up, not mid-run.
    """

    HUB_ID: ClassVar[str]
    SPLIT: ClassVar[str]

    def __init__(self, path: str | None = None):
        records = load_records(path, self.SPLIT, hub_id=self.HUB_ID, name=self.NAME)
        source = describe_source(self.NAME, path, self.HUB_ID)
        self.samples = [to_sample(r, source, i) for i, r in enumerate(records)]


class PKUSafeRLHFTrain(PKUSafeRLHFBase):
    NAME = "PKU-SafeRLHF/train"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF/train",)
    HUB_ID, SPLIT = "PKU-Alignment/PKU-SafeRLHF", "train"


class PKUSafeRLHFTest(PKUSafeRLHFBase):
    NAME = "PKU-SafeRLHF/test"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF/test",)
    HUB_ID, SPLIT = "PKU-Alignment/PKU-SafeRLHF", "test"


class PKUSafeRLHF30KTrain(PKUSafeRLHFBase):
    NAME = "PKU-SafeRLHF-30K/train"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF-30K/train",)
    HUB_ID, SPLIT = "PKU-Alignment/PKU-SafeRLHF-30K", "train"


class PKUSafeRLHF30KTest(PKUSafeRLHFBase):
    NAME = "PKU-SafeRLHF-30K/test"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF-30K/test",)
    HUB_ID, SPLIT = "PKU-Alignment/PKU-SafeRLHF-30K", "test"


class PKUSafeRLHF10KTrain(PKUSafeRLHFBase):
    NAME = "PKU-SafeRLHF-10K/train"
    ALIASES = ("PKU-Alignment/PKU-SafeRLHF-10K/train",)
    HUB_ID, SPLIT = "PKU-Alignment/PKU-SafeRLHF-10K", "train"
