"""Resumable checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint folder ``checkpoint-N`` holds, besides the ``from_pretrained``-loadable models:

* ``optimizer[-<role>].rank<R>.safetensors`` and ``.json``: optimizer state of every rank (the
  moments and master weights as tensors, the LR scheduler and other numbers as JSON);
* ``rng.rank<R>.json``: paddle, numpy and python random states of every rank (+ trainer streams);
* ``trainer_state.json``: global step, epoch, trainer extras (KL controller, ptx position), the
  arguments and the library versions;
* ``manifest.json``: every file with its size and CRC-32C, written last.

Every rank writes into ``.tmp-checkpoint-N``; after a barrier the main rank writes the manifest and
renames the folder.  A folder with a manifest is complete by definition and never deleted by
cleanup (only ``save_total_limit`` rotation removes checkpoints); resume verifies every file
against the manifest first, so damage is one line naming the file.  Only ``.tmp-*`` folders,
writes that never finished, are removed on the next start.  The data order needs no state:
batches are a function of the step.  No state file of a checkpoint is a pickle (the model weights,
``model_state.pdparams``, still are); a checkpoint of an
earlier version (``.pdopt`` / ``.pkl`` state) still resumes, its pickles read only after
``ppo.storage.safe_pickle.check_pickle`` found nothing but data in them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import random
import shutil

import numpy as np
import paddle
import paddlenlp

import ppo
from ppo.distributed import parallel
from ppo.core.errors import UserError
from ppo.core.placement import canonical_pools
from ppo.storage.finite import check_weights_finite
from ppo.storage.graceful import uninterruptible
from ppo.storage.manifest import (MANIFEST, STATE, clean_partial, damage, discard, file_crc32c, finalize, is_complete,  # noqa: F401
                                  list_checkpoints, resolve_resume, rotate, tmp_folder)
from ppo.models.hf import export_folder
from ppo.models.lora import adapter_state, is_lora, merged_for_export, save_adapters, split_adapters
from ppo.storage.files import load_paddle_state, read_json, read_pickle, reading
from ppo.storage.tensors import (PICKLE_WEIGHTS, SAFE_WEIGHTS, folder_state, max_shard_size, model_weight_files,
                                 read_tensors, remove_weights, save_sharded, save_tensors)
from ppo.storage.output_dir import (check_fresh_start_after_auto, check_output_dir, clear_earlier_run,  # noqa: F401
                                    drop_metrics_after, release_output_dir, take_lock)
from ppo.distributed.parallel import inner_optimizer, unwrap
from ppo.distributed.pipeline import merged_state_dict, tensor_parallel_actions, tensor_parallel_state

HF_SUBFOLDER = "hf"  # the transformers copy of every final model
logger = logging.getLogger("ppo")

# Arguments that must match to resume exactly (the rest, e.g. logging_steps, may change).
RESUME_CRITICAL = (
    "model_name_or_path", "actor_model_name_or_path", "reward_model_name_or_path", "reward_critic_model_name_or_path",
    "train_datasets", "ptx_datasets", "max_length", "max_new_tokens", "seed", "per_device_train_batch_size",
    "per_device_prompt_batch_size", "gradient_accumulation_steps", "num_return_sequences", "adv_estimator",
    "tensor_parallel_degree", "pipeline_parallel_degree", "sharding_parallel_degree", "sharding", "world_size",
    "resource_pools",
)


def versions() -> dict:
    return {"ppo": ppo.__version__, "paddle": paddle.__version__, "paddlenlp": paddlenlp.__version__,
            "python": platform.python_version(), "numpy": np.__version__}


# ---------------------------------------------------------------------------------------------
# random states


def capture_rng(extra: dict | None = None) -> dict:
    return {"paddle": paddle.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "extra": extra or {}}


def restore_rng(state: dict) -> dict:
    paddle.set_rng_state(state["paddle"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    return state.get("extra", {})


def rng_to_json(state: dict) -> dict:
    """``capture_rng``'s state as JSON values: paddle's generator states by their (device, seed,
    offset, engine text), numpy's MT19937 state with its key as a list, python's as lists."""
    name, key, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {"paddle": [[g[0], g[1], g[2], bytes(g[3]).decode("latin-1")] for g in
                       (s.__getstate__() for s in state["paddle"])],
            "numpy": [name, np.asarray(key).tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next], "extra": state.get("extra", {})}


def rng_from_json(data: dict) -> dict:
    """The inverse of ``rng_to_json``: a state ``restore_rng`` takes."""
    from paddle.base import core

    generators = []
    for device, seed, offset, engine in data["paddle"]:
        g = core.GeneratorState.__new__(core.GeneratorState)
        g.__setstate__((int(device), int(seed), int(offset), list(engine.encode("latin-1"))))
        generators.append(g)
    name, key, pos, has_gauss, cached = data["numpy"]
    version, internal, gauss_next = data["python"]
    return {"paddle": generators, "numpy": (name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached),
            "python": (version, tuple(internal), gauss_next), "extra": data.get("extra", {})}


def write_tensors_and_json(base: str, state: dict) -> None:
    """``state`` (names -> tensors, dicts of tensors, or JSON values) as ``base.safetensors`` (every
    tensor, a dict's as ``<key>/<name>``) and ``base.json`` (the rest, and which keys were dicts)."""
    tensors, other, nested = {}, {}, []
    for key, value in state.items():
        if isinstance(value, dict) and value and all(isinstance(v, paddle.Tensor) for v in value.values()):
            nested.append(key)
            tensors.update({f"{key}/{name}": v.contiguous() for name, v in value.items()})
        elif isinstance(value, paddle.Tensor):
            tensors[key] = value.contiguous()
        else:
            other[key] = value
    save_tensors(tensors, base + ".safetensors")
    with open(base + ".json", "w") as f:
        json.dump({"values": other, "nested": nested}, f, indent=1)


def read_tensors_and_json(base: str, what: str) -> dict:
    """The inverse of ``write_tensors_and_json``."""
    tensors = read_tensors(base + ".safetensors", what)
    meta = read_json(base + ".json", what)
    state = dict(meta.get("values", {}))
    for key in meta.get("nested", []):
        state[key] = {}
    for name, value in tensors.items():
        head, _, tail = name.partition("/")
        if tail and head in state and isinstance(state[head], dict) and head in meta.get("nested", []):
            state[head][tail] = value
        else:
            state[name] = value
    return state


# ---------------------------------------------------------------------------------------------
# writing


def portable_optimizer_state(optimizer, model) -> dict:
    """Optimizer state keyed by structured parameter names (``llama.layers.0...``) instead of paddle's
    creation-order names (``linear_3.w_0``), so it loads into any process that built the same model."""
    names = {p.name: n for n, p in unwrap(model).named_parameters()}
    prefixes = sorted(names, key=len, reverse=True)
    out = {}
    for key, value in optimizer.state_dict().items():
        if key == "master_weights":
            out[key] = {names.get(k, k): v for k, v in value.items()}
            continue
        match = next((p for p in prefixes if key.startswith(p + "_")), None)
        out[f"@{names[match]}{key[len(match):]}" if match else key] = value
    return out


def load_portable_optimizer_state(optimizer, model, state: dict) -> None:
    names = {n: p.name for n, p in unwrap(model).named_parameters()}
    restored = {}
    for key, value in state.items():
        if key == "master_weights":
            restored[key] = {names.get(k, k): v for k, v in value.items()}
        elif key.startswith("@"):
            structured = next(n for n in sorted(names, key=len, reverse=True) if key[1:].startswith(n + "_"))
            restored[names[structured] + key[1 + len(structured):]] = value
        else:
            restored[key] = value
    optimizer.set_state_dict(restored)


def write_rank_state(tmp: str, rank: int, optimizers: dict, rng_extra: dict | None = None) -> None:
    """This rank's optimizer states ({role: (optimizer, model)}) and random states into ``tmp``."""
    os.makedirs(tmp, exist_ok=True)
    for role, (optimizer, model) in optimizers.items():
        suffix = f"-{role}" if role else ""
        write_tensors_and_json(os.path.join(tmp, f"optimizer{suffix}.rank{rank}"), portable_optimizer_state(optimizer, model))
    with open(os.path.join(tmp, f"rng.rank{rank}.json"), "w") as f:
        json.dump(rng_to_json(capture_rng(rng_extra)), f)


# ---------------------------------------------------------------------------------------------
# finding and reading

def load_state(folder: str, args, stage: str, world_size: int) -> dict:
    """The saved trainer state, after checking it belongs to a compatible run."""
    path = os.path.join(folder, STATE)
    with reading(path, "trainer state"):
        state = read_json(path, "checkpoint state")
        assert isinstance(state, dict) and isinstance(state.get("args", {}), dict), "not a JSON object"
        int(state["global_step"])
    if state.get("stage") != stage:
        raise UserError(f"checkpoint '{folder}' is from the {state.get('stage')!r} stage, not {stage!r}")
    saved = dict(state.get("args", {}), world_size=state.get("world_size"))
    current = dict(vars(args), world_size=world_size)
    if "resource_pools" in saved:  # the layout, however the checkpoint's run spelled it
        saved["resource_pools"] = canonical_or_text(saved["resource_pools"])
    for key in RESUME_CRITICAL:
        if key in current and key in saved and saved[key] != current[key]:
            raise UserError(f"cannot resume from '{folder}': '{key}' was {saved[key]!r} there and is "
                            f"{current[key]!r} now")
    return state


def canonical_or_text(pools) -> object:
    """``resource_pools`` as a run records it now (``canonical_pools``); as saved if it does not parse."""
    try:
        return canonical_pools(pools)
    except (UserError, AttributeError):
        return pools


def load_rank_state(folder: str, rank: int, optimizers: dict) -> dict:
    """Restore this rank's optimizers ({role: (optimizer, model)}) and random states; returns extra streams."""
    for role, (optimizer, model) in optimizers.items():
        suffix = f"-{role}" if role else ""
        base = os.path.join(folder, f"optimizer{suffix}.rank{rank}")
        if os.path.isfile(base + ".safetensors"):
            with reading(base + ".safetensors", "optimizer state"):
                load_portable_optimizer_state(optimizer, model, read_tensors_and_json(base, "optimizer state"))
            continue
        path = base + ".pdopt"  # a checkpoint of an earlier version: a pickle, read once checked
        if not os.path.isfile(path):
            raise UserError(f"checkpoint '{folder}' has no optimizer state for rank {rank} "
                            f"({os.path.basename(base)}.safetensors)")
        with reading(path, "optimizer state"):
            load_portable_optimizer_state(optimizer, model, load_paddle_state(path, "optimizer state"))
    path = os.path.join(folder, f"rng.rank{rank}.json")
    if os.path.isfile(path):
        with reading(path, "random state"):
            return restore_rng(rng_from_json(read_json(path, "random state")))
    path = os.path.join(folder, f"rng.rank{rank}.pkl")
    with reading(path, "random state"):
        return restore_rng(read_pickle(path, "random state"))


def load_weights(model, folder: str) -> None:
    """Weights saved by ``save_model`` (merged; safetensors, or the pickle of an earlier version)
    into this rank's ``model``, exactly."""
    if not model_weight_files(folder):
        raise UserError(f"checkpoint '{folder}' has no model weights ({SAFE_WEIGHTS} or {PICKLE_WEIGHTS})")
    with reading(folder, "weights"):
        load_full_weights(model, folder_state(folder))


# ---------------------------------------------------------------------------------------------
# whole models: merged over tensor / pipeline parallel on the way out, split on the way in


def save_model(model, folder: str, tokenizer=None) -> None:
    """``save_pretrained`` a full (merged) checkpoint in safetensors; call on every rank.

    With tensor parallel the ranks of the first data group gather their shards (paddlenlp's
    ``merge_tensor_parallel``) and the global main rank writes; otherwise the main rank writes.
    """
    ctx = parallel.context()
    inner = unwrap(model)
    if ctx.is_main:  # the main rank writes: the weights it replaces go first, whatever their layout
        remove_weights(folder)
    if ctx.pp_degree > 1:
        _save_pipeline(inner, folder)
    elif ctx.tp_degree > 1 and is_lora(inner):
        # paddlenlp's merge knows the model's split weights, not the split adapters
        if ctx.data_rank == 0:
            _write_whole(inner, tensor_parallel_state(inner), folder)
    elif ctx.tp_degree > 1:
        if ctx.data_rank == 0:
            inner.save_pretrained(folder, merge_tensor_parallel=True, is_main_process=ctx.is_main,
                                  safe_serialization=True, max_shard_size=max_shard_size())
    elif ctx.is_main:
        inner.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size())
    if ctx.is_main and tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _save_pipeline(pipe, folder: str) -> None:
    """Gather a pipeline (and tensor) parallel model into one checkpoint of its non-pipeline class."""
    _write_whole(pipe, merged_state_dict(pipe), folder, architecture=pipe.single_class_name)


