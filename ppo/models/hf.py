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
transformers, [hidden, V] in paddlenlp; a tied head is not stored.  safetensors files are read
and written here (header + raw little-endian data; F32, F16, BF16), so no torch is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile

import numpy as np
import paddle

from ppo.core.errors import UserError
from ppo.storage.files import load_paddle_state, read_json
from ppo.models.families import family_of
from ppo.models.score_model import ScoreModel

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
logger = logging.getLogger("ppo")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# rope types paddlenlp computes exactly as transformers does (others are refused with one line)
_ROPE_TYPES = (None, "default")

# ---------------------------------------------------------------------------------------------
# safetensors, without torch


def _header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def read_safetensors(path: str) -> dict[str, tuple[np.ndarray, str]]:
    """{name: (float32 array, stored dtype "F32" / "F16" / "BF16")} of one safetensors file."""
    header, start = _header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise UserError(f"'{path}': tensor {name} has dtype {info['dtype']}; supported: F32, F16, BF16")
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            raw = np.frombuffer(f.read(end - begin), dtype=_DTYPES[info["dtype"]])
            if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            out[name] = (raw.astype(np.float32).reshape(info["shape"]), info["dtype"])
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write float arrays as one safetensors file in ``dtype`` ("F32" or "BF16", rounded to nearest even)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        a = np.ascontiguousarray(array, dtype=np.float32)
        if dtype == "BF16":
            bits = a.view(np.uint32)
            a = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        blob = a.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)


# ---------------------------------------------------------------------------------------------
# recognising and converting a transformers folder


def weight_files(path: str, what: str = "model_name_or_path") -> list[str]:
    """The safetensors files of a transformers folder (single or sharded; [] when it has none);
    UserError (one line) when the index names a shard that is missing."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        shards = sorted(set(read_json(index, "weight index")["weight_map"].values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(path, shard)):
                raise UserError(f"'{what}' = '{path}' is missing the weight shard '{shard}' named in {INDEX}")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, SINGLE)
    return [single] if os.path.isfile(single) else []


def is_hf_folder(path: str, what: str = "model_name_or_path") -> bool:
    """A transformers-written folder: safetensors weights named ``model.*`` (paddlenlp names them by
    the family prefix) and no paddlenlp ``model_state.pdparams``."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    if os.path.isfile(os.path.join(path, "model_state.pdparams")):
        return False
    # paddlenlp's own safetensors name the backbone by the family prefix; both have lm_head.weight
    return any(name.startswith("model.") for file in weight_files(path, what) for name in _header(file)[0])


def cache_root() -> str:
    """Where converted folders live: ``$PPO_CACHE/converted``, else ``~/.cache/paddle-rlhf/converted``."""
    base = os.environ.get("PPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "paddle-rlhf")
    return os.path.join(base, "converted")


def _cache_key(path: str) -> str:
    digest = hashlib.sha256(os.path.abspath(path).encode("utf-8"))
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            st = os.stat(full)
            digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode("utf-8"))
    return digest.hexdigest()[:20]


def map_config(config: dict, what: str, path: str) -> dict:
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
    if head_dim is not None and int(head_dim) * heads != int(out.get("hidden_size", 0)):
        raise UserError(f"'{what}' = '{path}': head_dim {head_dim} is not hidden_size / num_attention_heads "
                        f"({out.get('hidden_size')} / {heads}); paddlenlp's models support only that head size")
    for key in ("torch_dtype", "transformers_version", "auto_map"):
        out.pop(key, None)
    out["dtype"] = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return out


def _is_linear(name: str) -> bool:
    return name.endswith("_proj.weight")


def hf_to_paddle_state(tensors: dict[str, np.ndarray], prefix: str, tied: bool) -> dict[str, np.ndarray]:
    """transformers names and layouts -> paddlenlp's (see the module docstring)."""
    state = {}
    for name, value in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some versions saved; paddlenlp rebuilds it
            continue
        if name == "lm_head.weight":
            if not tied:
                state[name] = value.T
            continue
        if name.startswith("score."):  # a *ForSequenceClassification head
            state["score_head." + name[len("score."):]] = value.T if name.endswith("weight") else value
            continue
        key = prefix + name[len("model"):] if name.startswith("model.") else name
        state[key] = value.T if _is_linear(name) else value
    return state


