"""Vocabulary-parallel logits under tensor parallel: whether a model's logits come out split over
the ranks' vocabularies, full logits for generation, and log-probs and entropy from this rank's
slice (no rank ever holds the whole vocabulary)."""

from __future__ import annotations

import contextlib

import paddle
import paddle.distributed as dist

from ppo.distributed.parallel import context


def vocab_is_split(model) -> bool:
    """True when ``model``'s logits come out split over the tensor-parallel ranks' vocabularies."""
    config = getattr(model, "config", None)
    return (context().tp_degree > 1 and int(getattr(config, "tensor_parallel_degree", 1) or 1) > 1
            and bool(getattr(config, "tensor_parallel_output", False)))


@contextlib.contextmanager
def full_vocab_logits(model):
    """Within the block ``model`` returns full-vocabulary logits (gathered over tensor parallel).

    Generation samples from the whole distribution; training keeps the split logits.
    """
    config = getattr(model, "config", None)
    if config is None or not vocab_is_split(model):
        yield
        return
    config.tensor_parallel_output = False
    try:
        yield
    finally:
        config.tensor_parallel_output = True


def vocab_parallel_log_probs(logits, labels, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs [B, T] of ``labels`` (and entropy) from this rank's vocabulary slice of the logits.

    logits [B, T, V / mp] hold vocabulary ids [rank * V/mp, (rank+1) * V/mp).  The log-probs are
    fleet's vocabulary-parallel cross entropy (``ParallelCrossEntropy``: the fused kernel on GPU,
    ``ppo.distributed.cpu_fleet``'s adaptation on CPU), negated.  No rank ever holds the full vocabulary.
    """
    from paddle.distributed.fleet.meta_parallel import ParallelCrossEntropy

    group = context().hcg.get_model_parallel_group()
    x = logits.astype("float32") / temperature
    log_probs = -ParallelCrossEntropy(mp_group=group)(x, labels.astype("int64")).reshape(labels.shape)
    return log_probs, (_vocab_parallel_entropy(x, group) if with_entropy else None)


def vocab_parallel_entropy(logits, temperature: float = 1.0):
    """Entropy [B, T] of the softmax over the whole vocabulary, from this rank's slice of the logits."""
    return _vocab_parallel_entropy(logits.astype("float32") / temperature,
                                   context().hcg.get_model_parallel_group())


def _vocab_parallel_entropy(x, group):
    from paddle.distributed.fleet.layers.mpu import mp_ops

    def reduce_sum(t):  # differentiable all-reduce: backward is the identity on each shard
        return mp_ops._mp_allreduce(t, group=group, use_calc_stream=True, use_model_parallel=True)

    # H = logsumexp(x) - sum softmax(x) * x from a max and sums all-reduced over the group; the max
    # is a constant shift (exact), so detached
    shift = x.max(axis=-1, keepdim=True).detach()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    e = paddle.exp(x - shift)
    total = reduce_sum(e.sum(axis=-1))
    return paddle.log(total) + shift.squeeze(-1) - reduce_sum((e * x).sum(axis=-1)) / total
