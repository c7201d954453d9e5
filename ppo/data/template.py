"""Prompt template shared by every dataset (safe-rlhf's conversation format by default)."""

DEFAULT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
