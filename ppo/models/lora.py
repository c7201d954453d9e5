"""LoRA adapters (``paddlenlp.peft``) on any paddlenlp model, knowing no model family.

:func:`apply_lora` swaps the target linear layers of ``model`` for paddlenlp's ``LoRALinear``
*in place* (through ``LoRAModel``) and freezes everything but the adapters (and the layers named
trainable, e.g. a score head).  The model object, its parameter names (``llama.layers.0.self_attn
.q_proj.weight`` plus ``...q_proj.lora_A`` / ``lora_B``) and its family layout stay the ones the
rest of the toolkit knows.  A ``LoRALinear`` computes ``x @ W (+ b) + x @ A @ B * scaling``.

* :class:`AdaptersOff`: the same model with every adapter switched off, for PPO's reference (no
  second copy of the weights).  The family layout reads its ``adapters_off`` flag.
* :func:`merged_for_export`: while it is open, the model's state is the merged ``W + scaling A@B``
  without adapter entries (what ``from_pretrained`` loads without peft); restored bitwise after.
* :func:`save_adapters`: the adapter weights and their settings, written beside a final model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import paddle

from ppo.errors import UserError

ADAPTER_FILE = "lora_model_state.pdparams"
CONFIG_FILE = "lora_config.json"


def _lora_layer_class():
    from paddlenlp.peft.lora.lora_layers import LoRALinear

    return LoRALinear


def target_patterns(targets: str) -> list[str]:
    """``lora_target_modules`` as paddlenlp's full-match regular expressions over layer paths: a bare
    name (``q_proj``) matches the last path component, anything else is taken as a regex."""
    patterns = []
    for item in (t.strip() for t in targets.split(",")):
        if item:
            patterns.append(rf"(.*\.)?{item}" if re.fullmatch(r"\w+", item) else item)
    return patterns


def lora_layers(model) -> list:
    """The ``LoRALinear`` layers of ``model`` (in sublayer order)."""
    cls = _lora_layer_class()
    return [layer for layer in model.sublayers() if isinstance(layer, cls)]


def is_lora(model) -> bool:
    return bool(lora_layers(model))


def apply_lora(model, rank: int, alpha: float, targets: str, trainable: tuple[str, ...] = (),
               what: str = "lora_target_modules"):
    """Put rank-``rank`` adapters on the linear layers ``targets`` names; only they (and parameters
    whose names fully match a ``trainable`` regex) train.  Returns ``model`` (changed in place).

    A is [in, rank] (Kaiming-uniform), B is [rank, out] (zeros): the adapted model starts equal to
    the base model.  Seeded by paddle's global seed, like any layer built here.
    """
    from paddlenlp.peft import LoRAConfig, LoRAModel

    patterns = target_patterns(targets)
    names = [name for name, layer in model.named_sublayers()
             if isinstance(layer, paddle.nn.Linear) and any(re.fullmatch(p, name) for p in patterns)]
    if not names:
        raise UserError(f"'{what}' = '{targets}' matches no linear layer of {type(model).__name__} "
                        "(names are the last part of a layer's path, e.g. q_proj, or regular expressions)")
    config = LoRAConfig(r=int(rank), lora_alpha=alpha, target_modules=patterns, lora_dropout=0.0,
                        trainable_modules=list(trainable) or None, tensor_parallel_degree=1)
    # LoRAModel replaces the matched layers inside ``model`` and marks only the adapters trainable;
    # the wrapper itself is not kept: the toolkit goes on with the model it knows
    LoRAModel(model, config)
    model._ppo_lora = {"lora_rank": int(rank), "lora_alpha": float(alpha), "lora_target_modules": targets,
                       "target_modules": patterns, "trainable_modules": list(trainable)}
    return model


@contextlib.contextmanager
def adapters_disabled(model):
    """Every adapter of ``model`` off inside the block (its forward computes x @ W (+ b))."""
    layers = lora_layers(model)
    before = [layer.disable_lora for layer in layers]
    for layer in layers:
        layer.disable_lora = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.disable_lora = flag


class AdaptersOff:
    """``model`` with its adapters switched off: the frozen base model, sharing its weights.

    Calls run the model's forward inside :func:`adapters_disabled`; the family layout
    (``ModelFamily.layout``) sees ``adapters_off`` and hands out the plain base weights, so the lean
    inference path scores the base model too.  It owns no parameters (``parameters()`` is empty),
    so offloading it moves nothing that the trained model holds.
    """

    adapters_off = True
    _ppo_inference_view = None  # its own inference view, never the adapted model's

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):  # config, the backbone, lm_head, ... of the shared model
        return getattr(self.__dict__["model"], name)

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def parameters(self):
        return []

    def buffers(self):
        return []

    def eval(self):
        return self

    def train(self):
        return self


def lora_delta(layer) -> paddle.Tensor:
    """``scaling * A @ B`` [in, out] of one ``LoRALinear``, in the weight's dtype."""
    return (layer.lora_A @ layer.lora_B * layer.scaling).astype(layer.weight.dtype)


@contextlib.contextmanager
def merged_for_export(model):
    """Inside the block every ``LoRALinear`` holds ``W + scaling A@B`` and no adapter parameters,
    so ``state_dict()`` / ``save_pretrained`` give a plain model; afterwards W and the adapters are
    back exactly (the original W is kept, not recomputed)."""
    layers = lora_layers(model)
    saved = []
    try:
        with paddle.no_grad():
            for layer in layers:
                original = layer.weight.clone()
                merged = layer.weight + lora_delta(layer)
                adapters = {k: layer._parameters.pop(k) for k in ("lora_A", "lora_B") if k in layer._parameters}
                saved.append((layer, original, adapters))
                layer.weight.set_value(merged)
        yield model
    finally:
        with paddle.no_grad():
            for layer, original, adapters in saved:
                layer.weight.set_value(original)
                layer._parameters.update(adapters)


def adapter_state(model) -> dict:
    """{parameter name: numpy array} of the adapter weights (``...lora_A`` / ``...lora_B``)."""
    return {name: p.numpy() for name, p in model.named_parameters() if ".lora_" in name}


def save_adapters(model, folder: str) -> None:
    """The adapters and their settings into ``folder`` (written to a temporary name, then renamed)."""
    tmp = folder.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    paddle.save({k: paddle.to_tensor(v) for k, v in adapter_state(model).items()}, os.path.join(tmp, ADAPTER_FILE))
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(model._ppo_lora, f, indent=1)
    if os.path.isdir(folder):
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
