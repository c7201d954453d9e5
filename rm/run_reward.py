"""Train a reward model on preference pairs.

    python -m paddle.distributed.launch rm/run_reward.py config/tiny/rm_argument.json [--key value ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ppo  # noqa: E402,F401  (sets the MKL environment before paddle loads)
from ppo.stages.entry import quiet_libraries, run_entry  # noqa: E402

if __name__ == "__main__":
    quiet_libraries()  # before paddlenlp loads: its import-time warnings stay out of the console

from ppo.args import RewardArgs, check_preset_models, parse_args  # noqa: E402
from rm.reward_trainer import RewardTrainer, validate_reward_args  # noqa: E402


def main(argv=None):
    args = parse_args(RewardArgs, argv)
    check_preset_models(args)
    validate_reward_args(args)
    RewardTrainer(args).train()


if __name__ == "__main__":
    run_entry(main)
