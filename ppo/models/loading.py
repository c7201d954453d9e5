"""Loading tokenizers and causal LMs from local paddlenlp folders, with one-line errors."""

from __future__ import annotations

import json
import os

from ppo.data import ensure_pad_token
from ppo.errors import UserError


def check_model_path(path: str, what: str = "model_name_or_path") -> dict:
    """The folder's config.json as a dict; UserError when ``path`` is not a saved model."""
    if not path:
        raise UserError(f"'{what}' is empty: give a folder saved with save_pretrained")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"'{what}' = '{path}' is not a model folder (no config.json there); "
                        "this toolkit loads local paddlenlp checkpoints only")
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def load_tokenizer(path: str, what: str = "model_name_or_path"):
    from paddlenlp.transformers import AutoTokenizer

    check_model_path(path, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # paddlenlp raises many types for a folder without tokenizer files
        raise UserError(f"'{what}' = '{path}' has no loadable tokenizer: {str(e).splitlines()[0][:200]}") from None
    return ensure_pad_token(tokenizer)


def check_max_length(config: dict, max_length: int, path: str) -> None:
    limit = config.get("max_position_embeddings")
    if limit and max_length > limit:
        raise UserError(f"max_length={max_length} exceeds the position limit {limit} of the model at '{path}'")


def load_causal_lm(path: str, what: str = "model_name_or_path", **overrides):
    from paddlenlp.transformers import AutoConfig, AutoModelForCausalLM

    check_model_path(path, what)
    config = AutoConfig.from_pretrained(path)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(path, config=config)
