"""Start-up, groups, collectives and fleet's wrappers: with ``pipeline.py`` (pipeline-parallel
models), ``vocab.py`` (vocabulary-parallel logits) and ``cpu_fleet.py`` (fleet's CPU adaptations)
the only modules that call
paddle.distributed / fleet or read the private attributes of fleet's wrappers.

Layout: world = data x sharding x pipeline x tensor (fleet's hybrid topology).  Trainers ask this
module for the rank/degree they need, for reductions of python/numpy values and for the plain
model / optimizer inside a wrapper (``unwrap``, ``inner_optimizer``); the math, the loop, the
inference paths and the checkpoints never import paddle.distributed themselves.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.distributed as dist

from ppo.core.placement import plan_pools
from ppo.distributed import pools
from ppo.distributed.cpu_fleet import enable_cpu_fleet
from ppo.core.errors import UserError


@dataclass
class ParallelContext:
    world_size: int = 1
    rank: int = 0
    dp_degree: int = 1           # data-parallel replicas (sharding ranks also see different data)
    dp_rank: int = 0
    sharding_degree: int = 1
    sharding_rank: int = 0
    tp_degree: int = 1           # tensor parallel (fleet calls it model parallel, "mp")
    tp_rank: int = 0
    pp_degree: int = 1
    pp_rank: int = 0
    hcg: object = None           # fleet's HybridCommunicateGroup, None in a single process
    plan: object = None          # the resource pools (pools.PoolPlan), None: every role on every rank
    pool: object = None          # this rank's pool (pools.Pool), None without pools
    group: object = None         # the ranks that train together (the actor's pool); None: the world
    leaders: tuple = ()          # with pools: the world rank of each data rank's first rank, by data rank
    links: dict = None           # with pools: {(first rank, peer rank): their process group} (pools.init_fleet)
    pool_group: object = None    # with pools, on a critic pool's rank: the pool's process group (None: one rank)

    @property
    def serves(self) -> bool:
        """This rank holds roles for the actor's pool (a pool of its own: frozen roles, the critic)."""
        return self.pool is not None and self.pool is not self.plan.actor

    @property
    def data_world(self) -> int:
        """Ranks that consume different samples: data parallel x sharding."""
        return self.dp_degree * self.sharding_degree

    @property
    def data_rank(self) -> int:
        return self.dp_rank * self.sharding_degree + self.sharding_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_CONTEXT = ParallelContext()


def context() -> ParallelContext:
    return _CONTEXT


def device() -> str:
    """'gpu' on CUDA builds with a visible device, else 'cpu'."""
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return "gpu"
    return "cpu"


