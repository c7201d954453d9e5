"""A user-defined reward function, as a user writes it; tests import it with import_user_modules."""

from ppo.rewards import RewardFunction


class ShortIsGood(RewardFunction):
    NAME = "short-is-good"

    def __init__(self, max_new_tokens=None):
        self.max_new_tokens = max_new_tokens

    def __call__(self, prompts, responses, response_ids, references, **context):
        return [1.0 - len(ids) / context["max_new_tokens"] for ids in response_ids]
