"""ppo.core.algorithms against naive numpy references written with explicit loops."""

import math

import numpy as np
import paddle
import pytest

from ppo.core import algorithms as A

TOL = dict(rtol=1e-5, atol=1e-5)
SHAPES = [(1, 1), (3, 7), (5, 16), (8, 33)]


def t(x, dtype="float32"):
    return paddle.to_tensor(np.asarray(x), dtype=dtype)


def make_mask(rng, B, T, allow_empty=False):
    """Rows: a masked prompt offset, a response span, masked padding; row 0 has a single action."""
    m = np.zeros((B, T), dtype=np.float32)
    for b in range(B):
        if allow_empty and b == B - 1 and B > 1:
            continue
        start = int(rng.integers(0, T))
        length = 1 if b == 0 else int(rng.integers(1, T - start + 1))
        m[b, start:start + length] = 1.0
    return m


def spans(mask_row):
    idx = [i for i, v in enumerate(mask_row) if v]
    return (idx[0], idx[-1]) if idx else None


# ------------------------------------------------------------------------- masked statistics


def ref_masked_stats(v, m):
    total, count = 0.0, 0.0
    for x, w in zip(v.ravel(), m.ravel()):
        total += x * w
        count += w
    mean = total / count
    sq = 0.0
    for x, w in zip(v.ravel(), m.ravel()):
        sq += w * (x - mean) ** 2
    return total, mean, sq / max(count - 1, 1), sq / count


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_sum_mean_var_whiten(shape):
    rng = np.random.default_rng(sum(shape))
    v = rng.normal(1.5, 2.0, size=shape)
    m = make_mask(rng, *shape)
    total, mean, var_u, var_b = ref_masked_stats(v, m)
    np.testing.assert_allclose(float(A.masked_sum(t(v), t(m))), total, **TOL)
    np.testing.assert_allclose(float(A.masked_mean(t(v), t(m))), mean, **TOL)
    np.testing.assert_allclose(float(A.masked_mean(t(v), t(m) > 0)), mean, **TOL)  # bool mask
    np.testing.assert_allclose(float(A.masked_var(t(v), t(m))), var_u, **TOL)
    np.testing.assert_allclose(float(A.masked_var(t(v), t(m), unbiased=False)), var_b, **TOL)

    white = A.masked_whiten(t(v), t(m)).numpy()
    no_shift = A.masked_whiten(t(v), t(m), shift_mean=False).numpy()
    for b in range(shape[0]):
        for j in range(shape[1]):
            expected = (v[b, j] - mean) / math.sqrt(var_u + 1e-8)
            np.testing.assert_allclose(white[b, j], expected, **TOL)
            np.testing.assert_allclose(no_shift[b, j], expected + mean, **TOL)


def test_masked_mean_axis_and_eps():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 9))
    m = make_mask(rng, 4, 9)
    rows = A.masked_mean(t(v), t(m), axis=1).numpy()
    row_sums = A.masked_sum(t(v), t(m), axis=1).numpy()
    cols = A.masked_mean(t(v), t(m), axis=0, eps=1.0).numpy()
    for b in range(4):
        s = sum(v[b, j] * m[b, j] for j in range(9))
        np.testing.assert_allclose(row_sums[b], s, **TOL)
        np.testing.assert_allclose(rows[b], s / m[b].sum(), **TOL)
    for j in range(9):
        s = sum(v[b, j] * m[b, j] for b in range(4))
        np.testing.assert_allclose(cols[j], s / (m[:, j].sum() + 1.0), **TOL)


def test_masked_mean_is_token_mean_not_mean_of_sequence_means():
    v = np.array([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    m = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # 9 / 5 tokens, not (1 + 5) / 2
    np.testing.assert_allclose(float(A.masked_mean(t(v), t(m))), 1.8, **TOL)


def test_masked_whiten_gives_zero_mean_unit_var_on_mask():
    rng = np.random.default_rng(1)
    v = rng.normal(3.0, 4.0, size=(6, 20))
    m = make_mask(rng, 6, 20)
    w = A.masked_whiten(t(v), t(m)).numpy()
    sel = w[m > 0]
    np.testing.assert_allclose(sel.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(sel.var(ddof=1), 1.0, rtol=1e-4)


# --------------------------------------------------------------------- log-probs and entropy


def ref_log_softmax(row):
    mx = max(row)
    lse = mx + math.log(sum(math.exp(x - mx) for x in row))
    return [x - lse for x in row]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 6, 11), (3, 4, 50)])
