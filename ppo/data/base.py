"""Raw datasets: a registry of named sources of text samples, dataset specs and local loading.

A raw dataset turns one source (a hub dataset, a local file, records built in code) into
``RawSample`` dicts.  Subclasses register under ``NAME`` when they are defined, so a spec like
``"PKU-SafeRLHF/train:0.5,alpaca"`` can name them.  Users add their own by subclassing
``RawDataset`` in a module listed in ``extra_modules``::

    class MyRawDataset(RawDataset):
        NAME = "my-dataset-name"
        def __init__(self, path=None): ...
        def __getitem__(self, index) -> RawSample: return RawSample(input=..., answer=...)
        def __len__(self): ...
"""

from __future__ import annotations

import abc
import glob
import importlib
import importlib.util
import inspect
import math
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, TypedDict

from ppo.core.registry import check_name, class_id as _class_id, same_definition as _same_definition
from ppo.core.errors import UserError, closest
from ppo.storage.files import read_text

# a proportion repeats a dataset that many times in memory, tokenized: larger values exhaust it
MAX_PROPORTION = 100
SPEC_FORM = "comma-separated NAME[:PROPORTION[:PATH]], e.g. 'PKU-SafeRLHF/train:0.5,alpaca:1.0:/data/alpaca.json'"


class RawSample(TypedDict, total=False):
    """One text sample; which fields a stage needs depends on the stage.

    ``input`` is the prompt, or a dialogue ``[user, assistant, user, ..., user]`` whose last turn
    is the user turn to answer.  ``better`` is True when ``answer`` beats ``other_answer``;
    ``safer``/``is_safe``/``is_other_safe`` are the safety labels of safe-rlhf data.
    ``reference`` is the ground-truth answer of a prompt that reward functions check responses
    against (e.g. ``"72"`` for a GSM8K problem); prompt-only data may carry it.
    """

    input: str | list[str]
    answer: str
    other_answer: str
    better: bool
    safer: bool
    is_safe: bool
    is_other_safe: bool
    reference: str
    desirable: bool  # KTO's label of an unpaired completion (``answer``)
    dialogue: Any  # reserved


