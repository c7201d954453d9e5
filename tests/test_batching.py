"""The update's cut of an optimizer step's rows into length-packed micro-batches, against a brute
force over every cut."""

import itertools

import numpy as np
import pytest

from ppo.core.batching import MICRO_BATCH_OVERHEAD_TOKENS, length_micro_batches, step_micro_batches


def brute_force(lengths, rows, max_rows, overhead):
    """The least (computed tokens + overhead per micro-batch) over every cut of the rows, sorted
    longest first, into consecutive runs of at most max_rows rows (naive: every subset of cut points)."""
    ordered = sorted(rows, key=lambda r: -lengths[r])
    n, best = len(ordered), None
    for k in range(n):
        for points in itertools.combinations(range(1, n), k):
            bounds = [0, *points, n]
            runs = [ordered[a:b] for a, b in zip(bounds, bounds[1:])]
            if any(len(r) > max_rows for r in runs):
                continue
            cost = sum(len(r) * max(lengths[i] for i in r) + overhead for r in runs)
            best = cost if best is None else min(best, cost)
    return best


def cost_of(cut, lengths, overhead):
    return sum(len(r) * max(lengths[i] for i in r) + overhead for r in cut)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("overhead", [0, 7, MICRO_BATCH_OVERHEAD_TOKENS, 500])
def test_cut_is_the_cheapest_partition(seed, overhead):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    lengths = rng.integers(3, 200, size=20)
    rows = rng.choice(20, size=n, replace=False)
    max_rows = int(rng.integers(1, 5))
    cut = length_micro_batches(rows, lengths, max_rows, overhead)
    # a partition of the rows, each micro-batch at most max_rows rows of non-increasing length
    assert sorted(np.concatenate(cut).tolist()) == sorted(rows.tolist())
    assert all(1 <= len(r) <= max_rows for r in cut)
    flat = [lengths[i] for r in cut for i in r]
    assert flat == sorted(flat, reverse=True)
    assert cost_of(cut, lengths, overhead) == brute_force(lengths, rows.tolist(), max_rows, overhead)


def test_cut_follows_the_overhead():
    # lengths 100, 99, 10, 9: one run of 4 computes 400 tokens; two runs (100, 99 | 10, 9) 200 + 20
    lengths = np.array([10, 100, 9, 99])
    rows = np.arange(4)
    assert [r.tolist() for r in length_micro_batches(rows, lengths, 4, overhead_tokens=32)] == [[1, 3], [0, 2]]
    # an overhead above the 180 tokens a split saves: one micro-batch
    assert [r.tolist() for r in length_micro_batches(rows, lengths, 4, overhead_tokens=200)] == [[1, 3, 0, 2]]
    # no overhead: every row alone costs its own length only
    assert len(length_micro_batches(rows, lengths, 4, overhead_tokens=0)) == 4
    # never more than max_rows rows, nor more tokens than max_rows rows of the longest
    cut = length_micro_batches(np.arange(8), np.full(8, 50), 3, overhead_tokens=1e9)
    assert sorted(len(r) for r in cut) == [2, 3, 3]
    assert length_micro_batches(np.arange(0), np.zeros(0), 4) == []


def test_step_micro_batches_fixed_count():
    lengths = np.array([5, 50, 7, 40, 6, 30])
    rows = np.array([0, 1, 2, 3, 4, 5])
    # without lengths: in order, count runs of max_rows
    assert [r.tolist() for r in step_micro_batches(rows, None, 2, 3)] == [[0, 1], [2, 3], [4, 5]]
    # by length with a fixed count (ptx mixed in): longest first, count runs of max_rows
    assert [r.tolist() for r in step_micro_batches(rows, lengths, 2, 3, free=False)] == [[1, 3], [5, 2], [4, 0]]
    # free: the cheapest cut
    free = step_micro_batches(rows, lengths, 2, 3)
    assert cost_of(free, lengths, MICRO_BATCH_OVERHEAD_TOKENS) == brute_force(lengths, rows.tolist(), 2,
                                                                               MICRO_BATCH_OVERHEAD_TOKENS)
