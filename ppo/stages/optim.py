"""Optimizer, learning-rate schedule, gradient norm and mixed precision of every training loop
(the loops call ``backward()`` / ``optimizer.step()`` themselves)."""

from __future__ import annotations

import contextlib
import logging
import math

import paddle

from ppo.distributed import parallel
from ppo.models import cpu_gemm

logger = logging.getLogger("ppo")


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


def clear_grad(optimizer) -> None:
    """Free the gradients until the next backward (group-sharded stage 2 clears its own storage)."""
    if parallel.is_sharding_stage2(optimizer):
        optimizer.clear_grad()
    else:
        optimizer.clear_grad(set_to_zero=False)


# ---------------------------------------------------------------------------------------------
# Mixed precision: autocast on GPU; on CPU the matmul path (ppo.models.cpu_gemm), bf16 matmuls
# where the CPU has bf16 units


class Precision:
    def __init__(self, bf16: bool, fp16: bool, on_gpu: bool, cpu_gemm_mode: str = "auto"):
        self.dtype = "bfloat16" if bf16 else "float16" if fp16 else None
        self._before = cpu_gemm.snapshot()  # the matmul path the run found, put back by close()
        if not on_gpu:
            notice = cpu_gemm.select(cpu_gemm_mode, bf16=bf16)
            if notice:
                logger.warning("%s", notice)
            if self.dtype and not cpu_gemm.STATE.bf16 and "bf16" not in (notice or ""):
                logger.warning("%s requested but this is a CPU build: training in float32", self.dtype)
            self.dtype = None
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**15) if self.dtype == "float16" else None

    def close(self) -> None:
        """End the run's matmul path: the process goes back to the one it had before the run."""
        cpu_gemm.restore(self._before)

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
