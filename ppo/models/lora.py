"""LoRA adapters (``paddlenlp.peft``) on any paddlenlp model, knowing no model family.

:func:`apply_lora` swaps the target linear layers of ``model`` for paddlenlp's ``LoRALinear``
*in place* (through ``LoRAModel``) and freezes everything but the adapters (and the layers named
trainable, e.g. a score head).  The model object, its parameter names (``llama.layers.0.self_attn
.q_proj.weight`` plus ``...q_proj.lora_A`` / ``lora_B``) and its family layout stay the ones the
rest of the toolkit knows.  A ``LoRALinear`` computes ``x @ W (+ b) + x @ A @ B * scaling``.

Under tensor parallel the split layers get paddlenlp's ``ColumnParallelLoRALinear`` (W and B split
over the output columns, A whole) and ``RowParallelLoRALinear`` (W and A split over the input rows,
B whole).  :func:`split_adapters` names the split matrices; ``ppo.distributed.pipeline`` gathers and splits
them with the rule of their layer's weight.  A starts layout-independent (:func:`apply_lora`), so
a tensor-parallel run starts from the single-process adapters.

* :class:`AdaptersOff`: the same model with every adapter switched off, for PPO's reference (no
  second copy of the weights).  The family layout reads its ``adapters_off`` flag.
* :func:`merged_for_export`: while it is open, the model's state is the merged ``W + scaling A@B``
  without adapter entries (what ``from_pretrained`` loads without peft); restored bitwise after.
* :func:`save_adapters`: the adapter weights (safetensors) and their settings (JSON), written beside a
  final model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re

import numpy as np
import paddle

from ppo.core.errors import UserError
from ppo.storage.tensors import save_tensors

ADAPTER_FILE = "peft_model.safetensors"  # paddlenlp.peft's name for safetensors adapters
CONFIG_FILE = "lora_config.json"


def _lora_layer_classes() -> tuple[type, type, type]:
    """(whole, column-parallel, row-parallel) LoRA layer classes of paddlenlp."""
    from paddlenlp.peft.lora.lora_layers import ColumnParallelLoRALinear, LoRALinear, RowParallelLoRALinear

    return LoRALinear, ColumnParallelLoRALinear, RowParallelLoRALinear


def _adaptable_classes() -> tuple[type, ...]:
    """The linear layers paddlenlp's LoRAModel replaces: ``nn.Linear`` and fleet's column- and
    row-parallel linears (the classes its parallel LoRA layers extend; fleet stays out of here)."""
    _, column_parallel, row_parallel = _lora_layer_classes()
    return paddle.nn.Linear, column_parallel.__bases__[0], row_parallel.__bases__[0]


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
    classes = _lora_layer_classes()
    return [layer for layer in model.sublayers() if isinstance(layer, classes)]


def is_lora(model) -> bool:
    return bool(lora_layers(model))


def apply_lora(model, rank: int, alpha: float, targets: str, trainable: tuple[str, ...] = (),
               what: str = "lora_target_modules", seed: int = 0):
    """Put rank-``rank`` adapters on the linear layers ``targets`` names; only they (and parameters
    whose names fully match a ``trainable`` regex) train.  Returns ``model`` (changed in place).

    A is [in, rank], B is [rank, out] (zeros): the adapted model starts equal to the base model.
    A is drawn whole from ``seed`` (numpy, U(-1/sqrt(in), 1/sqrt(in)): paddlenlp's Kaiming-uniform
    bound for the whole layer), layer by layer in model order, then cut to this rank's rows under
    tensor parallel: every layout starts from the same adapters.
    """
    from paddlenlp.peft import LoRAConfig, LoRAModel

    patterns = target_patterns(targets)
    names = [name for name, layer in model.named_sublayers()
             if isinstance(layer, _adaptable_classes()) and any(re.fullmatch(p, name) for p in patterns)]
    if not names:
        raise UserError(f"'{what}' = '{targets}' matches no linear layer of {type(model).__name__} "
                        "(names are the last part of a layer's path, e.g. q_proj, or regular expressions)")
    degree = int(getattr(model.config, "tensor_parallel_degree", 1) or 1)
    config = LoRAConfig(r=int(rank), lora_alpha=alpha, target_modules=patterns, lora_dropout=0.0,
                        trainable_modules=list(trainable) or None, tensor_parallel_degree=max(degree, 1))
    # LoRAModel replaces the matched layers inside ``model`` and marks only the adapters trainable;
    # the wrapper itself is not kept: the toolkit goes on with the model it knows
    LoRAModel(model, config)
    _initialise_a(model, seed)
    model._ppo_lora = {"lora_rank": int(rank), "lora_alpha": float(alpha), "lora_target_modules": targets,
                       "target_modules": patterns, "trainable_modules": list(trainable)}
    return model


def _initialise_a(model, seed: int) -> None:
    """Every A [in, r] from one numpy stream, whole, then this rank's row block when A is split
    (row-parallel layers); paddlenlp's own draw depends on the layout (a row-parallel A uses the
    model-parallel random state and the shard's fan-in)."""
    _, _, row_parallel = _lora_layer_classes()
    rng = np.random.default_rng(seed)
    with paddle.no_grad():
        for layer in lora_layers(model):
            rows, r = layer.lora_A.shape
            parts = layer.world_size if isinstance(layer, row_parallel) else 1
            bound = 1.0 / math.sqrt(rows * parts)
            whole = rng.uniform(-bound, bound, size=(rows * parts, r)).astype("float32")
            rank = layer.rank if parts > 1 else 0
            layer.lora_A.set_value(paddle.to_tensor(whole[rank * rows:(rank + 1) * rows]).astype(layer.lora_A.dtype))


def split_adapters(model) -> list[tuple[str, str]]:
    """(adapter parameter name, the name of the weight it is split like) for every adapter matrix
    that tensor parallel splits: B of a column-parallel layer (its output columns, as W's), A of a
    row-parallel layer (its input rows, as W's).  Empty without tensor parallel."""
    _, column_parallel, row_parallel = _lora_layer_classes()
    out = []
    for name, layer in model.named_sublayers():
        if isinstance(layer, column_parallel) and layer.is_mp:
            out.append((f"{name}.lora_B", f"{name}.weight"))
        elif isinstance(layer, row_parallel) and layer.is_mp:
            out.append((f"{name}.lora_A", f"{name}.weight"))
    return out


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


def save_adapters(model, folder: str, state: dict | None = None) -> None:
    """The adapters (``state``, default :func:`adapter_state`) and their settings into ``folder``
    (written to a temporary name, then renamed)."""
    tmp = folder.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    state = adapter_state(model) if state is None else state
    save_tensors(state, os.path.join(tmp, ADAPTER_FILE), {"format": "np"})
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(model._ppo_lora, f, indent=1)
    if os.path.isdir(folder):
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
