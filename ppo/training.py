"""Pieces every stage's training loop uses: entry-point wrapper, seeding, batching over data ranks,
optimizer and schedule, mixed precision, metrics logging and atomic checkpoint writes.

The loops themselves (``rm/reward_trainer.py``, ``ppo/sft_trainer.py``, ``ppo/trainer.py``) own
``backward()`` / ``optimizer.step()``; nothing here hides the algorithm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings

import numpy as np
import paddle
from tqdm import tqdm

from ppo import checkpoint
from ppo.errors import UserError

logger = logging.getLogger("ppo")


# ---------------------------------------------------------------------------------------------
# Entry points


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
        from ppo import parallel

        if parallel.context().distributed:
            parallel.exit_together()  # every output is written and closed at this point
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


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


# ---------------------------------------------------------------------------------------------
# Data


def build_template(args):
    from ppo.data import PromptTemplate

    return PromptTemplate(first=args.prompt_template) if args.prompt_template else PromptTemplate()


def load_datasets(cls, args, tokenizer):
    """(train, eval or None) of dataset class ``cls`` from train/eval specs or a held-out split."""
    from ppo.data import import_user_modules

    if args.extra_modules:
        import_user_modules([m for m in args.extra_modules.split(",") if m])
    template = build_template(args)
    train = cls(args.train_datasets, tokenizer, args.max_length, seed=args.seed, template=template)
    if args.eval_datasets:
        return train, cls(args.eval_datasets, tokenizer, args.max_length, seed=args.seed, template=template)
    if args.eval_split_ratio > 0:
        return train.split(args.eval_split_ratio, seed=args.seed)
    return train, None


# ---------------------------------------------------------------------------------------------
# Batching: the same global batches whatever the number of data ranks


class GlobalBatchSampler:
    """Yields, per optimizer step, this rank's micro-batches of sample indices.

    Each epoch is a seeded permutation; step ``s`` takes the global batch ``perm[s*G:(s+1)*G]`` with
    ``G = per_device_batch * accumulation * data_world``, split into contiguous per-rank chunks
    and then into ``accumulation`` micro-batches.  One rank with batch 2B sees exactly the samples
    two ranks with batch B see together, which is what makes runs comparable across layouts.
    The position is a pure function of the global step, so resuming needs only the step.
    """

    def __init__(self, num_samples: int, per_device_batch: int, accumulation: int = 1, data_world: int = 1,
                 data_rank: int = 0, seed: int = 42, shuffle: bool = True, what: str = "dataset",
                 drop_last: bool = True):
        self.num_samples, self.per_device_batch, self.accumulation = num_samples, per_device_batch, accumulation
        self.data_world, self.data_rank, self.seed, self.shuffle = data_world, data_rank, seed, shuffle
        self.global_batch = per_device_batch * accumulation * data_world
        # drop_last false: a last, partial global batch is completed with the epoch's first samples
        self.steps_per_epoch = num_samples // self.global_batch if drop_last else -(-num_samples // self.global_batch)
        if self.steps_per_epoch == 0:
            raise UserError(f"{what} has {num_samples} samples, fewer than one global batch of {self.global_batch} "
                            f"(per-device batch {per_device_batch} x accumulation {accumulation} x {data_world} data ranks)")

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's ``accumulation`` micro-batches for global optimizer step ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        if len(perm) < self.steps_per_epoch * self.global_batch:
            perm = np.concatenate([perm, perm[:self.steps_per_epoch * self.global_batch - len(perm)]])
        start = within * self.global_batch + self.data_rank * self.per_device_batch * self.accumulation
        mine = perm[start:start + self.per_device_batch * self.accumulation].tolist()
        b = self.per_device_batch
        return [mine[i * b:(i + 1) * b] for i in range(self.accumulation)]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


def total_steps(args, steps_per_epoch: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch))


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule


def lr_lambda(kind: str, total: int, warmup: int):
    """Multiplier of the peak learning rate at step ``s``: linear warm-up, then ``kind``."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine
    return f


