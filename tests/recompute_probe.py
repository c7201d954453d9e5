"""Loaded into launched ranks with ``--extra_modules``: records which blocks paddlenlp recomputes.

Every call of paddle's recompute from paddlenlp's llama modules (plain and pipeline) leaves an
empty file ``<$RECOMPUTE_PROBE_DIR>/rank<R>-<block>`` (block: ``full``, ``full_attn`` or
``core_attn``, as ``test_recompute.recomputed_block`` names them), so a test can tell that the
run it compares really recomputed, and which granularity did (the actor and the critic get
different ones).
"""

import os
import sys

from paddlenlp.transformers.llama import modeling, modeling_pp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_recompute import recomputed_block  # noqa: E402

FOLDER = os.environ["RECOMPUTE_PROBE_DIR"]
RANK = os.environ.get("PADDLE_TRAINER_ID", "0")


def _counting(original):
    def recompute(function, *args, **kwargs):
        open(os.path.join(FOLDER, f"rank{RANK}-{recomputed_block(function)}"), "w").close()
        return original(function, *args, **kwargs)

    return recompute


modeling.recompute = _counting(modeling.recompute)
modeling_pp.recompute = _counting(modeling_pp.recompute)