class RawDataset(abc.ABC):
    """A map-style dataset of ``RawSample`` registered under ``NAME`` (and optional ``ALIASES``).

    Classes without their own ``NAME`` (shared bases) are not registered.
    """

    NAME: ClassVar[str | None] = None
    ALIASES: ClassVar[tuple[str, ...]] = ()
    _registry: ClassVar[dict[str, type[RawDataset]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("NAME")
        if name is None:
            return
        aliases = cls.__dict__.get("ALIASES", ())
        if isinstance(aliases, str):  # ALIASES = "x" would otherwise register every character
            aliases = (aliases,)
        for key in (name, *aliases):
            check_name(key, cls, RawDataset._registry, "dataset", "NAME/ALIASES entry")
        # A re-imported module replaces its earlier classes, including names they no longer use.
        for key, other in list(RawDataset._registry.items()):
            if _same_definition(other, cls):
                del RawDataset._registry[key]
        for key in (name, *aliases):
            RawDataset._registry[key] = cls

    @classmethod
    def names(cls) -> list[str]:
        """Registered ``NAME``s, sorted (aliases not included)."""
        return sorted(key for key, c in RawDataset._registry.items() if c.NAME == key)

    @classmethod
    def load(cls, name: str, path: str | None = None, **kwargs) -> RawDataset:
        """Instantiate the dataset registered as ``name`` (a NAME or an alias)."""
        target = RawDataset._registry.get(name)
        if target is None:
            raise UserError(f"unknown dataset '{name}'{closest(name, RawDataset._registry)}; registered: "
                            f"{', '.join(cls.names())} (add your own: subclass ppo.data.RawDataset in a module "
                            "listed in extra_modules)")
        if inspect.isabstract(target):
            missing = ", ".join(sorted(target.__abstractmethods__))
            raise UserError(f"dataset '{name}' ({_class_id(target)}) does not define {missing}")
        if path is not None:
            try:
                params = inspect.signature(target).parameters
            except (TypeError, ValueError):
                params = None
            accepts = params is None or "path" in params or any(
                p.kind == p.VAR_KEYWORD for p in params.values())
            if not accepts:
                raise UserError(f"dataset '{name}' ({_class_id(target)}) takes no path, but the spec gives "
                                f"'{path}'; give its __init__ a 'path=None' argument or drop the path")
            kwargs["path"] = path
        dataset = target(**kwargs)
        if len(dataset) == 0:
            where = f" at '{path}'" if path is not None else ""
            raise UserError(f"dataset '{name}'{where} has no samples")
        return dataset

    @abc.abstractmethod
    def __getitem__(self, index: int) -> RawSample:
        ...

    @abc.abstractmethod
    def __len__(self) -> int:
        ...

    def __iter__(self) -> Iterator[RawSample]:
        for i in range(len(self)):
            yield self[i]


# ---------------------------------------------------------------------------------------------
# Specs



class SampleListDataset(RawDataset):
    """A RawDataset whose samples are converted up front into ``self.samples``."""

    samples: list

    def __getitem__(self, index: int) -> RawSample:
        return self.samples[index]

    def __len__(self) -> int:
        return len(self.samples)

@dataclass
class DatasetSpec:
    """One entry of a dataset spec: registered ``name``, mixing ``proportion``, optional local ``path``."""

    name: str
    proportion: float = 1.0
    path: str | None = None


def _spec_entry(name: Any, proportion: Any, path: Any, spec: Any) -> DatasetSpec:
    def bad(what: str) -> UserError:
        return UserError(f"dataset spec {spec!r}: {what}; expected {SPEC_FORM}")

    if not isinstance(name, str) or not name.strip():
        raise bad("empty dataset name")
    if proportion is None or (isinstance(proportion, str) and not proportion.strip()):
        value = 1.0  # 'NAME::/path' keeps the default proportion
    else:
        try:
            value = float(proportion)
        except (TypeError, ValueError):
            raise bad(f"proportion {proportion!r} of '{name.strip()}' is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise bad(f"proportion {proportion!r} of '{name.strip()}' must be a number > 0")
        if value > MAX_PROPORTION:
            raise bad(f"proportion {proportion!r} of '{name.strip()}' must be at most {MAX_PROPORTION} "
                      "(each unit is one more tokenized copy of the dataset in memory)")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise bad(f"path {path!r} of '{name.strip()}' is not a string")
    path = os.fspath(path).strip() if path is not None else None
    return DatasetSpec(name.strip(), value, path or None)


def parse_dataset_spec(spec: str | list[str] | list[tuple]) -> list[DatasetSpec]:
    """Dataset specs of ``spec``, e.g. ``"A:0.5,B,C:1:/data/c.jsonl"`` ->
    ``[DatasetSpec('A', 0.5), DatasetSpec('B'), DatasetSpec('C', 1.0, '/data/c.jsonl')]``.

    Each entry splits at its first two ':' so a path may itself contain ':'.  A list holds
    entries as strings, ``(name, proportion[, path])`` tuples or ``DatasetSpec``s.
    """
    if isinstance(spec, str):
        entries: list[Any] = spec.split(",")
    elif isinstance(spec, (list, tuple)):
        entries = []
        for entry in spec:
            entries.extend(entry.split(",") if isinstance(entry, str) else [entry])
    else:
        raise UserError(f"dataset spec {spec!r} is a {type(spec).__name__}; expected {SPEC_FORM}")
    if not entries or (isinstance(spec, str) and not spec.strip()):
        raise UserError(f"dataset spec {spec!r} is empty; expected {SPEC_FORM}")
    out = []
    for entry in entries:
        if isinstance(entry, DatasetSpec):
            out.append(_spec_entry(entry.name, entry.proportion, entry.path, spec))
        elif isinstance(entry, str):
            parts = entry.split(":", 2)
            out.append(_spec_entry(parts[0], parts[1] if len(parts) > 1 else None,
                                   parts[2] if len(parts) > 2 else None, spec))
        elif isinstance(entry, tuple) and 1 <= len(entry) <= 3:
            name, proportion, path = (*entry, None, None)[:3]
            out.append(_spec_entry(name, proportion, path, spec))
        else:
            raise UserError(f"dataset spec {spec!r}: entry {entry!r} is not a string or a "
                            f"(name, proportion[, path]) tuple; expected {SPEC_FORM}")
    return out


# ---------------------------------------------------------------------------------------------
# User modules


def _import_file(entry: str):
    file = os.path.realpath(os.path.expanduser(entry))
    if not os.path.isfile(file):
        raise UserError(f"extra module file '{entry}' does not exist; give a .py file or a dotted module name")
    # Already imported (under any module name): importing again would define its classes twice.
    for module in list(sys.modules.values()):
        module_file = getattr(module, "__file__", None)
        if module_file and os.path.realpath(module_file) == file:
            return module
    stem = os.path.splitext(os.path.basename(file))[0]
    name = stem if stem.isidentifier() and stem not in sys.modules else f"_extra_module_{abs(hash(file)):x}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UserError(f"extra module file '{entry}' cannot be imported; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up in sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_user_modules(modules: list[str] | str) -> list:
    """Import each entry (a dotted module name, or a path to a .py file) so its datasets register.

    A string is split at ','.  Returns the modules.
    """
    if isinstance(modules, str):
        modules = modules.split(",")
    imported = []
    for entry in (m.strip() for m in modules):
        if not entry:
            continue
        is_path = entry.endswith(".py") or "/" in entry or os.sep in entry
        try:
            imported.append(_import_file(entry) if is_path else importlib.import_module(entry))
        except UserError:
            raise
        except ModuleNotFoundError as e:
            raise UserError(f"extra module '{entry}' cannot be imported: {e}; give a dotted module importable "
                            "from the current directory or a path to a .py file") from e
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"importing extra module '{entry}' failed: {type(e).__name__}: {first}") from e
    return imported


# ---------------------------------------------------------------------------------------------
# Loading records

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _load_file(file: str) -> list[dict]:
    import datasets

    fmt = _FORMATS.get(os.path.splitext(file)[1].lower())
    if fmt is None:
        raise UserError(f"dataset file '{file}' has an unsupported extension; accepted: "
                        f"{', '.join(_FORMATS)} files or a folder")
    if os.path.getsize(file) == 0:
        raise UserError(f"dataset file '{file}' is empty; expected {fmt} records")
    if fmt in ("json", "csv"):
        _check_utf8(file)
    # the parser logs its own error before raising; the one-line error below replaces it
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        data = datasets.load_dataset(fmt, data_files=file, split="train")
    except Exception as e:
        cause = e.__cause__ or e  # datasets wraps the parser's error in a generic one
        first = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
        if type(cause).__name__ == "SchemaInferenceError" or "corresponds to no data" in first:
            raise UserError(f"dataset file '{file}' holds no records") from e
        if fmt == "json" and "changed from" in first:
            # one field is a string in some records and a list in others (PaddleNLP's src/tgt may be
            # either): arrow wants one type per column, so the lines are read as plain JSON
            return _json_records(file)
        raise UserError(f"dataset file '{file}' could not be read as {fmt} records: {first}") from e
    finally:
        quiet.setLevel(level)
    return data.to_list()


def _check_utf8(file: str) -> None:
    """UserError naming ``file`` when its bytes are not UTF-8 (the parsers fail deep inside on them)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise UserError(f"dataset file '{file}' is not UTF-8 text (byte {offset + e.start}); save it as "
                                "UTF-8") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"dataset file '{file}' is not UTF-8 text (it ends inside a character); save it as "
                        "UTF-8") from None


def _json_records(file: str) -> list[dict]:
    """The records of a JSON Lines file (or one JSON list), read without a common schema."""
    import json

    text = read_text(file, "dataset file")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"dataset file '{file}' line {number} is not valid JSON: {e.msg}") from None
    return records


def _load_saved(folder: str, split: str | None) -> list[dict]:
    import datasets

    try:
        data = datasets.load_from_disk(folder)
    except Exception as e:
        raise UserError(f"dataset folder '{folder}' could not be loaded with datasets.load_from_disk: "
                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from e
    if isinstance(data, datasets.DatasetDict):
        splits = sorted(data)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in data:
            raise UserError(f"dataset folder '{folder}' has no split '{split}'; it has: {', '.join(splits)}")
        data = data[split]
    return data.to_list()


def _split_files(folder: str, split: str) -> list[str]:
    for ext in (".jsonl", ".json", ".parquet", ".csv"):
        file = os.path.join(folder, split + ext)
        if os.path.isfile(file):
            return [file]
    # Hub repositories store shards as data/{split}-00000-of-00002.parquet
    for ext in ("parquet", "jsonl", "json"):
        shards = sorted(glob.glob(os.path.join(glob.escape(folder), "data", f"{split}-*.{ext}")))
        if shards:
            return shards
    return []


def load_records(path: str | None, split: str | None = None, *, hub_id: str | None = None,
                 name: str | None = None, hub_config: str | None = None) -> list[dict]:
    """Records of a local file or folder, or of hub dataset ``hub_id`` when ``path`` is None.

    A file: ``.json`` (a list of records or JSON lines), ``.jsonl``, ``.parquet`` or ``.csv``
    (``split`` is ignored).  A folder: a ``datasets`` ``save_to_disk`` folder, or one holding
    ``{split}.jsonl|json|parquet|csv`` or hub-style ``data/{split}-*.parquet`` shards
    (``split`` defaults to 'train').  ``name`` is the dataset NAME, used in messages;
    ``hub_config`` the hub dataset's configuration (e.g. 'main' of openai/gsm8k).
    """
    if path is None:
        return _load_hub(hub_id, split, name, hub_config)
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise UserError(f"dataset path '{path}' does not exist; give a .json, .jsonl, .parquet or .csv "
                        "file or a folder")
    if os.path.isfile(path):
        records = _load_file(path)
        source = path
    elif os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        records = _load_saved(path, split)
        source = path
    else:
        split = split or "train"
        files = _split_files(path, split)
        if not files:
            found = sorted(os.listdir(path))[:10]
            raise UserError(f"dataset folder '{path}' has no '{split}' data; expected {split}.jsonl, {split}.json, "
                            f"{split}.parquet, {split}.csv, data/{split}-*.parquet or a datasets save_to_disk "
                            f"folder; found: {', '.join(found) or 'nothing'}")
        records = []
        for file in files:
            records.extend(_load_file(file))
        source = files[0] if len(files) == 1 else f"{path}/data/{split}-*"
    if not records:
        raise UserError(f"dataset '{source}' holds no records")
    return records


def _load_hub(hub_id: str | None, split: str | None, name: str | None, config: str | None = None) -> list[dict]:
    if hub_id is None:
        raise UserError(f"dataset '{name}' needs a local path: give it as '{name}:1.0:/path/to/file-or-folder'")
    import datasets

    try:
        data = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"could not load '{hub_id}' (split '{split}') from the Hugging Face hub for dataset "
                        f"'{name or hub_id}' ({type(e).__name__}: {first}); download it where there is network "
                        f"and give the local copy as '{name or 'NAME'}:1.0:/path/to/file-or-folder'") from e
    if len(data) == 0:
        raise UserError(f"hub dataset '{hub_id}' (split '{split}') holds no records")
    return data.to_list()


# ---------------------------------------------------------------------------------------------
# Checking records


def describe_source(name: str, path: str | None = None, hub_id: str | None = None) -> str:
    """How messages name a dataset: ``dataset 'NAME' at 'path'`` or ``dataset 'NAME' (hub id)``."""
    if path is not None:
        return f"dataset '{name}' at '{path}'"
    return f"dataset '{name}' ({hub_id})" if hub_id else f"dataset '{name}'"


def require_fields(record: Any, fields: list[str] | tuple[str, ...], source: str, index: int) -> None:
    """UserError unless ``record`` has every field of ``fields`` (a null value counts as missing:
    loaders fill the fields a record lacks with None)."""
    if not isinstance(record, dict):
        raise UserError(f"{source} record {index} is a {type(record).__name__}, not an object; "
                        f"expected fields: {', '.join(fields)}")
    missing = [f for f in fields if record.get(f) is None]
    if missing:
        raise UserError(f"{source} record {index} is missing field(s) {', '.join(repr(m) for m in missing)}; "
                        f"expected fields: {', '.join(fields)}")


def require_type(record: dict, field: str, types: type | tuple[type, ...], source: str, index: int,
                 accepted: str) -> Any:
    """``record[field]`` if it is an instance of ``types``, else UserError describing ``accepted``."""
    value = record.get(field)
    if not isinstance(value, types):
        raise UserError(f"{source} record {index} field '{field}' is {type(value).__name__} "
                        f"{_short(value)}; expected {accepted}")
    return value


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
