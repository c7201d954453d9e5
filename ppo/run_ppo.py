"""Align a policy with PPO against a reward model.

    python -m paddle.distributed.launch ppo/run_ppo.py config/tiny/ppo_argument.json [--key value ...]
"""

import os
import sys

# the project root first, and not this folder: its subpackages (core, data, models, ...) would
# otherwise shadow top-level modules of the same names
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import ppo  # noqa: E402,F401  (sets the MKL environment before paddle loads)
from ppo.stages.entry import quiet_libraries, run_entry  # noqa: E402

if __name__ == "__main__":
    quiet_libraries()  # before paddlenlp loads: its import-time warnings stay out of the console

from ppo.args import PPOArgs, check_preset_models, parse_args  # noqa: E402
from ppo.distributed import parallel  # noqa: E402
from ppo.stages.ppo.pools import check_pool_roles  # noqa: E402
from ppo.stages.ppo.serving import serve  # noqa: E402
from ppo.stages.ppo.trainer import PPOTrainer  # noqa: E402


def main(argv=None):
    args = parse_args(PPOArgs, argv)
    check_preset_models(args)
    if args.resource_pools:  # every rank, before any collective: a bad path is one line on each
        check_pool_roles(args)
    ctx = parallel.init_parallel(args, pipeline=True)
    if ctx.serves:  # a rank of another role's pool (resource_pools) works for the actor's pool
        serve(args, ctx)
        return
    PPOTrainer(args).train()


if __name__ == "__main__":
    run_entry(main)