def test_gather_log_probs_and_entropy(shape, temperature):
    rng = np.random.default_rng(shape[2])
    B, T, V = shape
    logits = rng.normal(0.0, 3.0, size=shape).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    lp = A.gather_log_probs(t(logits), t(labels, "int64"), temperature=temperature).numpy()
    ent = A.entropy_from_logits(t(logits), temperature=temperature).numpy()
    assert lp.shape == (B, T) and ent.shape == (B, T)
    for b in range(B):
        for j in range(T):
            ls = ref_log_softmax([float(x) / temperature for x in logits[b, j]])
            np.testing.assert_allclose(lp[b, j], ls[labels[b, j]], **TOL)
            np.testing.assert_allclose(ent[b, j], -sum(math.exp(x) * x for x in ls), **TOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_one_pass_log_probs_and_entropy(temperature):
    """The one-pass pair equals the naive log-softmax and entropy, and its log-probs' gradient is
    gather_log_probs' (the entropy is a detached statistic)."""
    rng = np.random.default_rng(5)
    B, T, V = 2, 5, 13
    logits = rng.normal(0.0, 3.0, size=(B, T, V)).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    x = t(logits)
    x.stop_gradient = False
    lp, ent = A.log_probs_and_entropy(x, t(labels, "int64"), temperature=temperature)
    assert ent.stop_gradient
    for b in range(B):
        for j in range(T):
            ls = ref_log_softmax([float(v) / temperature for v in logits[b, j]])
            np.testing.assert_allclose(lp.numpy()[b, j], ls[labels[b, j]], **TOL)
            np.testing.assert_allclose(ent.numpy()[b, j], -sum(math.exp(v) * v for v in ls), **TOL)
    weights = t(rng.normal(size=(B, T)).astype(np.float32))
    (lp * weights).sum().backward()
    y = t(logits)
    y.stop_gradient = False
    (A.gather_log_probs(y, t(labels, "int64"), temperature=temperature) * weights).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), y.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_gather_log_probs_bf16_is_computed_in_float32():
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 3.0, size=(2, 3, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=(2, 3))
    bf16 = t(logits).astype("bfloat16")
    rounded = bf16.astype("float32").numpy()
    out = A.gather_log_probs(bf16, t(labels, "int64"))
    assert out.dtype == paddle.float32
    for b in range(2):
        for j in range(3):
            np.testing.assert_allclose(out.numpy()[b, j],
                                       ref_log_softmax(list(rounded[b, j]))[labels[b, j]], **TOL)


# ------------------------------------------------------------------------------------- KL


def ref_kl(lp, ref, estimator):
    out = np.zeros_like(lp)
    for idx in np.ndindex(lp.shape):
        r = lp[idx] - ref[idx]
        if estimator == "k1":
            out[idx] = r
        elif estimator == "k2":
            out[idx] = 0.5 * r * r
        else:
            out[idx] = math.exp(-r) - 1.0 + r
    return out


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("shape", SHAPES)
def test_compute_kl_and_kl_loss(shape, estimator):
    rng = np.random.default_rng(len(estimator) + sum(shape))
    lp = rng.normal(-2.0, 1.0, size=shape)
    ref = lp + rng.normal(0.0, 0.5, size=shape)
    m = make_mask(rng, *shape)
    expected = ref_kl(lp, ref, estimator)
    np.testing.assert_allclose(A.compute_kl(t(lp), t(ref), estimator).numpy(), expected, **TOL)
    _, mean, _, _ = ref_masked_stats(expected, m)
    np.testing.assert_allclose(float(A.kl_loss(t(lp), t(ref), t(m), estimator)), mean, **TOL)


