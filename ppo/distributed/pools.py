"""Resource pools (the plan: ``ppo.core.placement``): fleet's groups and moving arrays between pools.

How the ranks are organised:

* every rank joins one world (``paddle.distributed.launch`` starts it); fleet's hybrid groups
  (tensor, sharding, data parallel) are built over the actor's pool alone (:func:`pool_topology`
  builds fleet's own ``HybridCommunicateGroup`` as if the world were that pool; the pool starts at
  rank 0, so its topology ranks are the world ranks);
* a frozen role's pool has one rank per data rank of the actor's pool: data rank ``d``'s first
  rank (its tensor-parallel rank 0) sends its sequences to rank ``d`` of each such pool and
  receives the log-probs / scores back, through point-to-point sends over a two-rank process
  group (gloo on CPU, NCCL on GPU), never through files (``ppo.distributed.transfer``).

What a pool's rank computes lives with the PPO stage (``ppo.stages.ppo.pools``).
"""

from __future__ import annotations

import contextlib

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


def data_parallel(model, group):
    """``model`` trained data parallel over ``group`` (a critic's pool): gradients averaged over it,
    its first rank's parameters broadcast over it at the start."""
    with parameters_synced_over(group):
        return paddle.DataParallel(model, group=group)
