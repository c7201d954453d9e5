"""Reward functions: a registry of named programs that score responses, their spec and combination.

A reward function scores a batch of decoded responses, one float each, from the prompts, the
response texts and token ids, and each prompt's reference answer (``None`` when the dataset has
none).  Subclasses register under ``NAME`` when they are defined, so ``reward_functions`` can name
them as ``"math_exact,format:0.5"``.  Users add their own by subclassing ``RewardFunction`` in a
module listed in ``extra_modules``::

    class Shorter(RewardFunction):
        NAME = "shorter"
        def __call__(self, prompts, responses, response_ids, references, **context):
            return [-len(ids) / context["max_new_tokens"] for ids in response_ids]

Options reach a function through its ``__init__``: each keyword parameter named like a run argument
(``reward_format_pattern``, ``max_new_tokens``, ...) receives that argument's value.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from ppo.core.errors import UserError, closest
from ppo.core.registry import check_name, class_id as _class_id

SPEC_FORM = "comma-separated NAME[:WEIGHT], e.g. 'math_exact,format:0.2'"


class RewardFunction:
    """Scores a batch of responses; registered under ``NAME`` (classes without one are not).

    Subclasses implement ``__call__(prompts, responses, response_ids, references, **context)``:
    ``prompts``, ``responses`` and ``references`` are lists of length ``B`` (a reference may be
    None), ``response_ids`` the ``B`` generated token-id lists (without padding); ``context`` holds
    run facts: ``max_new_tokens`` and ``eos_token_id`` (the actor tokenizer's: a response whose last
    id it is ended on its own).  It returns ``B`` finite floats.
    """

    NAME: ClassVar[str | None] = None
    _registry: ClassVar[dict[str, type[RewardFunction]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("NAME")
        if name is None:
            return
        check_name(name, cls, RewardFunction._registry, "reward function")
        RewardFunction._registry[name] = cls

    @classmethod
    def names(cls) -> list[str]:
        """Registered ``NAME``s, sorted."""
        return sorted(RewardFunction._registry)

    @classmethod
    def load(cls, name: str, options: Mapping[str, Any] | None = None) -> RewardFunction:
        """An instance of the function registered as ``name``, built with the ``options`` its
        ``__init__`` names (all of them if it takes ``**kwargs``)."""
        target = RewardFunction._registry.get(name)
        if target is None:
            raise UserError(f"unknown reward function '{name}'{closest(name, RewardFunction._registry)}; "
                            f"registered: {', '.join(cls.names())} (add your own: subclass "
                            "ppo.rewards.RewardFunction in a module listed in extra_modules)")
        options = dict(options or {})
        params = inspect.signature(target.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            options = {k: v for k, v in options.items() if k in params and k != "self"}
        return target(**options)

    def __init__(self):
        """Functions without options take none (``load`` passes an ``__init__`` only what it names)."""

    def __call__(self, prompts: list[str], responses: list[str], response_ids: list[list[int]],
                 references: list[str | None], **context) -> list[float]:
        raise NotImplementedError(f"reward function {_class_id(type(self))} does not define __call__")


@dataclass
class RewardSpec:
    """One entry of ``reward_functions``: a registered ``name`` and the ``weight`` of its score."""

    name: str
    weight: float = 1.0


def parse_reward_functions(spec: str | None) -> list[RewardSpec]:
    """``"math_exact,format:0.5"`` -> ``[RewardSpec('math_exact', 1.0), RewardSpec('format', 0.5)]``.

    An empty spec gives ``[]``.  A weight is any finite number (0 logs a function without rewarding
    it; negative weights turn a score into a penalty).  Unknown or repeated names are errors.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return []
    if not isinstance(spec, str):
        raise UserError(f"reward_functions {spec!r} is a {type(spec).__name__}; expected {SPEC_FORM}")
    out: list[RewardSpec] = []
    for entry in spec.split(","):
        name, sep, weight = entry.strip().partition(":")
        name = name.strip()
        if not name:
            raise UserError(f"reward_functions {spec!r} has an empty entry; expected {SPEC_FORM}")
        if name not in RewardFunction._registry:
            raise UserError(f"reward_functions {spec!r}: unknown reward function '{name}'"
                            f"{closest(name, RewardFunction._registry)}; registered: "
                            f"{', '.join(RewardFunction.names())} (add your own in a module listed in extra_modules)")
        value = 1.0
        if sep:
            try:
                value = float(weight)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise UserError(f"reward_functions {spec!r}: weight {weight.strip()!r} of '{name}' is not a finite "
                                f"number; expected {SPEC_FORM}")
        if any(s.name == name for s in out):
            raise UserError(f"reward_functions {spec!r} names '{name}' twice; give each function once with "
                            "its weight")
        out.append(RewardSpec(name, value))
    return out


def run_options(args) -> dict:
    """The run arguments ``args`` as options for :func:`build_reward_functions`; an empty
    ``reward_format_pattern`` is left out, so the format function keeps its own default."""
    options = dict(vars(args))
    if not options.get("reward_format_pattern"):
        options.pop("reward_format_pattern", None)
    return options


def build_reward_functions(spec: str | None, options: Mapping[str, Any] | None = None
                           ) -> list[tuple[RewardFunction, float]]:
    """``(function, weight)`` per entry of ``spec``, each built with ``options`` (the run arguments)."""
    return [(RewardFunction.load(s.name, options), s.weight) for s in parse_reward_functions(spec)]


@dataclass
class RewardScores:
    """Scores of one batch: ``per_function[name]`` [B] float64 (unweighted) and ``total`` [B], the
    weighted sum that is added to the reward model's score (or replaces it)."""

    per_function: dict[str, np.ndarray]
    total: np.ndarray


def combine(functions: list[tuple[RewardFunction, float]], prompts: list[str], responses: list[str],
            response_ids: list[list[int]], references: list[str | None], **context) -> RewardScores:
    """Calls every function on the batch and sums ``weight * score``; ``total`` [B] float64.

    A function that returns anything but ``B`` finite numbers is a UserError naming it.
    """
    B = len(responses)
    if not len(prompts) == len(response_ids) == len(references) == B:
        raise ValueError(f"batch lists differ in length: {len(prompts)} prompts, {B} responses, "
                         f"{len(response_ids)} response ids, {len(references)} references")
    total = np.zeros(B, dtype=np.float64)
    per_function: dict[str, np.ndarray] = {}
    for function, weight in functions:
        name = type(function).NAME or _class_id(type(function))
        scores = function(prompts, responses, response_ids, references, **context)
        per_function[name] = _check_scores(scores, B, f"reward function '{name}' ({_class_id(type(function))})")
        total += weight * per_function[name]
    return RewardScores(per_function, total)


def _check_scores(scores: Any, B: int, who: str) -> np.ndarray:
    """``scores`` as [B] float64, or a UserError naming ``who`` when they are not B finite numbers."""
    try:
        n = len(scores)
    except TypeError:
        raise UserError(f"{who} returned a {type(scores).__name__}; expected a list of {B} floats") from None
    if n != B:
        raise UserError(f"{who} returned {n} scores for {B} responses; expected one float per response")
    bad = [(i, s) for i, s in enumerate(scores)
           if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, float, np.integer, np.floating))
           or not math.isfinite(float(s))]
    if bad:
        i, s = bad[0]
        raise UserError(f"{who} returned {s!r} for response {i} ({len(bad)} bad of {B}); expected finite floats")
    return np.asarray([float(s) for s in scores], dtype=np.float64)
