"""Loading tokenizers, causal LMs and score models from local paddlenlp folders, with one-line errors.

A score model's class comes from the folder's model family (``ppo.models.families``)."""

from __future__ import annotations

import os

from ppo.data import ensure_pad_token
from ppo.errors import UserError
from ppo.files import read_json
from ppo.models.families import family_of
from ppo.models.score_model import init_score_head


def check_model_path(path: str, what: str = "model_name_or_path") -> dict:
    """The folder's config.json as a dict; UserError when ``path`` is not a saved model."""
    if not path:
        raise UserError(f"'{what}' is empty: give a folder saved with save_pretrained")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"'{what}' = '{path}' is not a model folder (no config.json there); "
                        "this toolkit loads local paddlenlp checkpoints only")
    return read_json(config_file, "model config")


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


def load_score_model(path: str, score_type: str = "reward", score_dim: int = 1, score_bias: bool = True,
                     what: str = "model_name_or_path", **config_overrides):
    """Load a score model (the family's ``score_model_class``), or start one from a causal-LM
    checkpoint of that family (new head, fixed-seed init).

    A saved score model whose head shape differs from ``score_dim`` is rejected with one line.
    """
    saved = check_model_path(path, what)
    family = family_of(saved, what, path)
    is_score = "score_dim" in saved
    if is_score and int(saved["score_dim"]) != score_dim:
        raise UserError(f"'{what}' = '{path}' has a score head of dim {saved['score_dim']}, "
                        f"but score_dim={score_dim} was asked for")
    config = family.config_class.from_pretrained(path)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config.score_type = score_type
    if not is_score:
        config.score_dim, config.score_bias = score_dim, score_bias
    try:
        model = family.score_model_class.from_pretrained(path, config=config)
    except RuntimeError as e:
        if "score_head" in str(e):
            raise UserError(f"'{what}' = '{path}': score head shape in the weights does not match its "
                            f"config (score_dim={config.score_dim}, score_bias={config.score_bias})") from None
        raise
    if not is_score:
        init_score_head(model)
    return model
