"""Arguments of every stage: dataclasses built from shared parts (``common``), one module per stage
(``sft``, ``reward``, ``dpo``, ``ppo``), read from JSON + command line (``parse``).

``parse_args(RewardArgs, argv)`` reads ``argv[0]`` as a JSON file when it ends in ``.json`` and
then applies ``--key value`` overrides (PaddleNLP's convention).  Every field carries a help
string (``--help`` prints them).  Mistakes (unknown key, wrong type, out-of-range value, JSON
syntax) raise ``UserError`` with one line naming the key and what is accepted.

PaddleNLP's argument files run unchanged: :data:`PADDLENLP_KEYS` lists the keys of its
``llm/config/*/`` files that are not fields here, each either honoured under this toolkit's name
or accepted with one notice line saying why it has no effect.  Relative paths inside a config
file resolve against the project root (the folder holding ``ppo/`` and ``rm/``), so a preset
works from the root and from ``cd ppo`` alike; paths on the command line resolve against the
current folder, as in any shell command.
"""

from ppo.args.common import DataArgs, ParallelArgs, TrainingArgs
from ppo.args.dpo import DPOArgs
from ppo.args.paddlenlp import PADDLENLP_KEYS, NoEffect, Renamed
from ppo.args.parse import PROJECT_ROOT, check_preset_models, parse_args, validate
from ppo.args.ppo import PPOArgs
from ppo.args.reward import RewardArgs, ServeRewardArgs
from ppo.args.sft import SFTArgs

__all__ = ["DataArgs", "ParallelArgs", "TrainingArgs", "PADDLENLP_KEYS", "NoEffect", "Renamed", "PROJECT_ROOT",
           "check_preset_models", "parse_args", "validate", "DPOArgs", "PPOArgs", "RewardArgs", "ServeRewardArgs",
           "SFTArgs"]
