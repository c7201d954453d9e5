"""Tensor files through the ``safetensors`` library: read lazily, written shard by shard.

Every tensor file the toolkit writes is safetensors (a JSON header and raw little-endian data, so
reading one runs nothing): model weights, LoRA adapters, optimizer state, the converted copies of
transformers folders.  Reading goes through ``safe_open`` (memory-mapped, one tensor at a time,
in its stored dtype: bfloat16 stays bfloat16); a damaged, truncated or mistyped file is one line
naming it.  Writing goes through :class:`ShardWriter`, which cuts the tensors into files of at most
``max_shard_size`` bytes the way transformers does (``model-00001-of-00003.safetensors`` and a
``model.safetensors.index.json`` naming the file of every tensor; one ``model.safetensors`` when
everything fits), holding at most one shard in memory.

A model folder's weights (:func:`model_weight_files`, :func:`iter_folder_tensors`,
:func:`folder_state`) are read in any of the layouts paddlenlp and transformers write:
``model.safetensors``, safetensors shards with their index, and, from outside or from older
versions of this toolkit, ``model_state.pdparams`` (a pickle, read only after
``ppo.storage.safe_pickle.check_pickle`` found nothing but data in it) and its shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from ppo.core.errors import UserError
from ppo.storage.files import first_line, load_paddle_state, read_json, require_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "model_state.pdparams"
PICKLE_INDEX = "model_state.pdparams.index.json"
DEFAULT_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


_SHARD_SIZE = [DEFAULT_SHARD_SIZE]


def set_max_shard_size(value) -> None:
    """The shard size of every model folder written from now on (the ``max_shard_size`` argument)."""
    _SHARD_SIZE[0] = parse_size(value)


def max_shard_size() -> int:
    """Bytes per weights shard of saved, converted and exported model folders (default 5GB, transformers')."""
    return parse_size(_SHARD_SIZE[0])


def parse_size(value, what: str = "max_shard_size") -> int:
    """Bytes of a size written as transformers writes it: an int, or ``"5GB"`` (10^9), ``"500MiB"``
    (2^20); UserError (one line) for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value).upper())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"{what}={value!r} is not a size; give bytes or a number with KB, MB, GB (or KiB, "
                        "MiB, GiB), e.g. 5GB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@contextlib.contextmanager
def open_tensors(path: str, what: str = "weights file"):
    """``safe_open(path)`` (paddle tensors, memory-mapped); UserError naming the file when it is
    missing, a directory, empty, truncated or not safetensors."""
    from safetensors import safe_open

    require_file(path, what)
    try:
        handle = safe_open(path, framework="paddle")
        handle.__enter__()
    except Exception as e:  # SafetensorError (header too large / incomplete / invalid), OSError
        raise UserError(f"{what} '{path}' cannot be read (damaged, truncated or not safetensors?): "
                        f"{first_line(e)}") from None
    try:
        yield _Checked(handle, path, what)
    finally:
        handle.__exit__(None, None, None)


class _Checked:
    """A ``safe_open`` handle whose reads of a damaged tensor are one line naming the file."""

    def __init__(self, handle, path: str, what: str):
        self._handle, self.path, self.what = handle, path, what

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def metadata(self) -> dict:
        return self._handle.metadata() or {}

    def dtype(self, name: str) -> str:
        return self._handle.get_slice(name).get_dtype()

    def get(self, name: str):
        try:
            return self._handle.get_tensor(name)
        except Exception as e:  # a dtype paddle has not, a short data section
            raise UserError(f"{self.what} '{self.path}': tensor '{name}' cannot be read: {first_line(e)}") from None


def tensor_names(path: str, what: str = "weights file") -> list[str]:
    """The tensor names of one safetensors file (its header only)."""
    with open_tensors(path, what) as f:
        return f.keys()


def read_tensors(path: str, what: str = "tensor file") -> dict:
    """{name: paddle tensor} of one (small) safetensors file: optimizer state, adapters."""
    with open_tensors(path, what) as f:
        return {name: f.get(name) for name in f.keys()}


def save_tensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """``tensors`` ({name: paddle tensor or numpy array}) as one safetensors file."""
    from safetensors.paddle import save_file

    save_file({k: _contiguous(v) for k, v in tensors.items()}, path, metadata=metadata)


def _contiguous(value):
    import numpy as np
    import paddle

    if isinstance(value, np.ndarray):
        value = paddle.to_tensor(np.ascontiguousarray(value))
    return value.contiguous() if hasattr(value, "contiguous") else value


def _nbytes(tensor) -> int:
    return int(tensor.numel()) * tensor.element_size()


class ShardWriter:
    """Tensors added one by one, written as safetensors shards of at most ``max_shard_size`` bytes
    (a tensor larger than that gets a shard of its own) into ``folder``: ``<stem>.safetensors``
    when one shard holds everything, else ``<stem>-0000i-of-0000N.safetensors`` plus
    ``<stem>.safetensors.index.json``.  Only the shard being filled is held in memory.
    ``metadata`` goes into every header (``{"format": "np"}`` for paddlenlp, ``"pt"`` for
    transformers, which check it)."""

    def __init__(self, folder: str, stem: str = "model", shard_size=None, metadata: dict | None = None):
        self.folder, self.stem = folder, stem
        self.limit = max_shard_size() if shard_size is None else parse_size(shard_size)
        self.metadata = metadata or {"format": "np"}
        self._shard, self._size, self._total, self._parts, self._map = {}, 0, 0, [], {}
        os.makedirs(folder, exist_ok=True)

    def add(self, name: str, tensor) -> None:
        tensor = _contiguous(tensor)
        size = _nbytes(tensor)
        if self._shard and self._size + size > self.limit:
            self._flush()
        self._shard[name] = tensor
        self._size += size
        self._total += size

    def _flush(self) -> None:
        part = os.path.join(self.folder, f".{self.stem}-part{len(self._parts):05d}.safetensors")
        save_tensors(self._shard, part, self.metadata)
        self._parts.append((part, list(self._shard)))
        self._shard, self._size = {}, 0

    def close(self) -> list[str]:
        """Write the last shard (and the index); the names of the files written."""
        if self._shard or not self._parts:
            self._flush()
        count = len(self._parts)
        if count == 1:
            final = os.path.join(self.folder, f"{self.stem}.safetensors")
            os.replace(self._parts[0][0], final)
            return [os.path.basename(final)]
        names = []
        for i, (part, keys) in enumerate(self._parts):
            name = f"{self.stem}-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(part, os.path.join(self.folder, name))
            self._map.update({k: name for k in keys})
            names.append(name)
        index = {"metadata": {"total_size": self._total}, "weight_map": self._map}
        with open(os.path.join(self.folder, f"{self.stem}.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        return names + [f"{self.stem}.safetensors.index.json"]


def save_sharded(tensors: dict, folder: str, stem: str = "model", shard_size=None,
                 metadata: dict | None = None) -> list[str]:
    """``tensors`` through a :class:`ShardWriter` (in their order)."""
    writer = ShardWriter(folder, stem, shard_size, metadata)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    return writer.close()


# ---------------------------------------------------------------------------------------------
# a model folder's weights, in whichever layout it has


def index_shards(index_path: str, what: str = "weight index") -> list[str]:
    """The shard files an index names (sorted, unique); UserError for an index that is not a
    ``{"weight_map": {tensor: file}}`` object or that names a file outside its folder."""
    data = read_json(index_path, what)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{what} '{index_path}' has no weight_map object of tensor names to file names")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise UserError(f"{what} '{index_path}' names the file '{shard}' outside its folder; "
                            "shards must be plain file names")
    folder = os.path.dirname(index_path)
    for shard in shards:
        if not os.path.isfile(os.path.join(folder, shard)):
            state = "a folder, not a file" if os.path.isdir(os.path.join(folder, shard)) else "missing"
            raise UserError(f"{what} '{index_path}' names the weight shard '{shard}', which is {state}")
    return [os.path.join(folder, s) for s in shards]


def model_weight_files(folder: str) -> list[str]:
    """A model folder's weight files: safetensors (single or sharded), else paddle pickles (single
    or sharded); [] when it has none."""
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (PICKLE_WEIGHTS, PICKLE_INDEX)):
        if os.path.isfile(os.path.join(folder, index)):
            return index_shards(os.path.join(folder, index))
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    return []


def weights_problem(folder: str) -> str | None:
    """What keeps the model folder ``folder`` from having readable weights (a phrase), or None: no
    weights at all, a weights name that is a folder, or shards without the index naming them."""
    for name in (SAFE_WEIGHTS, SAFE_INDEX, PICKLE_WEIGHTS, PICKLE_INDEX):
        if os.path.isdir(os.path.join(folder, name)):
            return f"has a folder '{name}' where a weights file belongs"
    if model_weight_files(folder):
        return None
    shards = sorted(n for n in os.listdir(folder) if _SHARD_FILE.match(n))
    if shards:
        return (f"holds weight shards ({', '.join(shards[:2])}{', ...' if len(shards) > 2 else ''}) but no index file "
                f"naming them ({SAFE_INDEX} or {PICKLE_INDEX})")
    return (f"has a config.json but no weights ({PICKLE_WEIGHTS}, {SAFE_WEIGHTS}, or their shards with an index "
            "file)")


_SHARD_FILE = re.compile(r"^model(_state)?-\d{5}-of-\d{5}\.(safetensors|pdparams)$")
_WEIGHT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                          r"model_state(-\d{5}-of-\d{5})?\.pdparams|model_state\.pdparams\.index\.json)$")


def remove_weights(folder: str) -> None:
    """Delete the model weight files of ``folder`` (every layout), before a model is written over
    them: paddlenlp loads safetensors first, so a stale file of the other layout beside the new
    weights would be the one that loads."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if _WEIGHT_FILE.match(name) and os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))


def iter_folder_tensors(folder: str, what: str = "weights file"):
    """(name, paddle tensor) of every weight of a model folder, one safetensors tensor at a time
    (a pickled file is read whole)."""
    files = model_weight_files(folder)
    if not files:
        raise UserError(f"model folder '{folder}' has no weights ({SAFE_WEIGHTS}, {PICKLE_WEIGHTS} or "
                        "their shards with an index file)")
    for path in files:
        if path.endswith(".safetensors"):
            with open_tensors(path, what) as f:
                for name in f.keys():
                    yield name, f.get(name)
        else:
            yield from load_paddle_state(path, what).items()


def folder_state(folder: str, what: str = "weights file") -> dict:
    """{name: paddle tensor} of every weight of a model folder."""
    return dict(iter_folder_tensors(folder, what))