def init_parallel(args, pipeline: bool = False) -> ParallelContext:
    """Start fleet for the degrees in ``args`` (a no-op in a single process).

    ``pipeline``: the caller trains pipeline-parallel models (the PPO actor and critic); fleet's pipeline
    schedule then splits each optimizer step into ``gradient_accumulation_steps`` micro-batches.
    """
    global _CONTEXT
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    mp, pp, sd = (int(getattr(args, f"{k}_parallel_degree", 1)) for k in ("tensor", "pipeline", "sharding"))
    if _CONTEXT.distributed and (_CONTEXT.tp_degree, _CONTEXT.pp_degree, _CONTEXT.sharding_degree) == (mp, pp, sd):
        return _CONTEXT  # fleet is up in this layout already (online DPO's rounds, a pool's second call)

    def data_world(size: int) -> int:
        if size % (mp * pp * sd) != 0:
            where = f"the actor's pool of {size} rank(s) (resource_pools)" if size != world else f"the world size {world}"
            raise UserError(f"tensor_parallel_degree ({mp}) x pipeline_parallel_degree ({pp}) x "
                            f"sharding_parallel_degree ({sd}) = {mp * pp * sd} does not divide {where}")
        return size // (mp * pp)  # the ranks that see different data: data parallel x sharding

    plan = plan_pools(getattr(args, "resource_pools", ""), world, data_world, pipeline=pp > 1,
                      merged_rollout=getattr(args, "eval_mode", "") == "single" and mp > 1,
                      has_reward_model=bool(getattr(args, "reward_model_name_or_path", "")),
                      uses_critic=getattr(args, "adv_estimator", "gae") == "gae")
    size = plan.actor.size if plan is not None else world  # the ranks fleet's hybrid layout covers
    dp = data_world(size) // sd
    if world == 1:
        _CONTEXT = ParallelContext()
        return _CONTEXT
    if pp > 1 and not pipeline:
        raise UserError("pipeline_parallel_degree > 1 is supported for PPO (actor and critic); reward-model and "
                        "SFT training use tensor parallel, sharding and data parallel")
    if sd > 1 and getattr(args, "sharding", "") == "stage2" and (mp > 1 or pp > 1 or dp > 1):
        raise UserError(f"sharding 'stage2' shards over all data ranks alone: set sharding_parallel_degree to the "
                        f"world size {size} (tensor, pipeline and data parallel degree 1), or use 'stage1'")
    paddle.set_device(device())
    from paddle.distributed import fleet

    enable_cpu_fleet()  # CPU builds: fleet over gloo (no-op with an accelerator)

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": dp, "mp_degree": mp, "pp_degree": pp, "sharding_degree": sd}
    if pp > 1:
        # shapes change between updates (each rollout has its own length): no p2p shape cache
        strategy.pipeline_configs = {"accumulate_steps": int(args.gradient_accumulation_steps),
                                     "micro_batch_size": int(args.per_device_train_batch_size),
                                     "p2p_cache_shape": False}
    group = pool = None
    leaders, links = (), {}
    if plan is None:
        fleet.init(is_collective=True, strategy=strategy)
    else:  # fleet's hybrid groups over the actor's pool (every rank makes them), the pool's own group
        rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
        group, pool, leaders, links, pool_group = pools.init_fleet(fleet, strategy, plan, rank, sd)
        if pool is not plan.actor:  # a pool's rank: no layout of its own, it serves the actor's pool
            _CONTEXT = ParallelContext(world_size=world, rank=rank, plan=plan, pool=pool, group=group,
                                       leaders=leaders, links=links, pool_group=pool_group)
            return _CONTEXT
    hcg = fleet.get_hybrid_communicate_group()
    _CONTEXT = ParallelContext(
        world_size=world, rank=dist.get_rank(), dp_degree=dp, dp_rank=hcg.get_data_parallel_rank(),
        sharding_degree=sd, sharding_rank=hcg.get_sharding_parallel_rank(), tp_degree=mp, pp_degree=pp, hcg=hcg,
        tp_rank=hcg.get_model_parallel_rank(), pp_rank=hcg.get_stage_id(), plan=plan, pool=pool, group=group,
        leaders=leaders, links=links)
    return _CONTEXT



@contextlib.contextmanager
def alone():
    """Within it this rank acts as one process (the main rank, no collectives): a resource pool's
    rank writing what it alone holds (the critic's pool writes value/)."""
    global _CONTEXT
    saved, _CONTEXT = _CONTEXT, ParallelContext()
    try:
        yield
    finally:
        _CONTEXT = saved


_ROLLOUT_GROUPS: dict = {}


def rollout_group(merge_tensor_parallel: bool):
    """The ranks that share one data rank's rollout and split it between them (None: no split).

    They are the ranks of one pipeline (the pipeline group) and, when the rollout model is whole
    on every rank (``merge_tensor_parallel``), also its tensor-parallel ranks.  Collective on first
    use: every rank must call it with the same argument.
    """
    if not _CONTEXT.distributed:
        return None
    ranks_per_group = _CONTEXT.pp_degree * (_CONTEXT.tp_degree if merge_tensor_parallel else 1)
    if ranks_per_group == 1:
        return None
    if merge_tensor_parallel not in _ROLLOUT_GROUPS:
        hcg = _CONTEXT.hcg
        if not merge_tensor_parallel or _CONTEXT.tp_degree == 1:
            _ROLLOUT_GROUPS[merge_tensor_parallel] = hcg.get_pipe_parallel_group()
        elif _CONTEXT.pp_degree == 1:
            _ROLLOUT_GROUPS[True] = hcg.get_model_parallel_group()
        else:
            _ROLLOUT_GROUPS[True] = hcg.create_fuse_group(["pipe", "model"])[1]
    return _ROLLOUT_GROUPS[merge_tensor_parallel]