def build_optimizer(model, learning_rate: float, weight_decay: float, total: int, *, scheduler_type: str = "cosine",
                    warmup_ratio: float = 0.0, warmup_steps: int = 0, beta1: float = 0.9, beta2: float = 0.95,
                    epsilon: float = 1e-8, max_grad_norm: float = 1.0):
    """AdamW (no decay on biases and norms) with a warm-up schedule and global-norm clipping."""
    warmup = warmup_steps if warmup_steps > 0 else int(round(warmup_ratio * total))
    scheduler = paddle.optimizer.lr.LambdaDecay(learning_rate, lr_lambda(scheduler_type, total, warmup))
    params = [p for p in model.parameters() if not p.stop_gradient]
    decay = {p.name for n, p in model.named_parameters()
             if not p.stop_gradient and not any(k in n for k in ("bias", "norm"))}
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler, parameters=params, weight_decay=weight_decay, beta1=beta1, beta2=beta2,
        epsilon=epsilon, apply_decay_param_fun=lambda name: name in decay,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(max_grad_norm) if max_grad_norm > 0 else None)
    return optimizer, scheduler


def global_grad_norm(parameters, optimizer=None) -> float:
    """L2 norm of the gradients the optimizer is about to apply.

    Tensor-parallel shards (``is_distributed``) are summed over their group.  Under sharding the
    gradients are only averaged over the ranks inside the optimizer's step; with ``optimizer``
    given this synchronises them first (once: the step then skips its own synchronisation) and
    sums the squares of the parameters each rank owns, so the norm is the one of the averaged
    gradient, the same as in one process.
    """
    from ppo import parallel

    parameters = list(parameters)
    synced, sharded = parallel.sync_grads(optimizer, parameters) if optimizer is not None else (None, False)
    split, replicated = 0.0, 0.0
    for p in (synced if synced is not None else parameters):
        if p.grad is not None:
            g = p.grad.astype("float32")
            value = float((g * g).sum())
            if getattr(p, "is_distributed", False):
                split += value
            else:
                replicated += value
    if sharded:
        split, replicated = parallel.sharding_sum([split, replicated])
        if parallel.is_sharding_stage2(optimizer):
            # stage 2 holds the sums of the ranks' gradients until its step averages them
            scale = float(parallel.context().sharding_degree) ** 2
            split, replicated = split / scale, replicated / scale
    # pipeline stages hold different parameters (embeddings are never tied under pipeline)
    return math.sqrt(parallel.pipeline_sum([parallel.model_parallel_sum(split, replicated)])[0])


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

    def end_of_step(self, done: int, stats: dict | None, echo, extra=None) -> None:
        """``stats``: the step's figures (None for a step without any, e.g. a skipped update);
        ``extra()``: figures read at logging time only (learning rate, epoch)."""
        args = self.args
        if stats is not None:
            self.window.append(stats)
        if (done % args.logging_steps == 0 or done == self.total_steps) and self.window:
            keys = self.window[-1].keys()
            logged = {k: float(np.mean([w[k] for w in self.window if k in w])) for k in keys}
            logged.update(extra() if extra else {})
            self.metrics.log(done, logged, echo=echo)
            self.window = []
        if self.eval_every > 0 and done % self.eval_every == 0 and done < self.total_steps:
            self.evaluate(done, echo)
        if self.save_every > 0 and done % self.save_every == 0 and done < self.total_steps:
            self.save(done)


def token_mean_weights(tokens: list, data_world: int) -> list:
    """Weights that turn per-micro-batch means into one token-mean over an optimizer step.

    ``tokens``: this rank's token count of each micro-batch.  Micro-batch i's mean loss times
    ``w_i = n_i * data_world / N`` (N: the step's tokens over every micro-batch of every data rank)
    sums to the mean over all N tokens once data parallel averages the gradients over its ranks
    (the ``data_world`` factor undoes that average).  Collective over the data ranks.
    """
    from ppo import parallel

    total = parallel.mean_over_data(float(sum(tokens))) * data_world
    return [float(t) * data_world / max(total, 1.0) for t in tokens]


def clear_grad(optimizer) -> None:
    """Free the gradients until the next backward (group-sharded stage 2 clears its own storage)."""
    from ppo import parallel

    if parallel.is_sharding_stage2(optimizer):
        optimizer.clear_grad()
    else:
        optimizer.clear_grad(set_to_zero=False)


# ---------------------------------------------------------------------------------------------
# Numeric guard


class TrainingDiverged(UserError):
    """Too many non-finite updates in a row: training stops, the last checkpoint is left as it was."""


def all_finite(value) -> bool:
    array = value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value, dtype=np.float64)
    return bool(np.all(np.isfinite(array)))