def test_kl_loss_default_is_k3():
    lp, ref = np.array([[-1.0, -2.0]]), np.array([[-2.0, -0.5]])
    m = np.ones((1, 2))
    expected = (math.exp(-1.0) - 1 + 1.0 + math.exp(1.5) - 1 - 1.5) / 2
    np.testing.assert_allclose(float(A.kl_loss(t(lp), t(ref), t(m))), expected, **TOL)
    np.testing.assert_allclose(A.compute_kl(t(lp), t(ref)).numpy(), [[1.0, -1.5]], **TOL)  # k1


def test_k3_is_nonnegative_everywhere():
    rng = np.random.default_rng(4)
    lp = rng.normal(-3.0, 2.0, size=(16, 64)).astype(np.float32)
    ref = lp.copy()
    ref[:4] += rng.normal(0.0, 3.0, size=(4, 64)).astype(np.float32)
    ref[4:8] += rng.normal(0.0, 1e-4, size=(4, 64)).astype(np.float32)  # tiny ratios: cancellation
    ref[8:12] += rng.normal(0.0, 1e-7, size=(4, 64)).astype(np.float32)
    k3 = A.compute_kl(t(lp), t(ref), "k3").numpy()
    assert (k3 >= 0).all()
    assert (k3[:4] > 0).mean() > 0.9
    assert (k3[12:] == 0).all()


def test_unknown_kl_estimator():
    x = t(np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"'k4'.*k1, k2, k3"):
        A.compute_kl(x, x, "k4")
    with pytest.raises(ValueError, match="k4"):
        A.kl_loss(x, x, x, "k4")


# ------------------------------------------------------------------------ reward shaping


def test_last_action_index():
    m = np.array([[0, 0, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]])
    for mask in (t(m), t(m, "bool"), t(m, "int64")):
        out = A.last_action_index(mask)
        assert out.dtype == paddle.int64
        assert out.numpy().tolist() == [3, 0, 0, 4]


@pytest.mark.parametrize("shape", SHAPES)
def test_last_action_index_random(shape):
    rng = np.random.default_rng(sum(shape) + 7)
    m = make_mask(rng, *shape, allow_empty=True)
    expected = []
    for row in m:
        last = 0
        for j, x in enumerate(row):
            if x:
                last = j
        expected.append(last)
    assert A.last_action_index(t(m)).numpy().tolist() == expected


def ref_shape_rewards(scores, kl, m, coeff, clip, missing=None, penalty=None):
    B, T = kl.shape
    out = np.zeros((B, T))
    for b in range(B):
        for j in range(T):
            out[b, j] = -coeff * kl[b, j] * m[b, j]
        s = spans(m[b])
        if s is None:
            continue
        score = scores[b]
        if missing is not None and penalty is not None and missing[b]:
            score += penalty
        if clip is not None and clip > 0:
            score = min(max(score, -clip), clip)
        out[b, s[1]] += score
    return out


@pytest.mark.parametrize("clip", [None, 0.0, 1.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_shape_rewards(shape, clip):
    rng = np.random.default_rng(sum(shape) + 11)
    B, T = shape
    scores = rng.normal(0.0, 2.0, size=B)
    kl = rng.normal(0.0, 0.3, size=shape)
    m = make_mask(rng, B, T, allow_empty=True)
    missing = rng.random(B) < 0.5
    got = A.shape_rewards(t(scores), t(kl), t(m), 0.05, clip).numpy()
    np.testing.assert_allclose(got, ref_shape_rewards(scores, kl, m, 0.05, clip), **TOL)
    got = A.shape_rewards(t(scores[:, None]), t(kl), t(m) > 0, 0.05, clip,
                          missing_eos=t(missing, "bool"), missing_eos_penalty=-1.0).numpy()
    np.testing.assert_allclose(got, ref_shape_rewards(scores, kl, m, 0.05, clip, missing, -1.0),
                               **TOL)


def test_shape_rewards_penalty_applied_before_clip():
    kl = np.zeros((2, 3))
    m = np.array([[1, 1, 0], [0, 1, 1]], dtype=np.float32)
    got = A.shape_rewards(t([0.5, 0.5]), t(kl), t(m), 0.1, 1.0,
                          missing_eos=t([True, False], "bool"), missing_eos_penalty=-3.0).numpy()
    np.testing.assert_allclose(got, [[0.0, -1.0, 0.0], [0.0, 0.0, 0.5]], **TOL)


# -------------------------------------------------------------------- advantage estimators


def ref_gae(values, rewards, m, gamma, lam):
    """A_t = sum_l (gamma*lam)^l delta_{t+l} over the response span, V after the span = 0."""
    B, T = values.shape
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        s = spans(m[b])
        if s is None:
            continue
        start, end = s
        delta = {}
        for j in range(start, end + 1):
            v_next = values[b, j + 1] if j + 1 <= end else 0.0
            delta[j] = rewards[b, j] + gamma * v_next - values[b, j]
        for j in range(start, end + 1):
            a = 0.0
            for k in range(j, end + 1):
                a += (gamma * lam) ** (k - j) * delta[k]
            adv[b, j] = a
            ret[b, j] = a + values[b, j]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.5)])