def _required(prefix: str, layers: int, tied: bool, score: bool) -> list[str]:
    names = [f"{prefix}.embed_tokens.weight", f"{prefix}.norm.weight"]
    for i in range(layers):
        names += [f"{prefix}.layers.{i}.{p}.weight" for p in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    if score:
        names.append("score_head.weight")
    elif not tied:
        names.append("lm_head.weight")
    return names


def _convert(path: str, target: str, what: str) -> None:
    """Write the paddlenlp folder ``target`` (config.json, model_state.pdparams, the other files of
    ``path``) from the transformers folder ``path``, via a temporary folder renamed at the end."""
    raw = read_json(os.path.join(path, "config.json"), "model config")
    family = family_of(raw, what, path)
    mapped = map_config(raw, what, path)
    tensors, stored = {}, set()
    for file in weight_files(path, what):
        for name, (value, dtype) in read_safetensors(file).items():
            tensors[name] = value
            stored.add(dtype)
    score = any(n.startswith("score.") for n in tensors)
    tied = bool(mapped.get("tie_word_embeddings", "lm_head.weight" not in tensors and not score))
    mapped["tie_word_embeddings"] = tied
    if score:  # our own export of a score model: back to the toolkit's score model
        mapped["score_dim"] = int(tensors["score.weight"].shape[0])
        mapped["score_bias"] = "score.bias" in tensors
        mapped["architectures"] = [family.score_model_class.__name__]
    state = hf_to_paddle_state(tensors, family.prefix, tied)
    missing = [n for n in _required(family.prefix, int(mapped["num_hidden_layers"]), tied, score) if n not in state]
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
        paddle.save({k: paddle.to_tensor(np.ascontiguousarray(v)).astype(dtype) for k, v in state.items()},
                    os.path.join(work, "model_state.pdparams"))
        with open(os.path.join(work, "converted_from.json"), "w", encoding="utf-8") as f:
            json.dump({"source": os.path.abspath(path), "stored_dtypes": sorted(stored)}, f)
        try:
            os.replace(work, target)
        except OSError:
            # another process finished the same conversion (a filesystem where the lock does not hold)
            if not os.path.isfile(os.path.join(target, "model_state.pdparams")):
                raise
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


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
    if not os.path.isfile(os.path.join(target, "model_state.pdparams")):
        os.makedirs(cache_root(), exist_ok=True)
        with _exclusive(target + ".lock"):
            if not os.path.isfile(os.path.join(target, "model_state.pdparams")):
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


def export(model, out_dir: str, tokenizer=None) -> None:
    """Write ``model`` (a causal LM or a score model, whole: not a tensor-parallel shard) as a
    transformers folder in ``out_dir``: config.json, model.safetensors (and the tokenizer's files)."""
    if isinstance(model, ScoreModel):
        model.sync_normalizer_to_config()
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    state = {name: param.astype("float32").numpy() for name, param in model.state_dict().items()}
    _export_state(state, config, out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def export_folder(folder: str, out_dir: str) -> None:
    """Write the paddlenlp folder ``folder`` (a saved, merged model: config.json, model_state.pdparams)
    as a transformers folder in ``out_dir``, its tokenizer files copied along."""
    config = read_json(os.path.join(folder, "config.json"), "model config")
    index = os.path.join(folder, "model_state.pdparams.index.json")
    files = ["model_state.pdparams"]
    if os.path.isfile(index):  # paddlenlp shards large models
        files = sorted(set(read_json(index, "weight index")["weight_map"].values()))
    state = {k: v.astype("float32").numpy() for file in files
             for k, v in load_paddle_state(os.path.join(folder, file)).items()}
    _export_state(state, config, out_dir)
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        if os.path.isfile(full) and name not in _NOT_TOKENIZER and not name.startswith("model_state"):
            shutil.copy2(full, os.path.join(out_dir, name))


_NOT_TOKENIZER = ("config.json", "training_state.json", SINGLE, INDEX)


def _export_state(state: dict, config: dict, out_dir: str) -> None:
    """{paddlenlp name: float32 array} + the paddlenlp config dict -> config.json + model.safetensors."""
    family = family_of(config, "model")
    score = "score_dim" in config
    tied = bool(config.get("tie_word_embeddings", False)) and not score
    prefix = family.prefix + "."
    tensors = {}
    for name, value in state.items():
        if name.startswith(prefix):
            tensors["model." + name[len(prefix):]] = value.T if _is_linear(name) else value
        elif name == "lm_head.weight":
            if not tied:
                tensors[name] = value.T
        elif name.startswith("score_head."):
            tensors["score." + name[len("score_head."):]] = value.T if name.endswith("weight") else value
    dtype = str(config.get("dtype", "float32"))
    hf_config = {k: v for k, v in config.items() if k in _HF_KEYS}
    hf_config.update(model_type=family.name, architectures=[_hf_class(family, score)],
                     tie_word_embeddings=tied, torch_dtype=dtype if dtype in ("float32", "bfloat16") else "float32")
    if score:
        hf_config.update(num_labels=int(config["score_dim"]), score_bias="score.bias" in tensors,
                         score_type=config.get("score_type", "reward"))
        hf_config.update({k: v for k, v in config.items() if k.startswith(("normalizer_", "norm_"))})
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, SINGLE), tensors, "BF16" if dtype == "bfloat16" else "F32")
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)


_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
            "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
            "attention_dropout", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers",
            "use_cache")
