"""Pickles from outside, read only when they hold data.

A pickle names the callables that rebuild its objects (``GLOBAL`` / ``STACK_GLOBAL`` opcodes) and
calls them while it loads: a crafted ``model_state.pdparams`` runs whatever it names.  Before any
pickle is loaded (a paddlenlp ``*.pdparams`` folder, a checkpoint written by an older version),
:func:`check_pickle` walks its opcodes without building anything (``pickletools.genops``: streamed,
one tensor's bytes at a time) and admits only the names that rebuild tensors, numpy arrays and
plain containers (:data:`ALLOWED`).  Anything else is one line naming the file and the object
refused.  ``allow_unsafe_pickle`` (an argument of every stage) lifts the check, with a warning.
"""

from __future__ import annotations

import logging
import os
import pickletools

from ppo.core.errors import UserError

logger = logging.getLogger("ppo")

# what rebuilds data: numpy arrays, dtypes and scalars, the containers pickle cannot write without
# a name, bytes (numpy's protocol-2 form), and paddle's random-generator state (checkpoints of
# earlier versions hold it)
ALLOWED = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5 arrays
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.random._pickle", "__randomstate_ctor"),
    ("numpy.random._pickle", "__bit_generator_ctor"), ("numpy.random._pickle", "__generator_ctor"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("builtins", "slice"), ("_codecs", "encode"),
    ("paddle.base.libpaddle", "GeneratorState"),
    # protocol 2 spells builtins as __builtin__
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "complex"), ("__builtin__", "bytearray"),
    ("__builtin__", "slice"),
})
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}

_allow_unsafe = False


def allow_unsafe_pickle(allow: bool = True) -> None:
    """Load pickles whatever they name (``--allow_unsafe_pickle true``): one warning."""
    global _allow_unsafe
    if allow and not _allow_unsafe:
        logger.warning("allow_unsafe_pickle: pickled files are loaded without checking what they name; a crafted "
                       "file can run code. Use it only for files you trust")
    _allow_unsafe = bool(allow)


def pickle_names(path: str):
    """Yield every ``(module, name)`` the pickle at ``path`` would import, in order; a ``STACK_GLOBAL``
    whose operands are not plain strings yields ``("?", "?")`` (it cannot be checked)."""
    with open(path, "rb") as f:
        memo: dict = {}
        recent: list = []  # the values the last string / memo-get opcodes pushed (None: something else)
        memo_index = 0
        for op, arg, _ in pickletools.genops(f):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                yield module, attr
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if len(recent) >= 2 and isinstance(recent[-2], str) and isinstance(recent[-1], str):
                    yield recent[-2], recent[-1]
                else:
                    yield "?", "?"
                recent.append(None)
            elif name in _STRINGS:
                recent.append(arg if isinstance(arg, str) else arg.decode("latin-1") if isinstance(arg, bytes) else None)
            elif name in _GETS:
                recent.append(memo.get(arg))
            elif name == "MEMOIZE":
                memo[memo_index] = recent[-1] if recent else None
                memo_index += 1
            elif name in _PUTS:
                memo[arg] = recent[-1] if recent else None
            elif name == "STOP":
                return
            else:
                recent.append(None)
            del recent[:-2]


def is_pickle(path: str) -> bool:
    """Whether the file starts with pickle's protocol header (``\\x80`` and a protocol 2-5)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def check_pickle(path: str, what: str = "file") -> None:
    """UserError (one line) unless the pickle at ``path`` names only :data:`ALLOWED` objects (or
    ``allow_unsafe_pickle`` is set); a damaged pickle is one line as well."""
    if _allow_unsafe:
        return
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist")
    try:
        for module, name in pickle_names(path):
            if (module, name) not in ALLOWED:
                shown = "an object it builds at load time" if module == "?" else f"'{module}.{name}'"
                raise UserError(f"{what} '{path}' is a pickle that names {shown}, which loading it would run; only "
                                "tensors, arrays and plain containers are loaded from pickles (convert the file to "
                                "safetensors, or pass --allow_unsafe_pickle true if you trust it)")
    except UserError:
        raise
    except Exception as e:  # a truncated or damaged opcode stream
        text = str(e).strip().splitlines()
        raise UserError(f"{what} '{path}' cannot be read (damaged or truncated?): not a complete pickle, "
                        f"{type(e).__name__}: {text[0][:200] if text else ''}") from None