@pytest.mark.parametrize("shape", SHAPES)
def test_gae(shape, gamma, lam):
    rng = np.random.default_rng(sum(shape) + int(gamma * 100))
    values = rng.normal(size=shape)
    rewards = rng.normal(0.0, 0.5, size=shape)
    m = make_mask(rng, *shape, allow_empty=True)
    v = t(values)
    v.stop_gradient = False
    adv, ret = A.gae_advantages_and_returns(v, t(rewards), t(m), gamma=gamma, lam=lam)
    assert adv.stop_gradient and ret.stop_gradient
    e_adv, e_ret = ref_gae(values, rewards, m, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), e_adv, **TOL)
    np.testing.assert_allclose(ret.numpy(), e_ret, **TOL)


def test_gae_single_token_by_hand():
    # one action token at column 2: A = r - V, return = r
    values = np.array([[9.0, 9.0, 0.4, 9.0]])
    rewards = np.array([[5.0, 5.0, 1.0, 5.0]])
    m = np.array([[0, 0, 1, 0]])
    adv, ret = A.gae_advantages_and_returns(t(values), t(rewards), t(m))
    np.testing.assert_allclose(adv.numpy(), [[0, 0, 0.6, 0]], **TOL)
    np.testing.assert_allclose(ret.numpy(), [[0, 0, 1.0, 0]], **TOL)


def ref_group(scores, k, estimator, eps):
    out = np.zeros(len(scores))
    for g in range(len(scores) // k):
        grp = [scores[g * k + i] for i in range(k)]
        mean = sum(grp) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (k - 1))
        for i in range(k):
            if estimator == "grpo":
                out[g * k + i] = (grp[i] - mean) / (std + eps)
            else:
                others = [grp[j] for j in range(k) if j != i]
                out[g * k + i] = grp[i] - sum(others) / len(others)
    return out


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("groups,k", [(1, 2), (3, 4), (5, 8)])
def test_group_advantages(groups, k, estimator):
    rng = np.random.default_rng(groups * 10 + k)
    scores = rng.normal(0.0, 2.0, size=groups * k)
    got = A.group_advantages(t(scores), k, estimator).numpy()
    assert got.shape == (groups * k,)
    np.testing.assert_allclose(got, ref_group(scores, k, estimator, 1e-6), **TOL)


def test_group_advantages_default_and_constant_group():
    scores = np.array([1.0, 1.0, 1.0, 0.0, 2.0, 4.0])
    got = A.group_advantages(t(scores), 3).numpy()  # grpo, eps=1e-6
    np.testing.assert_allclose(got, [0.0, 0.0, 0.0, -1.0, 0.0, 1.0], **TOL)
    got = A.group_advantages(t(scores), 3, "rloo").numpy()
    np.testing.assert_allclose(got, [0.0, 0.0, 0.0, -3.0, 0.0, 3.0], **TOL)


def test_group_advantages_errors():
    x = t(np.arange(6.0))
    with pytest.raises(ValueError, match="num_return_sequences >= 2"):
        A.group_advantages(x, 1)
    with pytest.raises(ValueError, match="num_return_sequences >= 2"):
        A.group_advantages(x, 1, "rloo")
    with pytest.raises(ValueError, match="groups of 4"):
        A.group_advantages(x, 4)
    with pytest.raises(ValueError, match=r"'ppo'.*grpo, rloo"):
        A.group_advantages(x, 2, "ppo")


