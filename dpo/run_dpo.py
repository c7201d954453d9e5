"""Train a policy on preference pairs with DPO or its family (IPO, hinge, SimPO, ORPO, KTO).

    python -m paddle.distributed.launch dpo/run_dpo.py config/tiny/dpo_argument.json [--key value ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ppo  # noqa: E402,F401  (sets the MKL environment before paddle loads)
from ppo.stages.entry import quiet_libraries, run_entry  # noqa: E402

if __name__ == "__main__":
    quiet_libraries()  # before paddlenlp loads: its import-time warnings stay out of the console

from ppo.args import DPOArgs, check_preset_models, parse_args  # noqa: E402
from ppo.stages.dpo.online import run_online  # noqa: E402
from ppo.stages.dpo.trainer import DPOTrainer, check_dpo_models  # noqa: E402


def main(argv=None):
    args = parse_args(DPOArgs, argv)
    check_preset_models(args)
    check_dpo_models(args)
    if args.online_rounds:
        run_online(args)
    else:
        DPOTrainer(args).train()


if __name__ == "__main__":
    run_entry(main)
