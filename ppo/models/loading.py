"""Loading tokenizers, causal LMs and score models from local paddlenlp or transformers folders, with
one-line errors.

A transformers folder is converted once into the cache and loaded from there (``ppo.models.hf``).
A score model's class comes from the folder's model family (``ppo.models.families``)."""

from __future__ import annotations

import os
import pickle

from ppo.data import ensure_pad_token
from ppo.core.errors import UserError
from ppo.models import cpu_gemm, fast_paths, hf
from ppo.storage.files import check_pickle, check_tokenizer_files, first_line, read_json
from ppo.storage.tensors import model_weight_files, tensor_names, weights_problem
from ppo.models.families import family_of
from ppo.models.score_model import init_score_head


def check_model_path(path: str, what: str = "model_name_or_path") -> dict:
    """The folder's config.json as a dict; UserError when ``path`` is not a saved model."""
    if not path:
        raise UserError(f"'{what}' is empty: give a folder saved with save_pretrained")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"'{what}' = '{path}' is not a model folder (no config.json there); "
                        "this toolkit loads local paddlenlp or transformers (safetensors) checkpoints")
    return read_json(config_file, "model config")


def check_weights_present(path: str, what: str = "model_name_or_path") -> None:
    """UserError (one line) when the model folder ``path`` holds no weights file."""
    problem = weights_problem(path) if os.path.isdir(path) else None
    if problem:
        raise UserError(f"'{what}' = '{path}' {problem}; give a complete model folder")


