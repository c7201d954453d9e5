"""The one rule by which the layout tests compare trained weights with one process's.

Two layouts compute the same sums in another order (an all-reduce over ranks, matmuls split over
the hidden or vocabulary dimension), so their gradients differ by float32 rounding, about 1e-7
relative.  AdamW divides each gradient by its own running size, ``m_hat / (sqrt(v_hat) + eps)``, so:

* a weight whose gradient is well away from zero takes the same step up to that rounding: the two
  runs stay within a small fraction of one learning-rate step of each other;
* a weight whose gradient is near zero (its terms cancel) takes a step of about ``lr`` in the
  direction of its gradient's rounded sign, whichever that is: two runs can put such a weight up
  to ``2 * lr`` apart per step.  There are few of them: over 201 layout comparisons under four roundings, at most
  3 weights in ten thousand landed further than ``lr / 100`` from one process's.

So the rule is: (1) no weight further apart than two AdamW trajectories can get, ``2 * sum_t lr *
c_t`` where ``c_t`` bounds ``|m_hat / sqrt(v_hat)|`` at step ``t`` (Cauchy-Schwarz over AdamW's two
moving averages, about 1 for the betas used here); (2) at most one weight in a thousand overall, and
one in twenty of each tensor (at least one), further apart than a hundredth of a step.  A layout that
is really wrong (a dropped gradient all-reduce, a shard that skipped its update, an extra or a
missing step) moves most weights by a sizeable share of ``lr`` and fails (2) by orders of
magnitude; ``tests/test_trained_weights.py`` shows that on AdamW written in numpy.
"""

import json
import os

import numpy as np

# a hundredth of one learning-rate step: what rounding alone leaves between two runs' weights
FAR = 1e-2
# the share of weights allowed beyond FAR (the near-zero-gradient ones), overall
FAR_SHARE = 1e-3
# and in one tensor: a wrong tensor (a norm never reduced, a shard never updated) has most of its
# weights beyond FAR; a LoRA A matrix of 256 weights has had 2 (its gradients start near zero)
TENSOR_SHARE = 0.05


def adamw_step_bound(beta1: float, beta2: float, step: int) -> float:
    """The largest ``|m_hat / sqrt(v_hat)|`` AdamW can reach at ``step`` (1-based, eps = 0).

    ``m_hat = sum_k a_k g_k`` and ``v_hat = sum_k b_k g_k^2`` with the bias-corrected weights
    ``a_k = (1 - beta1) beta1^(t-k) / (1 - beta1^t)``, ``b_k = (1 - beta2) beta2^(t-k) / (1 - beta2^t)``;
    Cauchy-Schwarz gives ``|m_hat| <= sqrt(sum_k a_k^2 / b_k) * sqrt(v_hat)``."""
    k = np.arange(1, step + 1)
    a = (1 - beta1) * beta1 ** (step - k) / (1 - beta1 ** step)
    b = (1 - beta2) * beta2 ** (step - k) / (1 - beta2 ** step)
    return float(np.sqrt(np.sum(a * a / b)))


def weights(path) -> dict:
    """name -> numpy array of a model folder's weights (safetensors, sharded or not, or a pickle), or
    of one weights file (``.safetensors`` or ``.pdparams``)."""
    import paddle

    from ppo.storage.tensors import folder_state, read_tensors

    path = str(path)
    if os.path.isdir(path):
        state = folder_state(path)
    elif path.endswith(".safetensors"):
        state = read_tensors(path)
    else:
        state = paddle.load(path)
    return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in state.items()}


load = weights


def weight_gaps(a: dict, b: dict, lr: float, steps: int, beta1: float = 0.9, beta2: float = 0.95) -> dict:
    """What the rule measures on two runs' weights: the largest gap, the bound, and the weights
    further apart than ``FAR * lr`` (overall and the worst tensor)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    bound = 2 * lr * sum(adamw_step_bound(beta1, beta2, t) for t in range(1, steps + 1))
    worst, far, total, tensors = (0.0, ""), 0, 0, []
    for k in sorted(a):
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        gap = np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))
        n_far = int((gap > FAR * lr).sum())
        worst = max(worst, (float(gap.max(initial=0.0)), k))
        far, total = far + n_far, total + gap.size
        tensors.append((n_far, max(1, int(TENSOR_SHARE * gap.size)), k, gap.size))
    return {"max": worst[0], "max_at": worst[1], "bound": bound, "far": far, "weights": total,
            "tensors_over": [t for t in tensors if t[0] > t[1]]}


def assert_trained_weights_match(a, b, lr: float, steps: int, beta1: float = 0.9, beta2: float = 0.95):
    """Two runs' trained weights (dicts name -> array, or model folders) equal up to how AdamW
    spreads float32 rounding (the module docstring): ``lr`` is the peak learning rate and ``steps``
    the number of optimizer steps (an upper bound is fine)."""
    a = a if isinstance(a, dict) else load(a)
    b = b if isinstance(b, dict) else load(b)
    gaps = weight_gaps(a, b, lr, steps, beta1, beta2)
    if os.environ.get("WEIGHT_GAPS_LOG"):  # the sweep over roundings records what every comparison saw
        with open(os.environ["WEIGHT_GAPS_LOG"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "lr": lr, "steps": steps,
                                **{k: v for k, v in gaps.items() if k != "tensors_over"},
                                "tensors_over": len(gaps["tensors_over"])}) + "\n")
    assert gaps["max"] <= gaps["bound"], f"a weight is further apart than AdamW can move it: {gaps}"
    assert gaps["far"] <= max(1, FAR_SHARE * gaps["weights"]), f"too many weights apart: {gaps}"
    assert not gaps["tensors_over"], f"a tensor has too many weights apart: {gaps}"
    return gaps


def assert_bitwise_weights(a, b):
    """Two runs' weights (dicts or model folders) bit for bit equal."""
    a = a if isinstance(a, dict) else load(a)
    b = b if isinstance(b, dict) else load(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_no_pickles(folder) -> None:
    """No file anywhere under ``folder`` is a pickle (none starts with pickle's protocol header)."""
    from ppo.storage.safe_pickle import is_pickle

    found = [os.path.join(d, n) for d, _, names in os.walk(str(folder)) for n in names if is_pickle(os.path.join(d, n))]
    assert not found, f"pickled files in {folder}: {found}"
    assert any(n.endswith(".safetensors") for _, _, names in os.walk(str(folder)) for n in names)