class NonFiniteGuard:
    """Skips an update whose loss, gradient norm, reward or KL is not finite, and counts it.

    Every data rank takes the same decision (a non-finite value on any rank skips the update
    everywhere).  After more than ``limit`` bad updates in a row, training stops with one line
    naming the step and the quantity.
    """

    def __init__(self, limit: int, stage: str):
        self.limit, self.stage = limit, stage
        self.consecutive = 0
        self.skipped = 0

    def ok(self, step: int, **quantities) -> bool:
        from ppo import parallel

        bad = [name for name, value in quantities.items() if not all_finite(value)]
        if parallel.mean_over_data(1.0 if bad else 0.0) == 0.0:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        what = bad[0] if bad else "value on another rank"
        if self.consecutive > self.limit:
            raise TrainingDiverged(
                f"non-finite {what} at {self.stage} step {step} ({self.consecutive} bad update(s) in a row, "
                f"max_nonfinite_steps={self.limit}); stopping, the last saved checkpoint is intact")
        logger.warning("non-finite %s at %s step %d: update skipped (%d in a row)", what, self.stage, step,
                       self.consecutive)
        return False


def check_weights_finite(models: dict) -> None:
    """Refuse to write a checkpoint with non-finite weights."""
    for name, model in models.items():
        for pname, p in unwrap(model).named_parameters():
            if not all_finite(p):
                raise TrainingDiverged(f"refusing to save a checkpoint: {name or 'model'} parameter {pname} "
                                       "is not finite (the last saved checkpoint is intact)")


# ---------------------------------------------------------------------------------------------
# Mixed precision: GPU only; a no-op with one warning on CPU


class Precision:
    def __init__(self, bf16: bool, fp16: bool, on_gpu: bool):
        self.dtype = "bfloat16" if bf16 else "float16" if fp16 else None
        if self.dtype and not on_gpu:
            logger.warning("%s requested but this is a CPU build: training in float32", self.dtype)
            self.dtype = None
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**15) if self.dtype == "float16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(dtype=self.dtype, level="O1")

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


# ---------------------------------------------------------------------------------------------
# Metrics


class MetricsLogger:
    """Console line + ``metrics.jsonl`` (+ VisualDL when installed), on the main rank only."""

    def __init__(self, output_dir: str, enabled: bool = True, use_visualdl: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writer = None
        if enabled and use_visualdl:
            try:
                from visualdl import LogWriter

                self.writer = LogWriter(logdir=os.path.join(output_dir, "vdl"))
            except Exception:
                self.writer = None

    def log(self, step: int, metrics: dict, split: str = "train", echo=None) -> None:
        if not self.enabled:
            return
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


# ---------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder and renamed only when complete


def unwrap(model):
    """The plain layer inside fleet / DataParallel / sharding wrappers."""
    while hasattr(model, "_layers"):
        model = model._layers
    while hasattr(model, "_layer") and not hasattr(model, "save_pretrained"):
        model = model._layer
    return model


def atomic_save(target: str, write) -> None:
    """``write(tmp_dir)``, then publish it as ``target``; a crash while writing leaves ``target`` intact."""
    tmp = _tmp_for(target)
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    publish(tmp, target)


def _tmp_for(target: str) -> str:
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".tmp-{os.path.basename(os.path.abspath(target))}")


def publish(tmp: str, target: str) -> None:
    """Make the finished folder ``tmp`` the new ``target``.

    A ``target`` that already holds other things (the final model goes to ``output_dir`` itself,
    beside metrics and step checkpoints) gets the finished files moved in one by one with
    ``os.replace``; otherwise the whole folder is renamed in one step.
    """
    if os.path.isdir(target) and not os.path.isfile(os.path.join(target, "config.json")) and os.listdir(target):
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(target, name))
        shutil.rmtree(tmp, ignore_errors=True)
        return
    parent, name = os.path.split(os.path.abspath(target))
    old = os.path.join(parent, f".old-{name}")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(target):
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained_atomic(model, tokenizer, target: str, extra: dict | None = None) -> None:
    """The final model, from_pretrained-loadable and merged over tensor parallel; call on every rank."""
    from ppo import parallel

    ctx = parallel.context()

    def write(tmp):
        parallel.save_model(model, tmp, tokenizer)
        if extra and ctx.is_main:
            with open(os.path.join(tmp, "training_state.json"), "w") as f:
                json.dump(extra, f, indent=1)

    # with tensor parallel every rank of the first data group takes part in the merge
    tmp = _tmp_for(target)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    parallel.barrier()
    write(tmp)
    parallel.barrier()
    if ctx.is_main:
        publish(tmp, target)
    parallel.barrier()


