"""Activation checkpointing (PaddleNLP's ``recompute``) switched on for any paddlenlp model.

paddlenlp reads the switch in two places: ``config.recompute`` / ``config.recompute_granularity``
and, per layer, ``enable_recompute`` (set by ``recompute_enable()``) with the granularity each
layer copied from the config when it was built.  :func:`enable_recompute` sets all of them, so a
model loaded without recompute gets it afterwards.  It knows no model family: it walks the
layers and touches only the attributes paddlenlp's layers declare.
"""

from __future__ import annotations

from ppo.core.errors import UserError

GRANULARITIES = ("full", "full_attn", "core_attn")


def enable_recompute(model, granularity: str = "full"):
    """Recompute ``granularity`` blocks of ``model`` (and its sublayers) in backward; returns ``model``.

    ``full``: whole decoder layers keep only their input hidden states ``[B, T, H]``;
    ``full_attn``: the attention blocks; ``core_attn``: softmax(QK^T)V only.
    """
    if granularity not in GRANULARITIES:
        raise UserError(f"recompute granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got {granularity!r}")
    layers = [model, *model.sublayers()]
    switched = 0
    for layer in layers:
        config = getattr(layer, "config", None)
        if config is not None and hasattr(config, "recompute"):
            config.recompute, config.recompute_granularity = True, granularity
        if hasattr(layer, "recompute_granularity"):  # copied from the config at build time
            layer.recompute_granularity = granularity
        if hasattr(layer, "enable_recompute"):
            layer.enable_recompute = True
            switched += 1
    if switched == 0:
        raise UserError(f"recompute: {type(model).__name__} has no paddlenlp layers that support recompute")
    return model
