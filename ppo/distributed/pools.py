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
    actor's pool, or the critic's) instead of the whole world, whose other pools do not take part
    (None: no change)."""
    import paddle.distributed.parallel as paddle_parallel

    original = paddle_parallel.sync_params_buffers
    if group is not None:
        def synced(model, comm_group=None, src_rank=None, *a, **kw):
            comm_group = comm_group or group
            return original(model, comm_group, comm_group.ranks[0] if src_rank is None else src_rank, *a, **kw)

        paddle_parallel.sync_params_buffers = synced
    try:
        yield
    finally:
        paddle_parallel.sync_params_buffers = original


def init_fleet(fleet, strategy, plan, rank: int, sharding_degree: int):
    """``fleet.init`` with its hybrid groups over the actor's pool -> (the actor pool's process group,
    this rank's pool, the world rank of each data rank's first rank, the links, this rank's pool's
    group when it is the critic's pool of several ranks, else None).  Collective: every rank calls
    it.  A link is a process group of two ranks, a data rank's first rank and its peer in a pool
    (``links[(first, peer)]``): gloo matches a send with a receive by a count of the messages over
    the group, so each pair of ranks that talks gets a group of its own.  The critic's ranks train
    data parallel over their pool's group."""
    with pool_topology(plan.actor, rank):
        fleet.init(is_collective=True, strategy=strategy)
    group = dist.new_group(plan.actor.ranks)
    leaders = data_rank_leaders(fleet.get_hybrid_communicate_group().topology(), plan.actor.size, sharding_degree)
    links = {(first, pool.first + d): dist.new_group([first, pool.first + d])
             for pool in plan.remote for d, first in enumerate(leaders)}
    critic = plan.critic
    critic_group = dist.new_group(critic.ranks) if critic is not None and critic.size > 1 else None
    pool = plan.pool_of_rank(rank)
    return group, pool, leaders, links, critic_group if pool is critic else None


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
_HEADER = 33  # int64 words: count, then per array its dtype code, ndim and 2 dims (up to 8 arrays)


def send_arrays(arrays: list, dst: int, group) -> None:
    """Send numpy arrays (int64 / float32 / float64, rank <= 2, at most 8) to world rank ``dst`` over
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


def text_array(text: str) -> np.ndarray:
    """A string as an int64 array for ``send_arrays``: a 0, then its UTF-8 bytes (never empty)."""
    return np.concatenate([[0], np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]).astype(np.int64)


def array_text(array) -> str:
    """The string of ``text_array``."""
    return np.asarray(array[1:], dtype=np.uint8).tobytes().decode("utf-8")
