"""Moving model and optimizer state out of process memory between PPO phases, and back.

``offload_level`` names what may leave memory while a phase does not need it:

* ``freeze_model``: the models that are never trained (reference model, reward model);
* ``optimizer``: optimizer state (Adam moments, beta-pow accumulators, master weights);
* ``train_model``: the weights of the models being trained (actor, critic).

How a tensor leaves: its bytes are copied to a store, then ``tensor._clear_data()`` drops the
tensor's storage while the Python object stays, with its name, shape, dtype and stop_gradient, and
with every reference that layers and optimizers hold to it. Coming back, fresh storage is attached
to that same object. Paddle's own sharding (stage 3) frees and restores parameters the same way.

Two stores, picked by ``default_store()``:

* ``PinnedStore`` (CUDA builds with a visible device): device tensors go to page-locked host memory,
  from which the copy back to the device is fast;
* ``FileStore`` (CPU builds): bytes go to a file in a temporary directory, so the process really
  shrinks; there is no other memory to move to.

Gradients are not moved: call ``optimizer.clear_grad(set_to_zero=False)`` to free them.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import tempfile
import weakref

import numpy as np
import paddle

from ppo.core.errors import UserError, closest
from ppo.distributed.parallel import device

OFFLOAD_LEVELS = ("freeze_model", "optimizer", "train_model")


def parse_offload_level(text: str) -> frozenset[str]:
    """``"freeze_model optimizer"`` -> ``frozenset({"freeze_model", "optimizer"})``; "" -> empty."""
    words = (text or "").split()
    for word in words:
        if word not in OFFLOAD_LEVELS:
            raise UserError(f"offload_level: unknown word '{word}'{closest(word, OFFLOAD_LEVELS)}; "
                            f"accepted (space separated): {', '.join(OFFLOAD_LEVELS)}")
    return frozenset(words)


# ---------------------------------------------------------------------------------------------
# Stores


class OffloadStore:
    """Holds the contents of released tensors, in groups under a key.

    ``put`` and ``get`` are idempotent: putting a key that is already held, or getting a key that
    is not, does nothing. ``close()`` brings back whatever is still held, so no weights are lost,
    then frees the store's own resources.
    """

    def __init__(self):
        self._groups = {}

    def __contains__(self, key) -> bool:
        return key in self._groups

    def put(self, key, tensors) -> None:
        """Copy ``tensors`` out and release their storage."""
        if key in self._groups:
            return
        # A tensor without storage is already held elsewhere (e.g. a weight tied between models);
        # it comes back with the group that released it.
        resident = [t for t in _unique(tensors) if t._is_initialized()]
        self._groups[key] = self._move_out(resident)

    def get(self, key) -> None:
        """Restore the tensors of ``key`` in place."""
        group = self._groups.pop(key, None)
        if group is not None:
            self._move_in(group)

    def close(self) -> None:
        for key in list(self._groups):
            self.get(key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Backends: _move_out copies and releases a list of tensors, returning what _move_in needs.
    def _move_out(self, tensors):
        raise NotImplementedError

    def _move_in(self, group) -> None:
        raise NotImplementedError


class FileStore(OffloadStore):
    """CPU builds: each group's bytes go to one file in a private directory under ``folder``.

    Put ``folder`` on a disk: on a tmpfs the file still occupies RAM, only outside this process.
    """

    def __init__(self, folder: str | None = None):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ppo-offload-", dir=folder or tempfile.gettempdir())
        # Removes the directory even if close() is never called (crash, interpreter exit).
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        self._file_ids = itertools.count()

    def _move_out(self, tensors):
        path = os.path.join(self.dir, f"{next(self._file_ids)}.bin")
        records = []
        try:
            with open(path, "wb") as f:
                for t in tensors:
                    array = t.numpy()  # bfloat16 comes out as uint16 with the same bits
                    array.tofile(f)
                    records.append((t, _concrete(t.place), t.dtype, array.dtype, array.shape))
        except BaseException:
            os.remove(path)  # nothing was released yet: a failed write (disk full) loses nothing
            raise
        for t in tensors:
            t._clear_data()
        _return_freed_memory()
        return path, records

    def _move_in(self, group) -> None:
        path, records = group
        with open(path, "rb") as f:
            for t, place, dtype, np_dtype, shape in records:
                array = np.fromfile(f, dtype=np_dtype, count=int(np.prod(shape))).reshape(shape)
                # set() gives the same DenseTensor new storage holding a copy of the array; dtype
                # follows the array (uint16 maps back to bfloat16), so check it came back.
                t.get_tensor().set(array, place)
                assert t.dtype == dtype, f"offload: {t.name} came back as {t.dtype}, not {dtype}"
        os.remove(path)

    def close(self) -> None:
        super().close()
        self._remove_dir()


class PinnedStore(OffloadStore):
    """CUDA builds: device tensors go to page-locked host memory."""

    def _move_out(self, tensors):
        group = [(t, t.pin_memory(), t.place) for t in tensors
                 # Adam's beta-pow accumulators may live on the host already.
                 if t.place.is_gpu_place()]
        for t, _, _ in group:
            t._clear_data()
        # Paddle's allocator caches freed blocks; hand them back so the next phase can use them.
        paddle.device.cuda.empty_cache()
        return group

    def _move_in(self, group) -> None:
        for t, host, place in group:
            host._copy_to(place, True)._share_buffer_to(t)


def default_store(folder: str | None = None) -> OffloadStore:
    """Pinned host memory on CUDA builds with a visible device, else files under ``folder``."""
    return PinnedStore() if device() == "gpu" else FileStore(folder)


def _concrete(place):
    # DenseTensor.set() takes CPUPlace / CUDAPlace, not the generic Place a tensor reports.
    return paddle.CUDAPlace(place.gpu_device_id()) if place.is_gpu_place() else paddle.CPUPlace()


def _return_freed_memory() -> None:
    # glibc keeps freed blocks in its heap for reuse, so without a trim the release often does not
    # show in the process size; malloc_trim hands the free pages back to the OS.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _unique(tensors):
    seen, out = set(), []
    for t in tensors:
        if isinstance(t, paddle.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Models and optimizers


def _model_tensors(model) -> list:
    return _unique(itertools.chain(model.parameters(), model.buffers()))


def _optimizer_tensors(optimizer) -> list:
    tensors = [t for per_param in optimizer._accumulators.values() for t in per_param.values()]
    tensors += getattr(optimizer, "_master_weights", {}).values()
    # After set_state_dict and before the first step, loaded state waits here (e.g. on resume).
    tensors += getattr(optimizer, "_accumulators_holder", {}).values()
    return _unique(tensors)


def _key(kind: str, obj, key):
    # Separate namespaces: a model and its optimizer can both be offloaded under "actor".
    return (kind, id(obj) if key is None else key)


def offload_model(model, store: OffloadStore, key=None) -> None:
    """Release every parameter and buffer of ``model`` into ``store`` (key defaults to the model)."""
    store.put(_key("model", model, key), _model_tensors(model))


def reload_model(model, store: OffloadStore, key=None) -> None:
    """Bring back what ``offload_model(model, store, key)`` released; a no-op if nothing is held."""
    store.get(_key("model", model, key))


def offload_optimizer(optimizer, store: OffloadStore, key=None) -> None:
    """Release every accumulator and master weight of ``optimizer`` into ``store``."""
    store.put(_key("optimizer", optimizer, key), _optimizer_tensors(optimizer))


def reload_optimizer(optimizer, store: OffloadStore, key=None) -> None:
    """Bring back what ``offload_optimizer(optimizer, store, key)`` released."""
    store.get(_key("optimizer", optimizer, key))


# ---------------------------------------------------------------------------------------------
# Around the PPO phases


class PhaseOffload:
    """Which state leaves memory around which PPO phase (``offload_level``); a no-op when empty.

    generation: reference, reward model, critic weights and optimizer states may be out;
    scoring:    reference, reward model and critic are back; optimizer states stay out;
    update:     optimizer states are back; reference and reward model go out again.
    When rollout runs on separate copies (``eval_mode``, pipeline parallel), ``train_model`` takes
    the training actor and critic out from generation to the update: the copies decode and score.
    Parameter objects keep their identity, so optimizers update the same tensors.

    ``frozen``: name -> never-trained model; ``optimizers``: name -> inner optimizer;
    ``trained``: name -> training model that may leave during generation (``train_model``);
    ``trained_scores``: the training critic itself scores (no separate rollout copy), so the
    trained models come back before scoring.
    """

    def __init__(self, levels: frozenset, folder: str, frozen: dict, optimizers: dict, trained: dict,
                 trained_scores: bool):
        self.levels = levels
        self.store = default_store(folder or None) if levels else None
        self.frozen = frozen if "freeze_model" in levels else {}
        self.optimizers = optimizers if "optimizer" in levels else {}
        self.trained = trained if "train_model" in levels else {}
        self.trained_scores = trained_scores
        self._move(self.frozen, offload_model)

    def _move(self, objects: dict, move) -> None:
        for name, obj in objects.items():
            move(obj, self.store, name)

    def before_generation(self):
        self._move(self.optimizers, offload_optimizer)
        self._move(self.trained, offload_model)

    def before_scoring(self):
        self._move(self.frozen, reload_model)
        if self.trained_scores:
            self.reload_trained()

    def after_scoring(self):
        self._move(self.frozen, offload_model)

    def before_update(self):
        self._move(self.optimizers, reload_optimizer)
        self.reload_trained()

    def reload_trained(self):
        """The training weights back in memory (a no-op for what is not out)."""
        self._move(self.trained, reload_model)

    def close(self):
        """Everything back in memory and the store's files removed."""
        if self.store is not None:
            self.store.close()