def ref_rtg(rewards, m, gamma):
    B, T = rewards.shape
    out = np.zeros((B, T))
    for b in range(B):
        s = spans(m[b])
        if s is None:
            continue
        for j in range(s[0], s[1] + 1):
            out[b, j] = sum(gamma ** (k - j) * rewards[b, k] for k in range(j, s[1] + 1))
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("shape", SHAPES)
def test_reinforce_plus_plus_returns(shape, gamma):
    rng = np.random.default_rng(sum(shape) + 3)
    rewards = rng.normal(size=shape)
    m = make_mask(rng, *shape, allow_empty=True)
    r = t(rewards)
    r.stop_gradient = False
    got = A.reinforce_plus_plus_returns(r, t(m), gamma=gamma)
    assert got.stop_gradient
    np.testing.assert_allclose(got.numpy(), ref_rtg(rewards, m, gamma), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_broadcast_sequence_advantages(shape):
    rng = np.random.default_rng(sum(shape) + 5)
    adv = rng.normal(size=shape[0])
    m = make_mask(rng, *shape, allow_empty=True)
    got = A.broadcast_sequence_advantages(t(adv), t(m) > 0).numpy()
    expected = np.zeros(shape)
    for b in range(shape[0]):
        for j in range(shape[1]):
            expected[b, j] = adv[b] if m[b, j] else 0.0
    np.testing.assert_allclose(got, expected, **TOL)


# ---------------------------------------------------------------------------------- losses


def ref_actor(lp, old, adv, m, eps_lo, eps_hi, dual, clamp):
    total = count = clipped = kl = ratio_sum = 0.0
    for idx in np.ndindex(lp.shape):
        if not m[idx]:
            continue
        lr = min(max(lp[idx] - old[idx], -clamp), clamp)
        ratio = math.exp(lr)
        a = adv[idx]
        pg1 = -a * ratio
        pg2 = -a * min(max(ratio, 1 - eps_lo), 1 + eps_hi)
        if pg2 > pg1:
            pg = pg2
            clipped += 1
        else:
            pg = pg1
        if dual is not None and a < 0:
            pg = min(pg, -a * dual)
        total += pg
        count += 1
        kl += 0.5 * lr * lr
        ratio_sum += ratio
    return total / count, clipped / count, kl / count, ratio_sum / count


@pytest.mark.parametrize("eps_hi,dual", [(None, None), (0.28, None), (None, 3.0), (0.3, 2.0)])
@pytest.mark.parametrize("shape", SHAPES)
def test_actor_loss(shape, eps_hi, dual):
    rng = np.random.default_rng(sum(shape) + 13)
    old = rng.normal(-2.0, 1.0, size=shape)
    lp = old + rng.normal(0.0, 0.8, size=shape)
    adv = rng.normal(0.0, 1.5, size=shape)
    m = make_mask(rng, *shape)
    loss, stats = A.actor_loss(t(lp), t(old), t(adv), t(m), 0.2, eps_hi, dual)
    e_loss, e_clip, e_kl, e_ratio = ref_actor(lp, old, adv, m, 0.2,
                                              0.2 if eps_hi is None else eps_hi, dual, 20.0)
    np.testing.assert_allclose(float(loss), e_loss, **TOL)
    np.testing.assert_allclose(stats["clip_frac"], e_clip, **TOL)
    np.testing.assert_allclose(stats["approx_kl"], e_kl, **TOL)
    np.testing.assert_allclose(stats["ratio_mean"], e_ratio, **TOL)
    assert all(isinstance(v, float) for v in stats.values())


def test_actor_loss_log_ratio_clamp():
    lp, old = np.array([[0.0, -1.0]]), np.array([[-50.0, -1.0]])
    adv = np.array([[-1.0, 1.0]])
    m = np.ones((1, 2))
    loss, stats = A.actor_loss(t(lp), t(old), t(adv), t(m), log_ratio_clamp=5.0)
    e_loss, _, e_kl, e_ratio = ref_actor(lp, old, adv, m, 0.2, 0.2, None, 5.0)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), e_loss, rtol=1e-5)
    np.testing.assert_allclose(float(loss), (math.exp(5.0) - 1.0) / 2, rtol=1e-5)
    np.testing.assert_allclose(stats["approx_kl"], e_kl, rtol=1e-5)
    np.testing.assert_allclose(stats["ratio_mean"], e_ratio, rtol=1e-5)


