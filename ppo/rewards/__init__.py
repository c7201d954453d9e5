"""Reward functions registered by NAME (``math_exact``, ``format``, ``overlong``, ``remote``), the
``reward_functions`` spec and the weighted combination of their scores.

Importing this package registers the built-ins.
"""

from ppo.rewards.base import (
    RewardFunction,
    RewardScores,
    RewardSpec,
    build_reward_functions,
    combine,
    parse_reward_functions,
    run_options,
)
from ppo.rewards.builtin import (
    DEFAULT_FORMAT_PATTERN,
    answers_equal,
    extract_answer,
    parse_number,
    reference_answer,
)
from ppo.rewards.remote import check_reachable, post_batch

__all__ = [
    "DEFAULT_FORMAT_PATTERN", "RewardFunction", "RewardScores", "RewardSpec", "answers_equal",
    "build_reward_functions", "check_reachable", "combine", "extract_answer", "parse_number",
    "parse_reward_functions", "post_batch", "reference_answer", "run_options",
]
