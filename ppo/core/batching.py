"""Batching over data ranks: the same global batches whatever the number of data ranks, and the
weights that make one token-mean of an optimizer step's micro-batches."""

from __future__ import annotations

import math

import numpy as np

from ppo.core.errors import UserError


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


def token_mean_weights(tokens: list, total: float, data_world: int) -> list:
    """Weights that turn per-micro-batch means into one token-mean over an optimizer step.

    ``tokens``: this rank's token count of each micro-batch; ``total``: N, the step's tokens over
    every micro-batch of every data rank (``parallel.sum_over_data(sum(tokens))``).  Micro-batch
    i's mean loss times ``w_i = n_i * data_world / N`` sums to the mean over all N tokens once data
    parallel averages the gradients over its ranks (the ``data_world`` factor undoes that average).
    """
    return [float(t) * data_world / max(total, 1.0) for t in tokens]


def longest_first(rows, lengths) -> np.ndarray:
    """``rows`` ordered by ``lengths[row]`` descending (stable): micro-batches cut from it hold rows of
    similar length.  Within one optimizer step this changes no token-mean (``token_mean_weights``)."""
    rows = np.asarray(rows)
    return rows[np.argsort(-np.asarray(lengths)[rows], kind="stable")]


# What one more micro-batch costs beside its tokens, in tokens of forward + backward: on the 33.5M
# model on 2 cores a micro-step's fixed cost measured 29-40 tokens for the critic and 1-51 for the
# actor, whose fit is noisier (benchmarks/micro_step_cost.py: time against tokens, intercept /
# slope; benchmarks/results/micro_step_cost_33m.json).  Larger models make it smaller.
MICRO_BATCH_OVERHEAD_TOKENS = 32


def length_micro_batches(rows, lengths, max_rows: int,
                         overhead_tokens: float = MICRO_BATCH_OVERHEAD_TOKENS) -> list[np.ndarray]:
    """``rows`` cut into micro-batches of at most ``max_rows`` rows of similar length, each to be
    packed to its own longest row: the rows longest first (:func:`longest_first`), then the cut
    into consecutive runs that computes the fewest tokens (a run's rows x its longest row) plus
    ``overhead_tokens`` per micro-batch, found exactly by dynamic programming over the cut points.

    A micro-batch never holds more rows, nor more tokens, than ``max_rows`` rows of the longest
    row (the memory of today's fixed cut).  The number of micro-batches varies (from
    ceil(len / max_rows) up): the token-mean weights (:func:`token_mean_weights`) keep every
    optimizer step's loss the same whatever the cut, and data-parallel gradients are reduced once
    per step (on the last micro-batch), so ranks may cut differently."""
    ordered = longest_first(rows, lengths)
    n = len(ordered)
    if n == 0:
        return []
    width = np.asarray(lengths)[ordered].astype(np.float64)  # descending
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    start = np.zeros(n + 1, dtype=np.int64)  # best[i]: the first i rows; their last run starts at start[i]
    for i in range(1, n + 1):
        for j in range(max(0, i - max_rows), i):
            cost = best[j] + (i - j) * width[j] + overhead_tokens  # rows j..i-1, the longest is row j
            if cost < best[i]:
                best[i], start[i] = cost, j
    cuts, i = [], n
    while i > 0:
        cuts.append((start[i], i))
        i = start[i]
    return [ordered[a:b] for a, b in reversed(cuts)]


def step_micro_batches(rows, lengths, max_rows: int, count: int, free: bool = True) -> list[np.ndarray]:
    """An optimizer step's ``rows`` as micro-batches: without ``lengths``, ``count`` runs of
    ``max_rows`` in order; with them, by length (:func:`length_micro_batches` when ``free``, else
    ``count`` runs of the rows longest first)."""
    rows = np.asarray(rows)
    if lengths is not None and free:
        return length_micro_batches(rows, lengths, max_rows)
    rows = longest_first(rows, lengths) if lengths is not None else rows
    return [rows[i * max_rows:(i + 1) * max_rows] for i in range(count)]


def length_groups(lengths, overhead: int = 16) -> list:
    """Rows (indices into ``lengths`` [B]) in groups of similar length, longest first: the contiguous
    partition of the length-sorted rows with the fewest computed tokens (rows x the group's longest)
    plus ``overhead`` tokens per group (a forward's fixed cost), by dynamic programming over B."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    ls = np.asarray(lengths)[order]
    B = len(ls)
    best, cut = [0] * (B + 1), [0] * (B + 1)
    for j in range(1, B + 1):  # best[j]: rows order[:j] grouped; the last group starts at cut[j]
        best[j], cut[j] = min((best[i] + (j - i) * int(ls[i]) + overhead, i) for i in range(j))
    groups, j = [], B
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]
