"""Prompt template shared by every dataset (safe-rlhf's conversation format by default)."""

DEFAULT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"

# Later user turns of a dialogue: each follows the previous assistant turn and its eos token.
DEFAULT_FOLLOW_TEMPLATE = " USER: {input} ASSISTANT:"
