"""Entry-point plumbing shared by ``run_ppo.py``, ``run_sft.py`` and ``rm/run_reward.py``: quiet
start-up, the one-line ``UserError`` exit, seeding and the output-folder check."""

from __future__ import annotations

import logging
import os
import random
import sys
import warnings

import numpy as np
import paddle

from ppo.distributed import parallel
from ppo.core.errors import UserError
from ppo.storage.graceful import StopRequested


def quiet_libraries() -> None:
    """Keep paddle / paddlenlp start-up chatter out of the console."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    try:
        from paddlenlp.utils.log import logger as nlp_logger

        nlp_logger.set_level("WARNING")
    except Exception:  # pragma: no cover - logging only
        pass
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_entry(main, argv=None) -> None:
    """Run ``main(argv)``; a ``UserError`` becomes one line on stderr and exit status 2."""
    try:
        main(argv)
        if parallel.context().distributed:
            parallel.exit_together()  # every output is written and closed at this point
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except StopRequested as e:
        print(str(e), file=sys.stderr, flush=True)
        if parallel.context().distributed:
            parallel.exit_together(e.exit_status)
        raise SystemExit(e.exit_status) from None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def prepare_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output_dir '{path}' is not writable: {e.strerror}") from None