def start_or_resume(args, ctx) -> str | None:
    """Clean unfinished checkpoint writes; the checkpoint to resume from, if any (all ranks agree)."""
    from ppo import parallel

    if ctx.is_main:
        for name in checkpoint.clean_partial(args.output_dir):
            logger.warning("removed the unfinished checkpoint write %s", os.path.join(args.output_dir, name))
    parallel.barrier()
    return checkpoint.resolve_resume(args.resume_from_checkpoint, args.output_dir)


# ---------------------------------------------------------------------------------------------
# The loop shared by the single-model stages (reward model, SFT)


class SingleModelTrainer:
    """One model, one optimizer, one dataset: the loop of the reward-model and SFT stages.

    Subclasses build the model and data, then implement ``compute_loss(batch) -> (loss, stats)``
    (stats: python floats averaged into the log, plus optional numpy arrays the subclass consumes
    in ``after_step``) and ``evaluate() -> dict``.
    """

    stage = "train"

    @staticmethod
    def begin(args, dataset_cls):
        """Start-up shared by the stages: ranks, output folder, seed, checks -> (tokenizer, train, eval)."""
        from ppo import parallel
        from ppo.models import check_max_length, check_model_path, load_tokenizer

        parallel.init_parallel(args)
        prepare_output_dir(args.output_dir)
        set_seed(args.seed)
        config = check_model_path(args.model_name_or_path)
        check_max_length(config, args.max_length, args.model_name_or_path)
        tokenizer = load_tokenizer(args.model_name_or_path)
        return (tokenizer, *load_datasets(dataset_cls, args, tokenizer))

    def setup(self, args, model, tokenizer, train_data, eval_data) -> None:
        from ppo import parallel

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
        self.precision = Precision(args.bf16, args.fp16, parallel.device() == "gpu")
        self.metrics = MetricsLogger(args.output_dir, enabled=self.ctx.is_main)
        self.guard = NonFiniteGuard(args.max_nonfinite_steps, self.stage)
        self.start_step = 0
        folder = start_or_resume(args, self.ctx)
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

    def evaluate(self) -> dict:
        return {}

    def after_step(self, stats: list[dict]) -> None:
        """Called once per optimizer step with the stats of this rank's micro-batches."""

    def train(self) -> dict:
        from ppo import parallel

        args, ctx = self.args, self.ctx
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=self.stage,
                   disable=args.disable_tqdm or not ctx.is_main, dynamic_ncols=True)
        cadence = StepCadence(args, self.total_steps, self.metrics, self.log_eval, self.save_checkpoint,
                              steps_per_epoch=self.sampler.steps_per_epoch)
        if args.eval_steps > 0 and self.start_step == 0:
            self.log_eval(0, bar.write)  # the starting point of the eval curve
        self.model.train()
        for step in range(self.start_step, self.total_steps):
            batches = [self.collate(self.train_data, indices) for indices in self.sampler.micro_batches(step)]
            weights = self.micro_weights(batches)
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
            grad_norm = global_grad_norm(self.model.parameters(), self.optimizer)
            if self.guard.ok(step + 1, loss=[s["loss"] for s in stats], grad_norm=grad_norm):
                self.precision.step(self.optimizer)
                self.after_step(stats)
            clear_grad(self.optimizer)
            self.scheduler.step()
            scalars = {k for k, v in stats[0].items() if isinstance(v, float)}
            summary = {k: parallel.mean_over_data(float(np.mean([s[k] for s in stats]))) for k in sorted(scalars)}
            summary.update(grad_norm=grad_norm, skipped_updates=float(self.guard.skipped))
            bar.update(1)
            done = step + 1
            cadence.end_of_step(done, summary, bar.write, lambda: {
                "lr": float(self.optimizer.get_lr()), "epoch": round(self.sampler.epoch_of(done), 3)})
        bar.close()
        final = self.log_eval(self.total_steps, print)
        self.save(args.output_dir, self.total_steps)
        self.metrics.close()
        return final

    def log_eval(self, step: int, echo) -> dict:
        metrics = self.evaluate()
        if metrics:
            self.metrics.log(step, metrics, split="eval", echo=echo)
        return metrics

    def eval_shard(self) -> tuple[list[int], int]:
        """This data rank's contiguous share of the eval set and the padded per-rank size."""
        n, world, rank = len(self.eval_data), self.ctx.data_world, self.ctx.data_rank
        per_rank = -(-n // world)
        return list(range(rank * per_rank, min(n, (rank + 1) * per_rank))), per_rank

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
        from ppo import parallel

        parallel.barrier()
        self.before_save()
        save_pretrained_atomic(self.model, self.tokenizer, target,
                               extra={"global_step": step, "stage": self.stage, "args": vars(self.args)})
        parallel.barrier()