def load_tokenizer(path: str, what: str = "model_name_or_path"):
    from paddlenlp.transformers import AutoTokenizer

    check_model_path(path, what)
    check_tokenizer_files(path)  # a damaged file: one line naming it (the user's file, not the cache's copy)
    folder = hf.resolve(path, what)
    # a fast tokenizer where tokenizer.json exists: paddlenlp's slow Qwen2 tokenizer can give other ids
    fast = os.path.isfile(os.path.join(folder, "tokenizer.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **({"use_fast": True} if fast else {}))
    except Exception as e:  # paddlenlp raises many types for a folder without (usable) tokenizer files
        missing = _missing_tokenizer_files(folder)
        if missing:
            raise UserError(f"'{what}' = '{path}' has no loadable tokenizer: it lacks {', '.join(missing)}; give "
                            "the folder with its tokenizer files") from None
        raise UserError(f"'{what}' = '{path}' has no loadable tokenizer: {first_line(e)}") from None
    return ensure_pad_token(tokenizer)


def _missing_tokenizer_files(folder: str) -> list[str]:
    """The files the tokenizer class of ``folder``'s tokenizer_config.json reads that are not there
    (``'sentencepiece.bpe.model' (vocab_file of LlamaTokenizer)``)."""
    import paddlenlp.transformers as transformers

    try:
        name = read_json(os.path.join(folder, "tokenizer_config.json"), "tokenizer config").get("tokenizer_class")
    except UserError:
        return []
    files = getattr(getattr(transformers, str(name), None), "resource_files_names", None) or {}
    return [f"'{file}' ({key} of {name})" for key, file in files.items()
            if not os.path.isfile(os.path.join(folder, file))]


def check_max_length(config: dict, max_length: int, path: str) -> None:
    """``max_length`` within the model's positions and within its sliding attention window, if any."""
    limit = config.get("max_position_embeddings")
    if limit and max_length > limit:
        raise UserError(f"max_length={max_length} exceeds the position limit {limit} of the model at '{path}'")
    try:
        window = family_of(config).attention_window(config)
    except UserError:  # not a supported family: its loader stops with the line naming the argument
        return
    if window and max_length > window:
        raise UserError(f"max_length={max_length} exceeds the sliding attention window {window} of the model at "
                        f"'{path}' (paddlenlp attends over the whole sequence, so longer sequences would not "
                        f"match the model); use max_length <= {window}")


def check_family(saved: dict, path: str, what: str):
    """The family of a saved model (its config.json dict); UserError (one line) when the toolkit
    cannot run that model."""
    family = family_of(saved, what, path)
    reason = family.unsupported(saved)
    if reason:
        raise UserError(f"'{what}' = '{path}' {reason}")
    return family


# ---------------------------------------------------------------------------------------------
# Roles: a model of the wrong kind stops with one line instead of training on random weights


def check_causal_lm_role(saved: dict, path: str, what: str) -> None:
    """The actor, its reference and the SFT base are causal LMs: a saved score model is not one."""
    if "score_dim" in saved or "score_type" in saved:
        raise UserError(f"'{what}' = '{path}' is a score model (its config has a score head, score_type "
                        f"{saved.get('score_type')!r}); give a causal LM (an SFT or base model) here")


def check_reward_role(saved: dict, path: str, what: str) -> None:
    """The frozen reward model must be a trained score model, not a causal LM with a new head."""
    if "score_dim" not in saved:
        raise UserError(f"'{what}' = '{path}' is a causal LM without a trained score head: its scores would "
                        "come from random weights; give a reward model trained with rm/run_reward.py")


def check_no_missing_weights(missing, path: str, what: str, allowed: tuple = ()) -> None:
    """Every parameter came from the checkpoint (except the ``allowed`` prefixes, a new score head)."""
    missing = [k for k in missing or () if not (allowed and k.startswith(allowed))]
    if missing:
        raise UserError(f"'{what}' = '{path}' lacks {len(missing)} trained tensor(s) the model needs (e.g. "
                        f"'{missing[0]}'), which would start from random weights; give a complete checkpoint")


def _from_pretrained_missing(cls, path: str, **kwargs):
    """``cls.from_pretrained(path, **kwargs)`` and the parameter names it newly initialised; the
    weights files it will read are checked first: a safetensors header (and its index) must be
    whole, a pickle must hold nothing but data (``check_pickle``)."""
    from paddlenlp.transformers.model_utils import PretrainedModel

    check_weights_present(path, kwargs.pop("what", "model_name_or_path"))
    for file in model_weight_files(path) if os.path.isdir(path) else ():
        if file.endswith(".safetensors"):
            tensor_names(file, "weights file")  # a truncated or damaged file: one line naming it
        else:
            check_pickle(file, "weights file")
    original = PretrainedModel.__dict__["_load_pretrained_model"]
    missing: list = []

    def spy(klass, *args, **kw):  # paddlenlp reports missing keys only in a log line; keep them
        out = original.__func__(klass, *args, **kw)
        missing.extend(out[1] or ())
        return out

    PretrainedModel._load_pretrained_model = classmethod(spy)
    try:
        return cls.from_pretrained(path, **kwargs), missing
    except (ValueError, EOFError, pickle.UnpicklingError) as e:  # what paddle.load raises on damage
        raise UserError(f"weights of the model at '{path}' cannot be read (damaged or truncated?): "
                        f"{type(e).__name__}: {str(e).strip()[:200]}") from None
    finally:
        PretrainedModel._load_pretrained_model = original


def freeze(model):
    """``model`` in eval mode with no parameter taking gradients (a frozen role: reference, reward)."""
    model.eval()
    for p in model.parameters():
        p.stop_gradient = True
    return model


def load_causal_lm(path: str, what: str = "model_name_or_path", **overrides):
    check_causal_lm_role(check_model_path(path, what), path, what)
    source, path = path, hf.resolve(path, what)
    family = check_family(check_model_path(path, what), source, what)
    config = family.config_class.from_pretrained(path)  # (paddlenlp's AutoConfig knows no qwen3)
    for key, value in overrides.items():
        setattr(config, key, value)
    # the family's class: paddlenlp's, or the family's correction of it (ppo/models/families/mistral.py)
    model, missing = _from_pretrained_missing(family.causal_lm_class, path, config=config, what=what)
    # a tied head is the input embedding itself: a checkpoint need not (transformers does not) store it
    tied = ("lm_head.",) if getattr(config, "tie_word_embeddings", False) else ()
    check_no_missing_weights(missing, path, what, allowed=tied)
    # fused RMSNorm, transpose_y attention, rotate_half; oneDNN matmuls where active (same results,
    # faster on CPU)
    fast_paths.install_rotate_half(family.rotary_module)
    return cpu_gemm.install(fast_paths.install(model))


def load_score_model(path: str, score_type: str = "reward", score_dim: int = 1, score_bias: bool = True,
                     what: str = "model_name_or_path", trained_head: bool = False, **config_overrides):
    """Load a score model (the family's ``score_model_class``), or start one from a causal-LM
    checkpoint of that family (new head, fixed-seed init).

    A saved score model whose head shape differs from ``score_dim`` is rejected with one line;
    ``trained_head`` (the frozen reward model) rejects a causal LM, whose head would be new.
    """
    check_model_path(path, what)
    path = hf.resolve(path, what)
    saved = check_model_path(path, what)
    if trained_head:
        check_reward_role(saved, path, what)
    family = check_family(saved, path, what)
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
        model, missing = _from_pretrained_missing(family.score_model_class, path, config=config, what=what)
    except RuntimeError as e:
        if "score_head" in str(e):
            raise UserError(f"'{what}' = '{path}': score head shape in the weights does not match its "
                            f"config (score_dim={config.score_dim}, score_bias={config.score_bias})") from None
        raise
    check_no_missing_weights(missing, path, what, allowed=() if is_score else ("score_head.",))
    if not is_score:
        init_score_head(model)
    fast_paths.install_rotate_half(family.rotary_module)
    return cpu_gemm.install(fast_paths.install(model))
