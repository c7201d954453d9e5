"""Resource pools, the plan: which PPO roles run on which ranks of one launch (``resource_pools``).

``resource_pools`` names the pools, each a ``+``-joined set of roles and its number of ranks,
comma-separated: ``actor:2,reference:1,reward:1`` gives the actor 2 ranks (laid out by the run's
tensor / sharding / data-parallel degrees) and the reference and the reward model one rank each;
``actor:2,reference+reward:1`` puts the two frozen models on one rank; ``actor:2,critic:1,...`` gives
the critic (``gae``) ranks of its own, where it scores and trains while the actor's pool trains the
actor; ``actor:2,rollout:1,...`` generates on a copy of the actor on ranks of its own, its weights
sent after every update.  The actor's pool comes first, from rank 0; a role that no pool names stays with the actor
(the default, colocated layout).
Pure: the groups and the transport are ``ppo.distributed.pools``, the roles' work
``ppo.stages.ppo.pools``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ppo.core.errors import UserError, closest

ROLES = ("actor", "critic", "reference", "reward", "rollout")
# a pool after the actor's holds the frozen roles (reference, reward), the critic and / or the
# rollout (a copy of the actor that generates), whole on each of its ranks, one rank per data rank
# of the actor's pool; 'rollout' in the actor's pool is the default (the actor generates itself)


@dataclass(frozen=True)
class Pool:
    roles: tuple        # the roles on these ranks
    first: int          # the first world rank of the pool
    size: int           # its number of ranks

    @property
    def name(self) -> str:
        return "+".join(self.roles)

    @property
    def ranks(self) -> list:
        return list(range(self.first, self.first + self.size))


@dataclass(frozen=True)
class PoolPlan:
    pools: tuple        # the actor's pool first

    @property
    def actor(self) -> Pool:
        return self.pools[0]

    @property
    def remote(self) -> tuple:
        """The pools of the roles that do not run on the actor's ranks."""
        return self.pools[1:]

    def remote_roles(self) -> tuple:
        return tuple(r for p in self.remote for r in p.roles)

    @property
    def critic(self) -> Pool | None:
        """The critic's pool when it is not the actor's (None: the critic trains beside the actor)."""
        return self.pool_of_role("critic")

    @property
    def rollout(self) -> Pool | None:
        """The rollout's pool when it is not the actor's (None: the actor generates itself)."""
        return self.pool_of_role("rollout")

    def pool_of_role(self, role: str) -> Pool | None:
        """The pool after the actor's that holds ``role`` (None: the actor's pool holds it)."""
        return next((p for p in self.remote if role in p.roles), None)

    def pool_of_rank(self, rank: int) -> Pool:
        return next(p for p in self.pools if p.first <= rank < p.first + p.size)


def parse_pools(text: str) -> list:
    """``resource_pools`` -> [(roles tuple, ranks)] in the order given, each pool's roles in ``ROLES``
    order; a UserError (one line) for anything but ``ROLE[+ROLE...]:RANKS`` entries (ASCII digits,
    no empty entry) naming each role at most once, the actor first."""
    what = "'resource_pools'"
    if not text.strip():
        return []
    parsed, seen = [], set()
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            raise UserError(f"{what} '{text}' has an empty entry (two commas, or one at an end): give "
                            "ROLE[+ROLE...]:RANKS entries, e.g. 'actor:2,reference+reward:1'")
        roles_text, sep, count = entry.partition(":")
        if not sep or not count.strip():
            raise UserError(f"{what}: '{entry}' must be ROLE[+ROLE...]:RANKS, e.g. 'actor:2,reference+reward:1'")
        if not re.fullmatch(r"[0-9]+", count.strip()):
            raise UserError(f"{what}: the rank count of '{entry}' must be a whole number >= 1, got {count!r}")
        ranks = int(count)
        if ranks < 1:
            raise UserError(f"{what}: the rank count of '{entry}' must be >= 1, got {ranks}")
        roles = tuple(r.strip() for r in roles_text.split("+"))
        for role in roles:
            if role not in ROLES:
                raise UserError(f"{what}: unknown role '{role}'{closest(role, ROLES)}; roles: {', '.join(ROLES)}")
            if role in seen:
                raise UserError(f"{what}: role '{role}' is named twice; each role has one pool")
            seen.add(role)
        parsed.append((tuple(sorted(roles, key=ROLES.index)), ranks))
    if "actor" not in parsed[0][0]:
        raise UserError(f"{what}: the first pool must hold the actor (it starts at rank 0), e.g. 'actor:2,reward:1'")
    return parsed


def canonical_pools(text: str) -> str:
    """``resource_pools`` written one way: no spaces, each pool's roles in ``ROLES`` order (what a
    checkpoint records, so that a resume compares layouts, not spellings)."""
    return ",".join("+".join(roles) + f":{n}" for roles, n in parse_pools(text))


def plan_pools(text: str, world: int, data_world_of, *, pipeline: bool, merged_rollout: bool,
               has_reward_model: bool, uses_critic: bool = True) -> PoolPlan | None:
    """The plan of ``resource_pools`` for a launch of ``world`` ranks (None: every role on every
    rank).  ``data_world_of(n)``: the actor's data ranks on a pool of n ranks (a UserError when the
    run's degrees do not divide n).  ``uses_critic``: the run trains a critic (the ``gae``
    estimator).  Checked before any model loads; each impossible plan is one line."""
    parsed = parse_pools(text)
    if not parsed:
        return None
    what = "'resource_pools'"
    total = sum(n for _, n in parsed)
    if total != world:
        raise UserError(f"{what} '{text}' places {total} ranks but the launch has {world} "
                        f"(paddle.distributed.launch --nproc_per_node x nodes): the counts must add up to it")
    if len(parsed) == 1:
        raise UserError(f"{what} '{text}' names only the actor's pool: give another role ranks of its own, "
                        "or leave resource_pools empty (every role on every rank)")
    if pipeline or merged_rollout:
        raise UserError(f"{what}: pools need a rollout on the training model itself (no pipeline_parallel_degree "
                        "> 1, no eval_mode 'single' under tensor parallel)")
    pools, first = [], 0
    for roles, n in parsed:
        pools.append(Pool(roles=tuple(roles), first=first, size=n))
        first += n
    actor = pools[0]
    data_world = data_world_of(actor.size)
    for pool in pools[1:]:
        if pool.size != data_world:
            raise UserError(f"{what}: pool '{pool.name}' has {pool.size} rank(s) but the actor's pool has {data_world} "
                            f"data rank(s): a pool after the actor's has one rank per data rank of the actor's pool")
    if "reward" in (r for p in pools[1:] for r in p.roles) and not has_reward_model:
        raise UserError(f"{what} gives the reward model ranks but reward_model_name_or_path is empty")
    if "critic" in (r for p in pools[1:] for r in p.roles) and not uses_critic:
        raise UserError(f"{what} gives the critic ranks but only adv_estimator 'gae' trains a critic: "
                        "drop 'critic' from resource_pools")
    return PoolPlan(pools=tuple(pools))
