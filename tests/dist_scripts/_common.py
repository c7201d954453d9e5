"""Shared bits of the scripts that tests launch with ``paddle.distributed.launch``."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def start_fleet(mp_degree=1, pp_degree=1, accumulate_steps=1, micro_batch_size=1):
    """``enable_cpu_fleet()`` then ``fleet.init`` with the given degrees; returns (patched, hcg)."""
    import paddle
    from paddle.distributed import fleet

    from ppo.distributed.cpu_fleet import enable_cpu_fleet

    patched = enable_cpu_fleet()
    paddle.set_device("cpu")
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": mp_degree, "pp_degree": pp_degree}
    strategy.pipeline_configs = {"accumulate_steps": accumulate_steps, "micro_batch_size": micro_batch_size}
    fleet.init(is_collective=True, strategy=strategy)
    return patched, fleet.get_hybrid_communicate_group()


def write_result(out_dir, rank, result):
    """One JSON file per rank: ``<out_dir>/rank<k>.json``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


def finish() -> None:
    """Leave like the entry points do: ``ppo.distributed.parallel.exit_together``."""
    from ppo.distributed import parallel

    parallel.exit_together()
