"""What a training loop reports: the step cadence (log / evaluate / save intervals), the metrics
log (console, ``metrics.jsonl``, VisualDL) and phase timers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import numpy as np


class StepCadence:
    """What happens after every step of a training loop (SFT, reward model and PPO alike).

    The step's stats join a window that is logged (its mean, key by key) every ``logging_steps``
    and at the last step; ``evaluate(step, echo)`` runs every ``eval_steps`` and ``save(step)``
    every ``save_steps`` (or every epoch, or never: ``evaluation_strategy`` / ``save_strategy``),
    except at the last step, which the loop ends with a final evaluation and save of its own.
    """

    def __init__(self, args, total_steps: int, metrics, evaluate, save, steps_per_epoch: int | None = None):
        self.args, self.total_steps = args, total_steps
        self.metrics, self.evaluate, self.save = metrics, evaluate, save
        self.window: list[dict] = []
        if steps_per_epoch is None:  # an epoch's length from the step budget, when epochs set it
            steps_per_epoch = math.ceil(total_steps / args.num_train_epochs) if args.max_steps <= 0 else total_steps
        # evaluation_strategy / save_strategy (PaddleNLP's names): 0 means not during training
        self.eval_every = {"steps": args.eval_steps, "epoch": steps_per_epoch, "no": 0}[args.evaluation_strategy]
        self.save_every = {"steps": args.save_steps, "epoch": steps_per_epoch, "no": 0}[args.save_strategy]

    def end_of_step(self, step: int, stats: dict | None, echo, extra=None) -> None:
        """``stats``: the step's figures (None for a step without any, e.g. a skipped update);
        ``extra()``: figures read at logging time only (learning rate, epoch)."""
        args = self.args
        if stats is not None:
            self.window.append(stats)
        if (step % args.logging_steps == 0 or step == self.total_steps) and self.window:
            keys = self.window[-1].keys()
            logged = {k: float(np.mean([w[k] for w in self.window if k in w])) for k in keys}
            logged.update(extra() if extra else {})
            self.metrics.log(step, logged, echo=echo)
            self.window = []
        if self.eval_every > 0 and step % self.eval_every == 0 and step < self.total_steps:
            self.evaluate(step, echo)
        if self.saves_at(step):
            self.save(step)

    def saves_at(self, step: int) -> bool:
        """Whether the cadence writes ``checkpoint-<step>`` at the end of ``step`` (never the last:
        the loop ends with the final model)."""
        return self.save_every > 0 and step % self.save_every == 0 and step < self.total_steps


# ---------------------------------------------------------------------------------------------
# Metrics


class MetricsLogger:
    """Console line + ``metrics.jsonl`` (+ VisualDL when installed), on the main rank only."""

    def __init__(self, output_dir: str, enabled: bool = True, use_visualdl: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        # opened at the first row: a run refused at start-up must not leave a vdl/ file behind
        self.vdl_dir = os.path.join(output_dir, "vdl") if enabled and use_visualdl else None

    def log(self, step: int, metrics: dict, split: str = "train", echo=None) -> None:
        if not self.enabled:
            return
        if self.vdl_dir is not None:
            try:
                from visualdl import LogWriter

                self.writer = LogWriter(logdir=self.vdl_dir)
            except Exception:
                self.writer = None
            self.vdl_dir = None
        record = {"split": split, "step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(f"{split}/{k}", v, step)
        line = f"[{split} step {step}] " + "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        (echo or print)(line)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Timer:
    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict:
        out, self.totals = {f"time/{k}": v for k, v in self.totals.items()}, {}
        return out
