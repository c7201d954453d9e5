"""The loop shared by the single-model stages: reward model (``rm/reward_trainer.py``), SFT
(``ppo/stages/sft/trainer.py``) and DPO (``ppo/stages/dpo/trainer.py``).  It owns ``backward()`` / ``optimizer.step()``; the stages supply the
model, the data and the loss."""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
from tqdm import tqdm

from ppo.distributed import parallel

from ppo.storage import checkpoint
from ppo.core.batching import GlobalBatchSampler, total_steps
from ppo.storage.checkpoint import start_or_resume
from ppo.data import load_datasets
from ppo.stages.entry import prepare_output_dir, set_seed
from ppo.storage.graceful import GracefulStop
from ppo.stages.guard import NonFiniteGuard
from ppo.storage.finite import check_weights_finite
from ppo.core.metrics import MetricsLogger, StepCadence
from ppo.models import check_max_length, check_model_path, check_weights_present, load_tokenizer
from ppo.stages.optim import Precision, build_optimizer, clear_grad, global_grad_norm

logger = logging.getLogger("ppo")


def data_shard(n: int, ctx) -> tuple[list[int], int]:
    """This data rank's contiguous share of ``n`` items and the per-rank size (the last shares pad to it)."""
    per_rank = -(-n // ctx.data_world)
    return list(range(ctx.data_rank * per_rank, min(n, (ctx.data_rank + 1) * per_rank))), per_rank


def gather_shard_rows(rows: np.ndarray, per_rank: int) -> np.ndarray:
    """Every data rank's ``rows`` [m, k] of its ``data_shard`` (m <= per_rank), concatenated in
    data-rank order: [n, k] float64.  Each rank pads to ``per_rank`` rows with NaN for the gather; a
    row whose first value is NaN is padding and is dropped."""
    rows = np.asarray(rows, dtype=np.float64)
    width = rows.shape[1]
    pad = np.full((per_rank - len(rows), width), np.nan)
    out = parallel.all_gather_data(np.concatenate([rows, pad]).reshape(-1)).reshape(-1, width)
    return out[~np.isnan(out[:, 0])]


class SingleModelTrainer:
    """One model, one optimizer, one dataset: the loop of the reward-model and SFT stages.

    Subclasses build the model and data, then implement ``compute_loss(batch) -> (loss, stats)``
    (stats: python floats averaged into the log, plus optional numpy arrays the subclass consumes
    in ``after_step``) and ``evaluate() -> dict``.
    """

    stage = "train"

    @staticmethod
    def begin(args, dataset_cls, pipeline: bool = False):
        """Start-up shared by the stages: ranks, output folder, seed, checks -> (tokenizer, train, eval)."""
        parallel.init_parallel(args, pipeline=pipeline)
        prepare_output_dir(args.output_dir)
        set_seed(args.seed)
        config = check_model_path(args.model_name_or_path)
        check_weights_present(args.model_name_or_path)
        check_max_length(config, args.max_length, args.model_name_or_path)
        tokenizer = load_tokenizer(args.model_name_or_path)
        return (tokenizer, *load_datasets(dataset_cls, args, tokenizer))

    def setup(self, args, model, tokenizer, train_data, eval_data) -> None:

        self.args, self.tokenizer = args, tokenizer
        self.train_data, self.eval_data = train_data, eval_data
        self.ctx = parallel.context()
        self.sampler = GlobalBatchSampler(
            len(train_data), args.per_device_train_batch_size, args.gradient_accumulation_steps,
            self.ctx.data_world, self.ctx.data_rank, seed=args.seed, what=f"train_datasets '{args.train_datasets}'",
            drop_last=args.dataloader_drop_last)
        self.total_steps = total_steps(args, self.sampler.steps_per_epoch)
        self.optimizer, self.scheduler = build_optimizer(
            model, args.learning_rate, args.weight_decay, self.total_steps,
            scheduler_type=args.lr_scheduler_type, warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps,
            beta1=args.adam_beta1, beta2=args.adam_beta2, epsilon=args.adam_epsilon,
            max_grad_norm=args.max_grad_norm)
        self.model, self.optimizer = parallel.wrap_for_training(model, self.optimizer, args.sharding)
        self.precision = Precision(args.bf16, args.fp16, parallel.device() == "gpu", args.cpu_gemm)
        self.metrics = MetricsLogger(args.output_dir, enabled=self.ctx.is_main)
        self.guard = NonFiniteGuard(args.max_nonfinite_steps, self.stage)
        self.start_step = 0
        folder = start_or_resume(args, self.ctx, self.stage)
        if folder:
            state, _ = checkpoint.resume(folder, self.ctx, args, self.stage, {"": self.model},
                                         {"": self.optimizer})
            self.start_step = int(state["global_step"])
            self.restore_extra_state(state.get("extra", {}))
            logger.info("resumed from %s at step %d", folder, self.start_step)

    def collate(self, dataset, indices):
        return dataset.get_collator()([dataset[i] for i in indices])

    def compute_loss(self, batch):
        raise NotImplementedError

    def micro_weights(self, batches: list) -> list:
        """The weight of each micro-batch's loss in the step's loss (default: their mean)."""
        return [1.0 / len(batches)] * len(batches)

    def accumulate(self, batches: list, weights: list) -> list[dict]:
        """The gradients of one optimizer step: each micro-batch's loss, weighted, backward; the
        stats of every micro-batch (its ``loss`` scaled so that their mean is the step's loss)."""
        stats = []
        for i, (batch, weight) in enumerate(zip(batches, weights)):
            # data-parallel gradients are all-reduced once, on the last micro-batch
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss, s = self.compute_loss(batch)
                self.precision.backward(loss * weight)
            # the step's loss: the weighted micro-batch losses (their sum), averaged below over data ranks
            stats.append({"loss": float(loss) * weight * len(batches), **s})
        return stats

    def prepare_step(self, batches: list) -> None:
        """Called once per optimizer step with its micro-batches, before their losses (KTO's KL estimate)."""

    def evaluate(self) -> dict:
        return {}

    def after_step(self, stats: list[dict]) -> None:
        """Called once per optimizer step with the stats of this rank's micro-batches."""

    def train(self) -> dict:

        args, ctx = self.args, self.ctx
        checkpoint.drop_metrics_logged_after(args, ctx, self.start_step)  # everything resumed is read by now
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.stage,
                   disable=args.disable_tqdm or not ctx.is_main, dynamic_ncols=True)
        cadence = StepCadence(args, self.total_steps, self.metrics, self.log_eval, self.save_checkpoint,
                              steps_per_epoch=self.sampler.steps_per_epoch)
        if args.eval_steps > 0 and self.start_step == 0:
            self.log_eval(0, bar.write)  # the starting point of the eval curve
        self.model.train()
        stop = GracefulStop()  # SIGTERM / SIGINT: a checkpoint after the current step, then exit
        # index: 0-based position in the run; step: the number of the step being taken (1-based),
        # by which logs, evaluations and checkpoints are named
        for index in range(self.start_step, self.total_steps):
            step = index + 1
            batches = [self.collate(self.train_data, indices) for indices in self.sampler.micro_batches(index)]
            weights = self.micro_weights(batches)
            self.prepare_step(batches)
            stats = self.accumulate(batches, weights)
            grad_norm = global_grad_norm(self.model.parameters(), self.optimizer)
            if self.guard.ok(step, loss=[s["loss"] for s in stats], grad_norm=grad_norm):
                self.precision.step(self.optimizer)
                self.after_step(stats)
            clear_grad(self.optimizer)
            self.scheduler.step()
            scalars = {k for k, v in stats[0].items() if isinstance(v, float)}
            summary = {k: parallel.mean_over_data(float(np.mean([s[k] for s in stats]))) for k in sorted(scalars)}
            summary.update(grad_norm=grad_norm, skipped_updates=float(self.guard.skipped))
            bar.update(1)
            cadence.end_of_step(step, summary, bar.write, lambda: {
                "lr": float(self.optimizer.get_lr()), "epoch": round(self.sampler.epoch_of(step), 3)})
            stop.after_step(step, cadence, args.output_dir)
        stop.finish()  # a signal from here on lets the final save complete
        bar.close()
        final = self.log_eval(self.total_steps, print)
        self.save(args.output_dir, self.total_steps)
        stop.close()
        self.metrics.close()
        checkpoint.release_output_dir(args.output_dir)
        self.precision.close()  # the run's matmul path (cpu_gemm, bf16) ends with it
        return final

    def log_eval(self, step: int, echo) -> dict:
        metrics = self.evaluate()
        if metrics:
            self.metrics.log(step, metrics, split="eval", echo=echo)
        return metrics

    def eval_shard(self) -> tuple[list[int], int]:
        """This data rank's contiguous share of the eval set and the padded per-rank size."""
        return data_shard(len(self.eval_data), self.ctx)

    def before_save(self) -> None:
        """Hook to sync state into the model config before it is written."""

    def extra_state(self) -> dict:
        """Subclass state that a resumed run needs (JSON-serialisable)."""
        return {}

    def restore_extra_state(self, state: dict) -> None:
        """Inverse of ``extra_state``."""

    def save_checkpoint(self, step: int) -> None:
        """A resumable ``checkpoint-<step>``: model, optimizer, random states, step (atomic)."""
        check_weights_finite({"": self.model})
        self.before_save()
        target = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        checkpoint.save_checkpoint(target, self.ctx, {"": self.model}, self.tokenizer, {"": self.optimizer},
                                   {"global_step": step, "epoch": self.sampler.epoch_of(step), "stage": self.stage,
                                    "args": vars(self.args), "extra": self.extra_state()})
        if self.ctx.is_main:
            checkpoint.rotate(self.args.output_dir, self.args.save_total_limit)

    def save(self, target: str, step: int) -> None:
        parallel.barrier()
        self.before_save()
        checkpoint.save_final_model(self.model, self.tokenizer, target,
                                    {"global_step": step, "stage": self.stage, "args": vars(self.args)})
        parallel.barrier()
