"""Hugging Face (transformers-written) model folders in and out.

In: a folder with ``config.json`` and ``model.safetensors`` (or shards ``model-0000X-of-0000N.safetensors``
with ``model.safetensors.index.json``) whose tensors carry transformers' names (``model.layers.0...``)
is converted ONCE into a paddlenlp folder in the cache (:func:`cache_root`:
``$PPO_CACHE/converted/<key>`` or ``~/.cache/paddle-rlhf/converted/<key>``, the key a hash of the
source path and its files' names, sizes and mtimes) and loaded from there.  The user's folder is
never written to.  One process converts (an exclusive file lock on ``<key>.lock``); every other
process, rank or later run waits for it and reuses the result, so under tensor parallel each rank
then loads its shards from the converted paddlenlp folder.  The conversion is written into a
temporary folder and renamed into place, so no process ever reads a half-written one; where the
lock does not hold (a filesystem without coherent locks) a second converter finds the folder
complete when it renames, drops its copy and uses the first.  Each process logs once which
converted copy a transformers folder loads from.

Out: :func:`export` writes a built model as a transformers folder (``config.json`` +
``model.safetensors``): a causal LM as ``<Family>ForCausalLM``; a score model as
``<Family>ForSequenceClassification`` with ``num_labels = score_dim`` and the head as
``score.weight`` [score_dim, hidden] (transformers' layout; a head bias, which transformers'
class has not, is written as ``score.bias`` and named in the config's ``score_bias``).

The name map (both ways): ``model.`` <-> the family prefix; linear weights are [out, in] in
transformers and [in, out] in paddle (transposed); an untied ``lm_head.weight`` is [V, hidden] in
transformers, [hidden, V] in paddlenlp; a tied head is not stored.  Both ways go through the
``safetensors`` library (``ppo.storage.tensors``), one tensor at a time in its stored dtype, into
shards of at most ``max_shard_size`` (transformers' naming and index), so a conversion or an
export holds the model at most once plus one shard, and a bf16 model never as float32.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile


from ppo.core.errors import UserError
from ppo.storage.files import read_json
from ppo.storage.tensors import (PICKLE_INDEX, PICKLE_WEIGHTS, SAFE_INDEX, SAFE_WEIGHTS, ShardWriter,
                                 index_shards, iter_folder_tensors, open_tensors, tensor_names)
from ppo.models.families import family_of
from ppo.models.score_model import ScoreModel

INDEX = SAFE_INDEX
SINGLE = SAFE_WEIGHTS
DONE = "converted_from.json"  # written last into a converted folder, renamed into place whole
_CACHE_FORMAT = "safetensors-1"  # part of the cache key: copies written by earlier versions are not reused
logger = logging.getLogger("ppo")
# rope types paddlenlp computes exactly as transformers does (others are refused with one line)
_ROPE_TYPES = (None, "default")

# ---------------------------------------------------------------------------------------------
# recognising and converting a transformers folder


def weight_files(path: str, what: str = "model_name_or_path") -> list[str]:
    """The safetensors files of a transformers folder (single or sharded; [] when it has none);
    UserError (one line) when the index is damaged or names a shard that is missing."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        return index_shards(index, f"weight index of '{what}'")
    single = os.path.join(path, SINGLE)
    return [single] if os.path.isfile(single) else []