def pipeline_sum(values) -> list:
    """Element-wise sum of a list of floats over the pipeline stages (identity without pipeline)."""
    if _CONTEXT.pp_degree <= 1:
        return [float(v) for v in values]
    return _sum_over(_CONTEXT.hcg.get_pipe_parallel_group(), values)


def broadcast_from_last_stage(values) -> list:
    """The last pipeline stage's list of floats, on every stage (identity without pipeline)."""
    if _CONTEXT.pp_degree <= 1:
        return [float(v) for v in values]
    group = _CONTEXT.hcg.get_pipe_parallel_group()
    return _floats_over(group, values, lambda t: dist.broadcast(t, src=group.ranks[-1], group=group))


def tp_kwargs() -> dict:
    """Config overrides that make paddlenlp build (and split at load time) this rank's model shard."""
    if _CONTEXT.tp_degree <= 1:
        return {}
    return {"tensor_parallel_degree": _CONTEXT.tp_degree, "tensor_parallel_rank": _CONTEXT.tp_rank}


def model_parallel_sum(local_sum: float, replicated_sum: float) -> float:
    """Sum of a quantity split over the tensor-parallel ranks plus its replicated part."""
    if _CONTEXT.tp_degree <= 1:
        return local_sum + replicated_sum
    return _sum_over(_CONTEXT.hcg.get_model_parallel_group(), [local_sum])[0] + replicated_sum


def _floats_over(group, values, collective) -> list:
    """A list of floats through ``collective(tensor)`` over ``group``, as one float64 tensor."""
    t = paddle.to_tensor(np.asarray(values, dtype=np.float64))
    collective(t)
    return [float(v) for v in t.numpy()]


def _sum_over(group, values) -> list:
    """Element-wise sum of a list of floats over ``group`` (float64)."""
    return _floats_over(group, values, lambda t: dist.all_reduce(t, group=group))


def is_sharding_stage2(optimizer) -> bool:
    """True for paddle's group-sharded stage-2 optimizer wrapper."""
    from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_optimizer_stage2 import (
        GroupShardedOptimizerStage2,
    )

    return isinstance(optimizer, GroupShardedOptimizerStage2)


def sync_grads(optimizer, parameters):
    """Run a hybrid optimizer's gradient synchronisation now, when it does one in its ``step``
    (sharding stage 1; data parallel next to tensor or pipeline parallel), and return
    (the parameters whose gradients this rank now holds averaged, whether they are a sharding
    rank's share); (None, False) otherwise.

    The optimizer's next ``step`` skips its own synchronisation, so gradients are reduced once.
    """
    if is_sharding_stage2(optimizer):  # gradients were reduced to their owner in backward
        return [p for p in parameters if optimizer._param2rank.get(p.name) == optimizer._rank], True
    sync = getattr(optimizer, "_hybrid_sync_grad", None)
    sharded = bool(getattr(optimizer, "_sharding_enable", False))
    if sync is None or not (sharded or getattr(optimizer, "_dp_enable", False)):
        return None, False
    if not hasattr(optimizer, "_ppo_sync_once"):
        original = type(optimizer)._hybrid_sync_grad

        def sync_once(params, _opt=optimizer, _original=original):
            if _opt._ppo_synced:
                _opt._ppo_synced = False
                return
            _original(_opt, params)

        optimizer._ppo_sync_once = True
        optimizer._ppo_synced = False
        optimizer._hybrid_sync_grad = sync_once
    from paddle.distributed.fleet.utils.hybrid_parallel_util import obtain_optimizer_parameters_list

    all_params = list(obtain_optimizer_parameters_list(optimizer._inner_opt))
    type(optimizer)._hybrid_sync_grad(optimizer, all_params)
    optimizer._ppo_synced = True
    if not sharded:
        return list(parameters), False
    owned = set(id(p) for p in optimizer._inner_opt.filter_parameters(all_params, _CONTEXT.hcg))
    return [p for p in parameters if id(p) in owned], True


def sharding_sum(values):
    """Element-wise sum of a list of floats over the sharding group."""
    return _sum_over(_CONTEXT.hcg.get_sharding_parallel_group(), values)