def test_actor_loss_dual_clip_by_hand():
    # ratio e^2 with A = -1: pg = e^2, dual clip caps it at 3
    lp, old, adv, m = [[2.0]], [[0.0]], [[-1.0]], [[1.0]]
    loss, _ = A.actor_loss(t(lp), t(old), t(adv), t(m), dual_clip=3.0)
    np.testing.assert_allclose(float(loss), 3.0, **TOL)
    loss, _ = A.actor_loss(t(lp), t(old), t(adv), t(m))
    np.testing.assert_allclose(float(loss), math.exp(2.0), **TOL)
    with pytest.raises(ValueError, match="dual_clip"):
        A.actor_loss(t(lp), t(old), t(adv), t(m), dual_clip=0.5)


def test_actor_loss_clip_frac_zero_at_ratio_one_and_positive_far_away():
    rng = np.random.default_rng(6)
    lp = rng.normal(-2.0, 1.0, size=(4, 10))
    adv = rng.normal(size=(4, 10))
    m = make_mask(rng, 4, 10)
    loss, stats = A.actor_loss(t(lp), t(lp), t(adv), t(m))
    assert stats["clip_frac"] == 0.0
    assert stats["approx_kl"] == 0.0
    np.testing.assert_allclose(stats["ratio_mean"], 1.0, **TOL)
    np.testing.assert_allclose(float(loss), -(adv * m).sum() / m.sum(), **TOL)

    far = lp + rng.choice([-2.0, 2.0], size=lp.shape)
    _, stats = A.actor_loss(t(far), t(lp), t(adv), t(m))
    assert stats["clip_frac"] > 0.3
    assert stats["approx_kl"] == pytest.approx(2.0, rel=1e-5)


def test_actor_loss_gradients():
    rng = np.random.default_rng(7)
    old = rng.normal(-2.0, 1.0, size=(3, 8))
    lp = t(old + rng.normal(0.0, 0.1, size=(3, 8)))
    lp.stop_gradient = False
    adv = t(rng.normal(size=(3, 8)))
    m = make_mask(rng, 3, 8)
    loss, _ = A.actor_loss(lp, t(old), adv, t(m))
    loss.backward()
    g = lp.grad.numpy()
    assert np.isfinite(g).all()
    assert np.abs(g[m > 0]).sum() > 0
    assert (g[m == 0] == 0).all()


def ref_critic(values, old, returns, m, c):
    total = count = clipped = 0.0
    for idx in np.ndindex(values.shape):
        if not m[idx]:
            continue
        vc = old[idx] + min(max(values[idx] - old[idx], -c), c)
        l1 = (values[idx] - returns[idx]) ** 2
        l2 = (vc - returns[idx]) ** 2
        if l2 > l1:
            clipped += 1
        total += max(l1, l2)
        count += 1
    return 0.5 * total / count, clipped / count