def is_hf_folder(path: str, what: str = "model_name_or_path") -> bool:
    """A transformers-written folder: safetensors weights named ``model.*`` (paddlenlp names them by
    the family prefix, in safetensors or in a ``model_state.pdparams``)."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    if os.path.isfile(os.path.join(path, PICKLE_WEIGHTS)) or os.path.isfile(os.path.join(path, PICKLE_INDEX)):
        return False
    # paddlenlp's own safetensors name the backbone by the family prefix; both have lm_head.weight
    return any(name.startswith("model.") for file in weight_files(path, what)
               for name in tensor_names(file, f"weights file of '{what}'"))


def cache_root() -> str:
    """Where converted folders live: ``$PPO_CACHE/converted``, else ``~/.cache/paddle-rlhf/converted``."""
    base = os.environ.get("PPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "paddle-rlhf")
    return os.path.join(base, "converted")


def _cache_key(path: str) -> str:
    digest = hashlib.sha256(f"{_CACHE_FORMAT}:{os.path.abspath(path)}".encode("utf-8"))
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            st = os.stat(full)
            digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode("utf-8"))
    return digest.hexdigest()[:20]


def map_config(config: dict, what: str, path: str, free_head_dim: bool = False) -> dict:
    """A transformers config.json (4.x or 5.x layout) as paddlenlp config keys; UserError (one line)
    for a rope scaling this toolkit does not compute."""
    out = dict(config)
    rope = out.pop("rope_parameters", None)  # transformers 5.x keeps rope_theta and the rope type here
    if isinstance(rope, dict):
        if rope.get("rope_type", rope.get("type")) not in _ROPE_TYPES:
            raise UserError(f"'{what}' = '{path}': rope_parameters rope_type "
                            f"{rope.get('rope_type', rope.get('type'))!r} is not supported; supported: default")
        if "rope_theta" in rope:
            out["rope_theta"] = float(rope["rope_theta"])
    scaling = out.pop("rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in _ROPE_TYPES:
        raise UserError(f"'{what}' = '{path}': rope_scaling type "
                        f"{scaling.get('rope_type', scaling.get('type'))!r} is not supported; supported: none, default")
    head_dim, heads = out.get("head_dim"), int(out.get("num_attention_heads") or 1)
    if head_dim is not None and not free_head_dim and int(head_dim) * heads != int(out.get("hidden_size", 0)):
        raise UserError(f"'{what}' = '{path}': head_dim {head_dim} is not hidden_size / num_attention_heads "
                        f"({out.get('hidden_size')} / {heads}); paddlenlp's models support only that head size")
    for key in ("torch_dtype", "transformers_version", "auto_map"):
        out.pop(key, None)
    out["dtype"] = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return out


def _is_linear(name: str) -> bool:
    return name.endswith("_proj.weight")


def paddle_name(name: str, prefix: str, tied: bool) -> str | None:
    """A transformers tensor name as paddlenlp's; None for a tensor paddlenlp does not store (a tied
    head, a saved rotary buffer, which paddlenlp rebuilds)."""
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and tied):
        return None
    if name.startswith("score."):  # a *ForSequenceClassification head
        return "score_head." + name[len("score."):]
    return prefix + name[len("model"):] if name.startswith("model.") else name


def _transposed(name: str) -> bool:
    """Whether a tensor is stored [out, in] by transformers and [in, out] by paddle (either name)."""
    return _is_linear(name) or name in ("lm_head.weight", "score.weight", "score_head.weight")


def _required(family, layers: int, tied: bool, score: bool) -> list[str]:
    prefix = family.prefix
    names = [f"{prefix}.embed_tokens.weight", f"{prefix}.norm.weight"]
    for i in range(layers):
        names += [f"{prefix}.layers.{i}.{p}.weight" for p in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
            *family.extra_layer_tensors)]
    if score:
        names.append("score_head.weight")
    elif not tied:
        names.append("lm_head.weight")
    return names


def _convert(path: str, target: str, what: str) -> None:
    """Write the paddlenlp folder ``target`` (config.json, safetensors weights, the other files of
    ``path``) from the transformers folder ``path``, via a temporary folder renamed at the end.
    Tensors are read one at a time and written shard by shard (:class:`ShardWriter`), so the
    conversion holds at most one output shard, in the stored dtype."""
    raw = read_json(os.path.join(path, "config.json"), "model config")
    family = family_of(raw, what, path)
    mapped = map_config(raw, what, path, family.free_head_dim)
    files = weight_files(path, what)
    label = f"weights file of '{what}'"
    names = {name: file for file in files for name in tensor_names(file, label)}
    score = any(n.startswith("score.") for n in names)
    tied = bool(mapped.get("tie_word_embeddings", "lm_head.weight" not in names and not score))
    mapped["tie_word_embeddings"] = tied
    if score:  # our own export of a score model: back to the toolkit's score model
        with open_tensors(names["score.weight"], label) as f:
            mapped["score_dim"] = int(f.get("score.weight").shape[0])
        mapped["score_bias"] = "score.bias" in names
        mapped["architectures"] = [family.score_model_class.__name__]
    mapped_names = {paddle_name(n, family.prefix, tied) for n in names}
    missing = [n for n in _required(family, int(mapped["num_hidden_layers"]), tied, score)
               if n not in mapped_names]
    if missing:
        raise UserError(f"'{what}' = '{path}' has no tensor for {missing[0]} ({len(missing)} missing); "
                        "is it a complete transformers checkpoint?")
    dtype = mapped["dtype"] if mapped["dtype"] in ("float32", "bfloat16", "float16") else "float32"
    mapped["dtype"] = dtype
    os.makedirs(os.path.dirname(target), exist_ok=True)
    work = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=os.path.dirname(target))
    try:
        for name in os.listdir(path):  # tokenizer, generation config, chat template: copied as they are
            full = os.path.join(path, name)
            if os.path.isfile(full) and not name.endswith(".safetensors") and name not in ("config.json", INDEX):
                shutil.copy2(full, os.path.join(work, name))
        family.config_class(**mapped).save_pretrained(work)
        writer, stored = ShardWriter(work, "model"), set()
        for file in files:
            with open_tensors(file, label) as f:
                for name in f.keys():
                    stored.add(f.dtype(name))
                    key = paddle_name(name, family.prefix, tied)
                    if key is not None:
                        value = family.from_hf(name, f.get(name), mapped)
                        writer.add(key, _cast(value.T if _transposed(name) else value, dtype))
        writer.close()
        with open(os.path.join(work, DONE), "w", encoding="utf-8") as f:
            json.dump({"source": os.path.abspath(path), "stored_dtypes": sorted(stored)}, f)
        try:
            os.replace(work, target)
        except OSError:
            # another process finished the same conversion (a filesystem where the lock does not hold)
            if not os.path.isfile(os.path.join(target, DONE)):
                raise
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _cast(value, dtype: str):
    """``value`` in ``dtype`` (a copy of this one tensor only when it differs)."""
    return value if str(value.dtype).split(".")[-1] == dtype else value.astype(dtype)


@contextlib.contextmanager
def _exclusive(lock_path: str):
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # one converter; the others wait here, then reuse its folder
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve(path: str, what: str = "model_name_or_path") -> str:
    """``path`` itself for a paddlenlp folder; for a transformers folder, its converted paddlenlp copy
    in the cache (converted on first use, by one process)."""
    if not is_hf_folder(path, what):
        return path
    target = os.path.join(cache_root(), _cache_key(path))
    if not os.path.isfile(os.path.join(target, DONE)):
        os.makedirs(cache_root(), exist_ok=True)
        with _exclusive(target + ".lock"):
            if not os.path.isfile(os.path.join(target, DONE)):
                logger.info("converting the transformers folder %s into %s (once: later runs reuse it)",
                            path, target)
                _convert(path, target, what)
    if (path, target) not in _ANNOUNCED:  # once per folder and process, however often it is loaded
        _ANNOUNCED.add((path, target))
        logger.info("the transformers folder %s loads from its converted copy %s", path, target)
    return target


_ANNOUNCED: set = set()


# ---------------------------------------------------------------------------------------------
# export


def _hf_class(family, score: bool) -> str:
    name = family.causal_lm_class.__name__
    return name.replace("ForCausalLM", "ForSequenceClassification") if score else name


def export(model, out_dir: str, tokenizer=None, shard_size=None) -> None:
    """Write ``model`` (a causal LM or a score model, whole: not a tensor-parallel shard) as a
    transformers folder in ``out_dir``: config.json, safetensors weights (sharded at
    ``shard_size``, default the ``max_shard_size`` argument) and the tokenizer's files."""
    if isinstance(model, ScoreModel):
        model.sync_normalizer_to_config()
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    _export_tensors(model.state_dict().items(), config, out_dir, shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def export_folder(folder: str, out_dir: str, shard_size=None) -> None:
    """Write the paddlenlp folder ``folder`` (a saved, merged model: config.json and its weights, in
    safetensors or pickled) as a transformers folder in ``out_dir``, one tensor at a time, its
    tokenizer files copied along."""
    config = read_json(os.path.join(folder, "config.json"), "model config")
    _export_tensors(iter_folder_tensors(folder), config, out_dir, shard_size)
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        if os.path.isfile(full) and name not in _NOT_TOKENIZER and not name.startswith(("model_state", "model.",
                                                                                          "model-")):
            shutil.copy2(full, os.path.join(out_dir, name))


_NOT_TOKENIZER = ("config.json", "training_state.json", SINGLE, INDEX)


def _export_tensors(items, config: dict, out_dir: str, shard_size=None) -> None:
    """(paddlenlp name, tensor) pairs + the paddlenlp config dict -> config.json + safetensors shards,
    each tensor cast to the config's dtype on its own (no float32 copy of a bf16 model)."""
    family = family_of(config, "model")
    score = "score_dim" in config
    tied = bool(config.get("tie_word_embeddings", False)) and not score
    prefix = family.prefix + "."
    dtype = str(config.get("dtype", "float32"))
    dtype = dtype if dtype in ("float32", "bfloat16") else "float32"
    os.makedirs(out_dir, exist_ok=True)
    writer, has_bias = ShardWriter(out_dir, "model", shard_size, {"format": "pt"}), False
    for name, value in items:
        if name.startswith(prefix):
            key = "model." + name[len(prefix):]
        elif name == "lm_head.weight" and not tied:
            key = name
        elif name.startswith("score_head."):
            key = "score." + name[len("score_head."):]
            has_bias |= key == "score.bias"
        else:
            continue
        writer.add(key, _cast(family.to_hf(key, value.T if _transposed(name) else value, config), dtype))
    writer.close()
    hf_config = {k: v for k, v in config.items() if k in _HF_KEYS or k in family.extra_config_keys}
    hf_config.update(model_type=family.name, architectures=[_hf_class(family, score)],
                     tie_word_embeddings=tied, torch_dtype=dtype)
    if score:
        hf_config.update(num_labels=int(config["score_dim"]), score_bias=has_bias,
                         score_type=config.get("score_type", "reward"))
        hf_config.update({k: v for k, v in config.items() if k.startswith(("normalizer_", "norm_"))})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)


_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
            "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
            "attention_dropout", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers",
            "use_cache")