# ---------------------------------------------------------------------------------------------
# fleet's wrappers


def unwrap(model):
    """The plain layer inside fleet / DataParallel / sharding wrappers."""
    while hasattr(model, "_layers"):
        model = model._layers
    while hasattr(model, "_layer") and not hasattr(model, "save_pretrained"):
        model = model._layer
    return model


def inner_optimizer(optimizer):
    """The paddle optimizer inside fleet's wrappers (its state_dict is the real one)."""
    while hasattr(optimizer, "_inner_opt") or hasattr(optimizer, "_optim"):
        optimizer = getattr(optimizer, "_inner_opt", None) or optimizer._optim
    return optimizer


# A parameter replicated on every tensor-parallel rank but applied to this rank's shard only (Qwen3's
# per-head q/k norm weights: each rank normalises its own heads) gets a partial gradient on each rank;
# a family marks it with this attribute, and training sums its gradient over the group.
PARTIAL_GRAD = "tensor_parallel_partial_grad"


def sum_partial_grads(model) -> int:
    """Make every backward sum the gradient of ``model``'s parameters marked ``PARTIAL_GRAD`` over
    the tensor-parallel group before it is accumulated (a hook on each, registered once), so that
    every rank holds the full gradient, as one process computes it; returns how many are marked.
    Per backward rather than per step: exact under gradient accumulation and micro-steps."""
    marked = [p for p in model.parameters() if getattr(p, PARTIAL_GRAD, False) and not p.stop_gradient]
    if _CONTEXT.tp_degree <= 1:
        return len(marked)
    group = _CONTEXT.hcg.get_model_parallel_group()

    def summed(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for p in marked:
        if not getattr(p, "_ppo_partial_grad_hook", False):
            p.register_hook(summed)
            p._ppo_partial_grad_hook = True
    return len(marked)


def wrap_for_training(model, optimizer, sharding_stage: str = ""):
    """Hand a model and its optimizer to fleet (data parallel / sharding); identity in one process.
    Parameters with partial gradients under tensor parallel get theirs summed (``sum_partial_grads``)."""
    if not _CONTEXT.distributed:
        return model, optimizer
    sum_partial_grads(model)
    from paddle.distributed import fleet

    if _CONTEXT.sharding_degree > 1 and sharding_stage == "stage2":
        from paddle.distributed.sharding import group_sharded_parallel

        group = _CONTEXT.hcg.get_sharding_parallel_group()
        # (ppo.distributed.cpu_fleet provides the CPU build of this call)
        model, optimizer, _ = group_sharded_parallel(model, optimizer, level="os_g", group=group)
        return model, optimizer
    with pools.parameters_synced_over(_CONTEXT.group):  # (None: the world, without pools)
        model = fleet.distributed_model(model)
    return model, fleet.distributed_optimizer(optimizer)


def _dp_groups():
    """Groups across which different data is seen (data parallel, then sharding)."""
    if not _CONTEXT.distributed:
        return []
    groups = []
    if _CONTEXT.dp_degree > 1:
        groups.append(_CONTEXT.hcg.get_data_parallel_group())
    if _CONTEXT.sharding_degree > 1:
        groups.append(_CONTEXT.hcg.get_sharding_parallel_group())
    return groups


def all_gather_data(values) -> np.ndarray:
    """Concatenate a 1-D array from every data rank, in data-rank order."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    for group in reversed(_dp_groups()):
        # gather over the sharding group first, then data parallel: matches data_rank order
        out = []
        dist.all_gather(out, paddle.to_tensor(x), group=group)
        x = np.concatenate([t.numpy() for t in out])
    return x


def mean_over_data(value: float) -> float:
    """Average of a python float over the data ranks (every rank gets the result)."""
    return float(all_gather_data([value]).mean())


def sum_over_data(value: float) -> float:
    """Sum of a python float over the data ranks (every rank gets the result)."""
    return mean_over_data(value) * _CONTEXT.data_world


def barrier() -> None:
    """Wait for every rank that trains (with resource pools: the actor's pool)."""
    if _CONTEXT.distributed:
        dist.barrier(group=_CONTEXT.group)


def from_main(value):
    """``value`` as the global main rank has it, on every rank (any picklable object)."""
    if not _CONTEXT.distributed:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0, group=_CONTEXT.group)
    return shared[0]


def max_over_ranks(value: int) -> int:
    """The largest of every training rank's ``value`` (an int), on each of them: a max-reduce over
    the world (with resource pools: the actor's pool)."""
    if not _CONTEXT.distributed:
        return int(value)
    t = paddle.to_tensor(np.array([value], dtype=np.int64))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTEXT.group)
    return int(t.numpy()[0])


