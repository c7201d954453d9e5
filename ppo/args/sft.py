"""The SFT stage's arguments (``ppo/run_sft.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ppo.args.common import DataArgs, ParallelArgs, TrainingArgs, arg, validate_shared


@dataclass
class SFTArgs(TrainingArgs, ParallelArgs, DataArgs):
    model_name_or_path: str = arg("", "Causal LM to fine-tune (paddlenlp format).", path="path")

    def validate(self) -> None:
        validate_shared(self)
