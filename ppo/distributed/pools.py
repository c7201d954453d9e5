"""Resource pools (the plan: ``ppo.core.placement``): fleet's groups and moving arrays between pools.

How the ranks are organised:

* every rank joins one world (``paddle.distributed.launch`` starts it); fleet's hybrid groups
  (tensor, sharding, data parallel) are built over the actor's pool alone (:func:`pool_topology`
  builds fleet's own ``HybridCommunicateGroup`` as if the world were that pool; the pool starts at
  rank 0, so its topology ranks are the world ranks);
* a frozen role's pool has one rank per data rank of the actor's pool: data rank ``d``'s first
  rank (its tensor-parallel rank 0) sends its sequences to rank ``d`` of each such pool and
  receives the log-probs / scores back, through point-to-point sends over the world's process
  group (gloo on CPU, NCCL on GPU), never through files (:func:`send_arrays`, :func:`recv_arrays`).

What a pool's rank computes lives with the PPO stage (``ppo.stages.ppo.pools``).
"""

from __future__ import annotations

import contextlib

import numpy as np
import paddle
import paddle.distributed as dist

from ppo.core.placement import Pool

# ----------------------------------------------------------------------------------- fleet's groups


@contextlib.contextmanager
def pool_topology(pool: Pool, rank: int):
    """Within it, fleet builds its hybrid groups over ``pool`` alone: ``paddle.distributed``'s world
    size reads as the pool's size and, on a rank outside the pool, its rank as the pool's first.
    Every rank must build them (a process group is made by all ranks, in one order); off the pool
    the groups are made but never used.  The pool starts at rank 0, so its topology ranks are the
    world ranks fleet's p2p and broadcasts address."""
    assert pool.first == 0, "the actor's pool starts at rank 0"
    saved = dist.get_world_size, dist.get_rank
    dist.get_world_size = lambda group=None: pool.size if group is None else saved[0](group)
    inside = rank < pool.size
    dist.get_rank = lambda group=None: (rank if inside else 0) if group is None else saved[1](group)
    try:
        yield
    finally:
        dist.get_world_size, dist.get_rank = saved


@contextlib.contextmanager
def parameters_synced_over(group):
    """Within it ``paddle.DataParallel`` broadcasts the first rank's parameters over ``group`` (the
    actor's pool) instead of the whole world, whose other pools do not train (None: no change)."""
    import paddle.distributed.parallel as paddle_parallel

    original = paddle_parallel.sync_params_buffers
    if group is not None:
        paddle_parallel.sync_params_buffers = \
            lambda model, comm_group=None, *a, **kw: original(model, comm_group or group, *a, **kw)
    try:
        yield
    finally:
        paddle_parallel.sync_params_buffers = original


def init_fleet(fleet, strategy, plan, rank: int, sharding_degree: int):
    """``fleet.init`` with its hybrid groups over the actor's pool -> (the pool's process group, this
    rank's pool, the world rank of each data rank's first rank, the links).  Collective: every rank
    calls it.  A link is a process group of two ranks, a data rank's first rank and its peer in a
    pool (``links[(first, peer)]``): gloo matches a send with a receive by a count of the messages
    over the group, so each pair of ranks that talks gets a group of its own."""
    with pool_topology(plan.actor, rank):
        fleet.init(is_collective=True, strategy=strategy)
    group = dist.new_group(plan.actor.ranks)
    leaders = data_rank_leaders(fleet.get_hybrid_communicate_group().topology(), plan.actor.size, sharding_degree)
    links = {(first, pool.first + d): dist.new_group([first, pool.first + d])
             for pool in plan.remote for d, first in enumerate(leaders)}
    return group, plan.pool_of_rank(rank), leaders, links


def data_rank_leaders(topology, size: int, sharding_degree: int) -> tuple:
    """The world rank of each data rank's first rank (tensor and pipeline rank 0) in fleet's
    ``topology`` of ``size`` ranks, by data rank (data-parallel rank x sharding degree + sharding rank)."""
    leaders = {}
    for r in range(size):
        c = topology.get_coord(r)
        if c.model == 0 and c.pipe == 0:
            leaders.setdefault(c.data * sharding_degree + c.sharding, r)
    return tuple(leaders[d] for d in sorted(leaders))


# -------------------------------------------------------------------------------- moving arrays

_DTYPES = {0: np.int64, 1: np.float32, 2: np.float64}
_HEADER = 17  # int64 words: count, then per array its dtype code, ndim and 2 dims (up to 4 arrays)


def send_arrays(arrays: list, dst: int, group) -> None:
    """Send numpy arrays (int64 / float32 / float64, rank <= 2, at most 4) to world rank ``dst`` over
    ``group`` (the two ranks' link): a fixed-size header with their dtypes and shapes, then each
    array (``recv_arrays`` there)."""
    header = [len(arrays)]
    for a in arrays:
        code = next(c for c, t in _DTYPES.items() if np.dtype(t) == a.dtype)
        header += [code, a.ndim, *a.shape, *([0] * (2 - a.ndim))]
    assert len(header) <= _HEADER, "too many arrays for one message"
    dist.send(paddle.to_tensor(np.array(header + [0] * (_HEADER - len(header)), dtype=np.int64)), dst=dst,
              group=group)
    for a in arrays:
        dist.send(paddle.to_tensor(np.ascontiguousarray(a)), dst=dst, group=group)


def recv_arrays(src: int, group) -> list:
    """The arrays ``send_arrays`` sent from world rank ``src`` over ``group``."""
    header = paddle.zeros([_HEADER], dtype="int64")
    dist.recv(header, src=src, group=group)
    h = header.numpy().tolist()
    out, at = [], 1
    for _ in range(h[0]):
        dtype, ndim, dims = _DTYPES[h[at]], h[at + 1], h[at + 2:at + 4]
        at += 4
        t = paddle.zeros([int(d) for d in dims[:ndim]], dtype=np.dtype(dtype).name)
        dist.recv(t, src=src, group=group)
        out.append(t.numpy())
    return out
