"""Reading a stage's arguments: an optional JSON file, then ``--key value`` overrides; relative
paths of a config file resolved from the project root; ``--help``."""

from __future__ import annotations

import os
import sys
import typing
from dataclasses import fields

from ppo.args.common import range_help
from ppo.args.paddlenlp import PADDLENLP_KEYS, Renamed, map_paddlenlp_keys
from ppo.core.errors import UserError, closest
from ppo.storage.files import allow_unsafe_pickle, read_json
from ppo.storage.tensors import set_max_shard_size

# Relative paths


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET_OUTPUT = os.path.join(PROJECT_ROOT, "output", "tiny")


def _from_root(path: str) -> str:
    """A config file's relative path, re-expressed relative to the current folder (unchanged from the root)."""
    if not path or os.path.isabs(path):
        return path
    return os.path.relpath(os.path.join(PROJECT_ROOT, path))


def resolve_config_paths(name: str, kind: str, value):
    """``value`` of field ``name`` as given in a config file, its relative paths taken from the project root."""
    if not isinstance(value, str) or not value:
        return value
    if kind == "path":
        return value if name == "resume_from_checkpoint" and value == "auto" else _from_root(value)
    if kind == "modules":  # module names stay, .py files are paths
        return ",".join(_from_root(m) if m.endswith(".py") else m for m in value.split(","))
    if kind == "datasets":  # NAME[:proportion[:path]]
        specs = []
        for spec in value.split(","):
            parts = spec.split(":", 2)
            if len(parts) == 3 and parts[2]:
                parts[2] = _from_root(parts[2])
            specs.append(":".join(parts))
        return ",".join(specs)
    return value


def check_preset_models(args) -> None:
    """A model folder under output/tiny that is missing: say which command builds the tiny example.

    Called by the entry points before anything loads (parsing alone does not need the folders)."""
    for f in fields(args):
        value = getattr(args, f.name)
        if f.name.endswith("model_name_or_path") and value and not os.path.exists(value) \
                and os.path.abspath(value).startswith(PRESET_OUTPUT + os.sep):
            raise UserError(f"'{f.name}' folder '{value}' does not exist: it is built by the tiny example's "
                            f"pipeline, `python -m ppo.tiny.pipeline` run from {PROJECT_ROOT}")


# ---------------------------------------------------------------------------------------------
# Parsing


def _base_type(tp):
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _coerce(name: str, tp, value, source: str):
    tp = _base_type(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # JSON lists of names are accepted as comma-separated
            return ",".join(str(v) for v in value)
    raise UserError(f"{source}: '{name}' must be {tp.__name__}, got {value!r}")


def load_json_config(path: str) -> dict:
    data = read_json(path, "config file", object_only=False)
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a JSON object of argument names to values")
    return data


def format_help(cls) -> str:
    hints = typing.get_type_hints(cls)
    lines = [f"usage: <script> [config.json] [--key value ...]\n\n{cls.__name__} arguments:"]
    for f in fields(cls):
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(repr(c) for c in choices)}." if choices else ""
        extra += range_help(f)
        lines.append(f"  --{f.name} ({_base_type(hints[f.name]).__name__}, default {f.default!r}): "
                     f"{f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)


def parse_args(cls, argv=None):
    """Build ``cls`` from an optional JSON file (first argument) and ``--key value`` overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help(cls))
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values: dict = {}
    sources: dict = {}
    if argv and not argv[0].startswith("--"):
        path = argv.pop(0)
        for key, value in load_json_config(path).items():
            if key in known:
                value = resolve_config_paths(key, known[key].metadata.get("path", ""), value)
            elif isinstance(PADDLENLP_KEYS.get(key), Renamed) and PADDLENLP_KEYS[key].field in known:
                entry = PADDLENLP_KEYS[key]  # a renamed key's paths resolve as its field's do
                kind = "path" if entry.form else known[entry.field].metadata.get("path", "")
                value = resolve_config_paths(entry.field, kind, value)
            values[key], sources[key] = value, f"config file '{path}'"
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected command-line argument '{token}': expected a config .json first, then --key value pairs")
        key, eq, inline = token[2:].partition("=")
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        elif key in known and _base_type(hints[key]) is bool:
            value, i = "true", i + 1  # a bare --flag means true
        else:
            raise UserError(f"command-line argument '--{key}' needs a value")
        values[key], sources[key] = value, "command line"
    map_paddlenlp_keys(values, sources, known)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"{sources[key]}: unknown argument '{key}'{closest(key, known)}; "
                            f"run with --help to list the {len(known)} accepted arguments")
        kwargs[key] = _coerce(key, hints[key], value, sources[key])
        choices = known[key].metadata.get("choices")
        if choices is not None and kwargs[key] not in choices:
            raise UserError(f"{sources[key]}: '{key}' must be one of {', '.join(repr(c) for c in choices)}, "
                            f"got {kwargs[key]!r}{closest(str(kwargs[key]), [str(c) for c in choices])}")
    args = cls(**kwargs)
    args.validate()
    if getattr(args, "allow_unsafe_pickle", False):
        allow_unsafe_pickle(True)
    if hasattr(args, "max_shard_size"):
        set_max_shard_size(args.max_shard_size)
    return args


def validate(args) -> None:
    """Range checks of a stage's arguments: each part checks its own fields, the stage its own."""
    args.validate()
