"""What the by-NAME registries (datasets, reward functions) share: a name's form, and telling a
class defined again (a module imported twice or reloaded) from a different class taking a name."""

from __future__ import annotations

import os
import sys

from ppo.core.errors import UserError


def class_id(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def same_definition(a: type, b: type) -> bool:
    """Whether two classes come from the same source (a module imported twice, or reloaded).

    Classes defined inside functions are always distinct: one function may define several.
    """
    if a.__qualname__ != b.__qualname__ or "<locals>" in a.__qualname__:
        return False
    if a.__module__ == b.__module__:
        return True
    files = [getattr(sys.modules.get(c.__module__), "__file__", None) for c in (a, b)]
    return None not in files and os.path.realpath(files[0]) == os.path.realpath(files[1])


def check_name(key, cls: type, registry: dict, what: str, field: str = "NAME") -> None:
    """One line when ``key`` is not a usable name (empty, spaces around, ',' or ':' in it) or is
    registered already by another class; ``what`` names the kind ('dataset', 'reward function')."""
    if not isinstance(key, str) or not key.strip() or key != key.strip() or "," in key or ":" in key:
        raise UserError(f"{what} class {class_id(cls)} has an invalid {field} {key!r}; "
                        "names are non-empty strings without ',', ':' or surrounding spaces")
    other = registry.get(key)
    if other is not None and not same_definition(other, cls):
        raise UserError(f"{what} name '{key}' of {class_id(cls)} is already registered by "
                        f"{class_id(other)}; choose another NAME")