def exit_together(status: int = 0) -> None:
    """End a finished distributed process: every rank together, and without the interpreter's
    teardown.  Destroying the communicators after another rank has gone has aborted a rank at exit
    (SIGABRT after a finished run, seen with gloo on CPU).  Every output must be closed already."""
    import logging
    import sys

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def model_parallel_all_reduce(tensor):
    """Sum ``tensor`` over the tensor-parallel group, in place (identity without tensor parallel)."""
    if _CONTEXT.tp_degree > 1:
        dist.all_reduce(tensor, group=_CONTEXT.hcg.get_model_parallel_group())
    return tensor


def model_parallel_concat(tensor, axis: int = -1):
    """The tensor-parallel ranks' ``tensor``s concatenated along ``axis`` in rank order (e.g. the
    vocabulary slices of logits [N, V/mp] -> [N, V]); identity without tensor parallel."""
    if _CONTEXT.tp_degree <= 1:
        return tensor
    parts = []
    dist.all_gather(parts, tensor, group=_CONTEXT.hcg.get_model_parallel_group())
    return paddle.concat(parts, axis=axis)


def broadcast_model_parallel(tensor):
    """``tensor`` of the first tensor-parallel rank, on every rank of its group (identity otherwise).

    Tensor-parallel ranks decode from the same gathered logits with the same random state, so
    their samples already agree; broadcasting each sampled token keeps their control flow (when
    every sequence has ended) identical even if a kernel rounded differently on one rank.
    """
    if _CONTEXT.tp_degree > 1:
        dist.broadcast(tensor, src=_CONTEXT.hcg.get_model_parallel_group_src_rank(),
                       group=_CONTEXT.hcg.get_model_parallel_group())
    return tensor


def broadcast_from_first_rollout_rank(values, with_pipeline: bool) -> np.ndarray:
    """The float64 array ``values`` of the first tensor-parallel rank (and, ``with_pipeline``, the
    first pipeline stage) on every rank of that group: one rank per data rank computes what needs
    one caller (the remote reward), and every tensor/pipeline rank receives it.

    Every rank of the group calls it with an array of the same shape (its values are ignored off
    the first rank).  Identity in a single rank; collective on first use (creates the group).
    """
    x = np.ascontiguousarray(values, dtype=np.float64)
    if _CONTEXT.tp_degree * (_CONTEXT.pp_degree if with_pipeline else 1) == 1:
        return x
    # with the pipeline: the ranks of one data rank's whole rollout model (rollout_group's merged group)
    group = rollout_group(True) if with_pipeline else _CONTEXT.hcg.get_model_parallel_group()
    tensor = paddle.to_tensor(x)
    dist.broadcast(tensor, src=min(group.ranks), group=group)
    return tensor.numpy()


def is_first_rollout_rank(with_pipeline: bool) -> bool:
    """Whether this rank is the source of ``broadcast_from_first_rollout_rank``."""
    return _CONTEXT.tp_rank == 0 and (not with_pipeline or _CONTEXT.pp_rank == 0)


def masked_moments_over_data(values, mask):
    """(mean, unbiased variance) of the entries of ``values`` [B, T] where ``mask`` is set, over
    every data rank's batch; None in one data rank (the caller then uses the batch's own)."""
    if _CONTEXT.data_world == 1:
        return None
    m = mask.astype("float64")
    v = values.astype("float64") * m
    local = np.array([float(v.sum()), float((v * v).sum()), float(m.sum())])
    total = all_gather_data(local).reshape(-1, 3).sum(axis=0)
    mean = total[0] / total[2]
    var = (total[1] - total[2] * mean * mean) / max(total[2] - 1, 1)
    return mean, var
