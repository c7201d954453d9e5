"""Reward functions for the multi-rank runs of test_ppo_rewards.py (loaded with ``extra_modules``).

Each appends every call (the calling rank, prompts, responses, scores) to
``<output_dir>/reward_calls/rank-<k>.jsonl``, so a test sees which ranks scored which rows and what
they got: exactly one caller per row, and the same scores as one process.
"""

import json
import os
import re

from ppo.rewards import RewardFunction


def first_operand(prompt: str) -> int:
    """``a`` of the arithmetic prompt's ``a + b`` / ``a - b`` (every phrasing of the task)."""
    return int(re.search(r"(\d+) [+-] \d+[?.]", prompt).group(1))


class _Recorded(RewardFunction):
    def __init__(self, output_dir: str = ""):
        self.output_dir = output_dir

    def score(self, prompts, responses) -> list[float]:
        raise NotImplementedError

    def __call__(self, prompts, responses, response_ids, references, **context):
        scores = self.score(prompts, responses)
        folder = os.path.join(self.output_dir, "reward_calls")
        os.makedirs(folder, exist_ok=True)
        rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
        with open(os.path.join(folder, f"rank-{rank}.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": rank, "prompts": prompts, "responses": responses, "scores": scores}) + "\n")
        return scores


class ResponseChars(_Recorded):
    """The number of characters of the response (deterministic, different across rows)."""

    NAME = "test-response-chars"

    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]


class EvenGatedRamp(_Recorded):
    """For dynamic sampling with greedy groups of 2: row ``i`` of a call scores ``(i % 2) * (a + 1)``
    when the prompt's first operand ``a`` is even, else 0.  So a group has a group advantage exactly
    when ``a`` is even, and the mean score of a batch tells which groups it holds."""

    NAME = "test-even-gated-ramp"

    def score(self, prompts, responses):
        return [float(i % 2) * (first_operand(p) + 1) if first_operand(p) % 2 == 0 else 0.0
                for i, p in enumerate(prompts)]
