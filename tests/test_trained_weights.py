"""The weight rule of the layout tests (``tests/trained_weights.py``) on AdamW written in numpy:
rounding-level gradient differences pass, a wrong layout fails."""

import numpy as np
import pytest

from trained_weights import adamw_step_bound, assert_trained_weights_match, weight_gaps

LR, STEPS, B1, B2, EPS = 1e-3, 6, 0.9, 0.95, 1e-8


def adamw(w0, grads, lr=LR):
    """AdamW (no decay) over a list of gradient dicts, as paddle.optimizer.AdamW steps it."""
    w = {k: v.copy() for k, v in w0.items()}
    m = {k: np.zeros_like(v) for k, v in w0.items()}
    v2 = {k: np.zeros_like(v) for k, v in w0.items()}
    for t, g in enumerate(grads, 1):
        for k in w:
            m[k] = B1 * m[k] + (1 - B1) * g[k]
            v2[k] = B2 * v2[k] + (1 - B2) * g[k] ** 2
            mh, vh = m[k] / (1 - B1 ** t), v2[k] / (1 - B2 ** t)
            w[k] = w[k] - lr * mh / (np.sqrt(vh) + EPS)
    return w


@pytest.fixture(scope="module")
def problem():
    """Weights and per-sample gradients of a batch of 8 over 6 steps; one weight of each of two
    tensors has gradients whose terms cancel (near zero), as a weight that two tied rows pull
    in opposite directions does."""
    rng = np.random.default_rng(0)
    shapes = {"embed": (64, 32), "proj": (32, 32), "norm": (32,)}
    w0 = {k: rng.normal(0, 0.1, s) for k, s in shapes.items()}
    per_sample = [{k: rng.normal(0, 1e-2, (8, *s)) for k, s in shapes.items()} for _ in range(STEPS)]
    for step in per_sample:
        for k in ("proj", "embed"):  # the two halves cancel: gradient 0 up to rounding
            step[k][4:, 3, 5] = -step[k][:4, 3, 5]
    return w0, per_sample


def mean_grads(per_sample, noise, rng, samples=slice(None)):
    """The batch-mean gradient of each step, with relative float32-level ``noise`` (another order of
    summation) on every term."""
    out = []
    for step in per_sample:
        out.append({k: (g[samples] * (1 + noise * rng.standard_normal(g[samples].shape))).mean(0)
                    for k, g in step.items()})
    return out


def test_adamw_step_bound_is_one_at_the_first_step_and_bounds_the_steps():
    assert adamw_step_bound(B1, B2, 1) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    bounds = [adamw_step_bound(B1, B2, t) for t in range(1, 50)]
    m = v = 0.0
    for t in range(1, 50):  # adversarial gradients: large, then tiny, same sign
        g = 1.0 if t < 3 else 1e-3 * rng.random()
        m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
        assert abs(m / (1 - B1 ** t)) / np.sqrt(v / (1 - B2 ** t)) <= bounds[t - 1] + 1e-12


def test_rounding_differences_pass(problem):
    w0, per_sample = problem
    rng = np.random.default_rng(2)
    one = adamw(w0, mean_grads(per_sample, 1e-7, rng))
    two = adamw(w0, mean_grads(per_sample, 1e-7, rng))
    gaps = assert_trained_weights_match(one, two, LR, STEPS)
    assert gaps["max"] > 1e-5  # the cancelling row does follow its rounding: the rule is needed
    assert gaps["far"] >= 1


@pytest.mark.parametrize("wrong", ["dropped-all-reduce", "skipped-shard-update", "extra-step", "lr-ignored",
                                   "replicated-norm-drift"])
def test_a_wrong_layout_fails(problem, wrong):
    w0, per_sample = problem
    rng = np.random.default_rng(3)
    one = adamw(w0, mean_grads(per_sample, 1e-7, rng))
    grads = mean_grads(per_sample, 1e-7, rng)
    if wrong == "dropped-all-reduce":  # rank 0 steps on its half of the batch alone
        two = adamw(w0, mean_grads(per_sample, 1e-7, rng, samples=slice(0, 4)))
    elif wrong == "skipped-shard-update":  # the second shard of the embedding never updated
        two = adamw(w0, grads)
        two["embed"][32:] = w0["embed"][32:]
    elif wrong == "extra-step":
        two = adamw(w0, grads + grads[-1:])
    elif wrong == "lr-ignored":
        two = adamw(w0, grads, lr=LR * 1.1)
    else:  # one replicated tensor (a norm weight every rank holds) drifted by 5% of a step per weight
        two = adamw(w0, grads)
        two["norm"] = two["norm"] + 0.05 * LR
    with pytest.raises(AssertionError):
        assert_trained_weights_match(one, two, LR, STEPS)


def test_one_tensor_wrong_fails_even_when_the_overall_share_is_small(problem):
    w0, per_sample = problem
    rng = np.random.default_rng(4)
    one = adamw(w0, mean_grads(per_sample, 1e-7, rng))
    two = {k: v.copy() for k, v in adamw(w0, mean_grads(per_sample, 1e-7, rng)).items()}
    two["norm"] = two["norm"] + 0.5 * LR  # 32 of 3,104 weights: 1% overall, all of one tensor
    gaps = weight_gaps(one, two, LR, STEPS)
    assert gaps["tensors_over"]
    with pytest.raises(AssertionError):
        assert_trained_weights_match(one, two, LR, STEPS)