def _write_whole(model, state: dict | None, folder: str, architecture: str | None = None) -> None:
    """The main rank writes the whole-model ``state`` ({name: numpy}) with ``model``'s config set to
    one rank (and to ``architecture``, when given): what ``from_pretrained`` loads."""
    if not parallel.context().is_main:
        return
    os.makedirs(folder, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.tensor_parallel_degree, config.tensor_parallel_rank = 1, 0
    if architecture is not None:
        config.architectures = [architecture]
    config.save_pretrained(folder)
    save_sharded(state, folder)  # paddlenlp's safetensors layout: its names, format "np", its index


def load_full_weights(model, state: dict) -> None:
    """Load a merged state ({name: tensor}) into this rank's (possibly tensor-parallel) model."""
    inner = unwrap(model)
    if parallel.context().tp_degree > 1:
        state = inner.convert_tensor_parallel(None, inner.config, state_dict=state)
        # paddlenlp splits the model's weights; split LoRA adapters are cut here by their weight's rule
        actions = tensor_parallel_actions(inner, is_split=True)
        for name, _ in split_adapters(inner):
            if name in state:
                state[name] = paddle.to_tensor(actions[name](state[name].numpy()))
    inner.set_state_dict(state)


def save_checkpoint(target: str, ctx, models: dict, tokenizer, optimizers: dict, state: dict,
                    rng_extra: dict | None = None, remote=None) -> None:
    """Write a resumable checkpoint from every rank (call on all ranks).

    models: {subfolder: model} saved with save_pretrained by the main rank ('' = the folder itself).
    ``remote(tmp)``: on every rank, the other pools write their part into the unfinished folder
    (resource_pools: the critic's pool), before it is published.
    """
    tmp = tmp_folder(target)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    parallel.barrier()
    for sub, model in models.items():
        save_model(model, os.path.join(tmp, sub), tokenizer)
    parallel.barrier()
    write_rank_state(tmp, ctx.rank, {role: (inner_optimizer(o), models[role_model(role)])
                                     for role, o in optimizers.items()}, rng_extra)
    if remote is not None:
        remote(tmp)
    parallel.barrier()
    if ctx.is_main:
        finalize(tmp, target, {**state, "world_size": ctx.world_size, "versions": versions()})
    parallel.barrier()


def resume(folder: str, ctx, args, stage: str, models: dict, optimizers: dict) -> tuple[dict, dict]:
    """Load weights, optimizer and random states of ``folder``; returns (trainer state, rng extras)."""
    state = load_state(folder, args, stage, ctx.world_size)
    for sub, model in models.items():
        load_weights(model, os.path.join(folder, sub))
    extra = load_rank_state(folder, ctx.rank, {role: (inner_optimizer(o), models[role_model(role)])
                                               for role, o in optimizers.items()})
    return state, extra


def role_model(role: str) -> str:
    """The model subfolder an optimizer role belongs to."""
    return {"": "", "actor": "policy", "critic": "value"}[role]


# ---------------------------------------------------------------------------------------------
# the final model (from_pretrained-loadable) and the start of a run


def _tmp_for(target: str) -> str:
    """``tmp_folder(target)``, its parent folder created."""
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    return tmp_folder(target)


def publish(tmp: str, target: str) -> None:
    """Make the finished folder ``tmp`` the new ``target``, removing nothing else.

    A missing ``target`` is the renamed ``tmp`` (one step).  An existing one (the final SFT/RM model
    goes to ``output_dir`` itself, beside metrics, logs and step checkpoints) gets the finished files
    moved in one by one with ``os.replace``: only entries of the same names are replaced.
    """
    if not os.path.isdir(target):
        os.rename(tmp, target)
        return
    with uninterruptible():  # a second signal waits for these renames: never a half-replaced model
        for name in os.listdir(tmp):
            src, dst = os.path.join(tmp, name), os.path.join(target, name)
            if os.path.isdir(src) and os.path.isdir(dst):
                shutil.rmtree(dst)  # a same-named model subfolder: os.replace cannot replace a non-empty one
            os.replace(src, dst)
    shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained_atomic(model, tokenizer, target: str, extra: dict | None = None) -> None:
    """The final model, from_pretrained-loadable and merged over tensor parallel; call on every rank."""
    ctx = parallel.context()

    def write(tmp):
        save_model(model, tmp, tokenizer)
        if extra and ctx.is_main:
            with open(os.path.join(tmp, "training_state.json"), "w") as f:
                json.dump(extra, f, indent=1)
        if ctx.is_main:
            export_hf(tmp)

    # with tensor parallel every rank of the first data group takes part in the merge
    tmp = _tmp_for(target)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    parallel.barrier()
    write(tmp)
    parallel.barrier()
    if ctx.is_main:
        publish(tmp, target)
    parallel.barrier()


def save_final_model(model, tokenizer, target: str, extra: dict) -> None:
    """A final model: finite weights checked, written atomically (merged over tensor parallel; a
    LoRA model merged too, so plain ``from_pretrained`` loads it, its adapters in ``lora/``
    beside it).  Call on every rank."""
    inner = parallel.unwrap(model)
    check_weights_finite({"": model}, "the final model")
    with merged_for_export(inner):
        save_pretrained_atomic(model, tokenizer, target, extra=extra)
    if is_lora(inner):
        # whole adapters: gathered over tensor parallel (every rank takes part), written by the main rank
        adapters = adapter_state(inner)
        if parallel.context().tp_degree > 1:
            adapters = tensor_parallel_state(inner, names=set(adapters))
        if parallel.context().is_main:
            save_adapters(inner, os.path.join(target, "lora"), adapters)


def export_hf(folder: str) -> None:
    """The saved final model in ``folder`` also as a transformers folder, ``<folder>/hf`` (what users
    take to serving; see ``ppo.models.hf``)."""
    export_folder(folder, os.path.join(folder, HF_SUBFOLDER))


def _main_decides(ctx, decide):
    """``decide()`` run on the main rank alone; every rank returns its result or raises its UserError."""
    result, message = None, None
    if ctx.is_main:
        try:
            result = decide()
        except UserError as e:
            message = str(e)
    result, message = parallel.from_main((result, message))
    if message is not None:
        raise UserError(message)
    return result


def drop_metrics_logged_after(args, ctx, step: int) -> None:
    """Main rank, a resuming run about to train from ``step`` (0: no checkpoint yet): the rows of
    metrics.jsonl after it go (this run logs those steps again; each step is logged once)."""
    if ctx.is_main and args.resume_from_checkpoint and drop_metrics_after(args.output_dir, step):
        logger.warning("metrics.jsonl: removed the rows after step %d, which this run logs again", step)


def start_or_resume(args, ctx, stage: str) -> str | None:
    """The checkpoint to resume from, if any (all ranks agree), once the output folder is the run's.

    Checks first, writing nothing: the checkpoint and its arguments, then the folder (no live run's
    lock; no other run's results unless resuming or ``overwrite_output_dir``).  Only then the main
    rank takes the lock, clears the earlier run's checkpoints and metrics when overwriting, and
    removes unfinished writes (``.tmp-*``).  The metric rows after the resumed step go once every
    file of the checkpoint has been read (``drop_metrics_logged_after``, when training starts).
    """
    overwrite = bool(getattr(args, "overwrite_output_dir", False))

    def decide():
        folder = resolve_resume(args.resume_from_checkpoint, args.output_dir)
        step = int(load_state(folder, args, stage, ctx.world_size)["global_step"]) if folder else 0
        stale = check_output_dir(args.output_dir, bool(args.resume_from_checkpoint), overwrite)
        if args.resume_from_checkpoint and folder is None and not overwrite:  # 'auto' found none intact
            check_fresh_start_after_auto(args.output_dir)
        take_lock(args.output_dir, stale)
        return folder, step

    folder, step = _main_decides(ctx, decide)
    if ctx.is_main:
        if overwrite and folder is None:
            for name in clear_earlier_run(args.output_dir):
                logger.warning("overwrite_output_dir: removed the earlier run's %s", os.path.join(args.output_dir, name))
        for name in clean_partial(args.output_dir):
            logger.warning("removed the unfinished checkpoint write %s", os.path.join(args.output_dir, name))
    parallel.barrier()
    return folder