@pytest.mark.parametrize("clip", [0.2, 5.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_critic_loss(shape, clip):
    rng = np.random.default_rng(sum(shape) + 17)
    old = rng.normal(size=shape)
    values = old + rng.normal(0.0, 0.5, size=shape)
    returns = rng.normal(size=shape)
    m = make_mask(rng, *shape)
    loss, stats = A.critic_loss(t(values), t(old), t(returns), t(m), clip)
    e_loss, e_frac = ref_critic(values, old, returns, m, clip)
    np.testing.assert_allclose(float(loss), e_loss, **TOL)
    np.testing.assert_allclose(stats["value_clip_frac"], e_frac, **TOL)


def test_critic_loss_default_clip_and_gradients():
    rng = np.random.default_rng(8)
    old = rng.normal(size=(4, 9))
    returns = rng.normal(size=(4, 9))
    values_np = old + rng.choice([-8.0, 0.1], size=old.shape)
    m = make_mask(rng, 4, 9)
    values = t(values_np)
    values.stop_gradient = False
    loss, stats = A.critic_loss(values, t(old), t(returns), t(m))
    e_loss, e_frac = ref_critic(values_np, old, returns, m, 5.0)
    np.testing.assert_allclose(float(loss), e_loss, **TOL)
    np.testing.assert_allclose(stats["value_clip_frac"], e_frac, **TOL)
    loss.backward()
    g = values.grad.numpy()
    assert np.isfinite(g).all()
    assert np.abs(g[m > 0]).sum() > 0
    assert (g[m == 0] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_nll_sum(shape):
    """The answer-token loss SFT and the ptx term share: -sum of the log-probs at valid positions."""
    rng = np.random.default_rng(shape[1])
    log_probs = -rng.exponential(2.0, size=shape).astype(np.float32)
    valid = rng.random(shape) < 0.6
    expected = 0.0
    for b in range(shape[0]):
        for j in range(shape[1]):
            if valid[b, j]:
                expected -= float(log_probs[b, j])
    lp = t(log_probs)
    lp.stop_gradient = False
    loss = A.nll_sum(lp, t(valid, "bool"))
    np.testing.assert_allclose(float(loss), expected, **TOL)
    loss.backward()  # d loss / d log_prob = -1 on valid positions, 0 elsewhere
    np.testing.assert_array_equal(lp.grad.numpy(), -valid.astype(np.float32))


def test_nll_sum_without_valid_positions_is_zero():
    assert float(A.nll_sum(t(-np.ones((2, 3))), t(np.zeros((2, 3), bool), "bool"))) == 0.0


# --------------------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    c = A.FixedKLController(0.05)
    c.update(100.0, 512)
    assert c.value == 0.05
    c2 = A.FixedKLController(1.0)
    c2.set_state_dict(c.state_dict())
    assert c2.value == 0.05


def test_adaptive_kl_controller_sequence():
    c = A.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # kl=12 -> error clipped to +0.2 -> x(1 + 0.2 * 256 / 1e4) = x1.00512
    c.update(12.0, 256)
    assert c.value == pytest.approx(0.100512, rel=1e-12)
    # kl=3 -> error -0.5 clipped to -0.2 -> x0.99488
    c.update(3.0, 256)
    assert c.value == pytest.approx(0.09999737856, rel=1e-10)
    # kl=6.6 -> error +0.1 (unclipped) -> x(1 + 0.1 * 100 / 1e4) = x1.001
    c.update(6.6, 100)
    assert c.value == pytest.approx(0.10009737593856, rel=1e-10)
    # kl on target -> unchanged
    c.update(6.0, 1000)
    assert c.value == pytest.approx(0.10009737593856, rel=1e-10)

    restored = A.AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    restored.set_state_dict(c.state_dict())
    assert restored.value == c.value
    restored.update(5.7, 200)  # error -0.05 -> x0.999
    assert restored.value == pytest.approx(0.10009737593856 * 0.999, rel=1e-10)


def test_masked_whiten_with_given_moments_equals_pooled_statistics():
    """Whitening with moments pooled over several ranks' batches equals whitening their concatenation."""
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(3, 5)).astype("float32") for _ in range(2)]
    masks = [(rng.random((3, 5)) > 0.3).astype("float32") for _ in range(2)]
    flat = np.concatenate([p[m > 0] for p, m in zip(parts, masks)]).astype(np.float64)
    mean, var = flat.mean(), flat.var(ddof=1)
    whole = A.masked_whiten(paddle.to_tensor(np.concatenate(parts)), paddle.to_tensor(np.concatenate(masks)))
    for i, (p, m) in enumerate(zip(parts, masks)):
        got = A.masked_whiten(paddle.to_tensor(p), paddle.to_tensor(m), moments=(mean, var)).numpy()
        np.testing.assert_allclose(got, (p - mean) / np.sqrt(var + 1e-8), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, whole.numpy()[3 * i:3 * (i + 1)], rtol=1e-5, atol=1e-5)
