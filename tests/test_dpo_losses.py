"""The DPO family's losses against naive loops written from the papers' formulas, their gradient
directions on a two-pair example, and the combination the stage builds from its arguments."""

import math

import numpy as np
import paddle
import pytest

from ppo.args import DPOArgs
from ppo.core import preference as pref
from ppo.stages.dpo.objective import PairLogProbs, paired_loss, pair_stats, unpaired_loss


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def naive(name, pc, pr, rc, rr, nc, nr, beta, eps=0.0, gamma=0.5):
    """One pair's loss, written out per the papers (summed log-probs; SimPO/ORPO on per-token means)."""
    h = (pc - rc) - (pr - rr)
    if name == "sigmoid":  # DPO eq. 7, conservative DPO (Mitchell 2023)
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if name == "ipo":  # IPO eq. 17
        return (h - 1 / (2 * beta)) ** 2
    if name == "hinge":  # SLiC-HF calibration
        return max(0.0, 1 - beta * h)
    ac, ar = pc / nc, pr / nr
    if name == "simpo":  # SimPO eq. 6
        return -log_sigmoid(beta * ac - beta * ar - gamma)
    if name == "orpo":  # ORPO eq. 7: odds(p) = p / (1 - p) of the per-token mean probability
        odds = lambda a: math.exp(a) / (1 - math.exp(a))  # noqa: E731
        return -log_sigmoid(math.log(odds(ac)) - math.log(odds(ar)))
    raise ValueError(name)


def random_pairs(seed, B=6):
    rng = np.random.default_rng(seed)
    nc, nr = rng.integers(3, 12, B).astype(np.float32), rng.integers(3, 12, B).astype(np.float32)
    pc = (-rng.uniform(0.3, 3.0, B) * nc).astype(np.float32)
    pr = (-rng.uniform(0.3, 3.0, B) * nr).astype(np.float32)
    rc = pc + rng.normal(0, 2.0, B).astype(np.float32)
    rr = pr + rng.normal(0, 2.0, B).astype(np.float32)
    return pc, pr, rc, rr, nc, nr


def t(x):
    return paddle.to_tensor(np.asarray(x, dtype=np.float32))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_paired_losses_match_the_papers(seed, beta):
    pc, pr, rc, rr, nc, nr = random_pairs(seed)
    got = {
        "sigmoid": pref.sigmoid_loss(t(pc), t(pr), t(rc), t(rr), beta, 0.2),
        "ipo": pref.ipo_loss(t(pc), t(pr), t(rc), t(rr), beta),
        "hinge": pref.hinge_loss(t(pc), t(pr), t(rc), t(rr), beta),
        "simpo": pref.simpo_loss(t(pc / nc), t(pr / nr), beta, 0.3),
        "orpo": pref.orpo_loss(t(pc / nc), t(pr / nr)),
    }
    for name, value in got.items():
        expected = [naive(name, *map(float, row), beta, eps=0.2, gamma=0.3)
                    for row in zip(pc, pr, rc, rr, nc, nr)]
        np.testing.assert_allclose(value.numpy(), expected, rtol=2e-5, atol=2e-6, err_msg=name)


def test_sigmoid_at_the_reference_is_ln2_and_label_smoothing_is_symmetric():
    x = t([-3.0, -7.5])
    np.testing.assert_allclose(pref.sigmoid_loss(x, x * 2, x, x * 2, 0.1).numpy(), [math.log(2)] * 2, rtol=1e-6)
    # eps = 0.5 makes the loss blind to the sign of the margin
    a = pref.sigmoid_loss(t([-1.0]), t([-4.0]), t([-2.0]), t([-2.0]), 0.5, 0.5)
    b = pref.sigmoid_loss(t([-4.0]), t([-1.0]), t([-2.0]), t([-2.0]), 0.5, 0.5)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "simpo", "orpo"])
def test_gradient_raises_chosen_and_lowers_rejected(name):
    """On two pairs the policy mildly prefers the rejected answer: every loss's gradient step moves
    the chosen log-probs up and the rejected ones down."""
    pc, pr = t([-6.0, -9.0]), t([-5.0, -8.0])
    pc.stop_gradient = pr.stop_gradient = False
    rc, rr, n = t([-6.0, -9.0]), t([-6.0, -9.0]), t([4.0, 5.0])
    args = DPOArgs(train_datasets="x", loss_type=name, beta=0.5)
    loss, _ = paired_loss(PairLogProbs(pc, pr, n, n, rc, rr), args)
    loss.backward()
    assert (pc.grad.numpy() < 0).all(), (name, pc.grad.numpy())
    assert (pr.grad.numpy() > 0).all(), (name, pr.grad.numpy())


def test_combined_losses_with_weights_and_sft_term():
    """loss_type 'sigmoid,ipo,orpo' with loss_weights and both ratios: the weighted naive sum."""
    pc, pr, rc, rr, nc, nr = random_pairs(3)
    args = DPOArgs(train_datasets="x", loss_type="sigmoid,ipo,orpo", loss_weights="0.6,0.3,2", beta=0.2,
                   label_smoothing=0.1, orpo_lambda=0.25, pref_loss_ratio=0.8, sft_loss_ratio=0.5)
    loss, stats = paired_loss(PairLogProbs(t(pc), t(pr), t(nc), t(nr), t(rc), t(rr)), args)
    per_pair = []
    for row in zip(pc, pr, rc, rr, nc, nr):
        row = list(map(float, row))
        nll = -row[0] / row[4]
        per_pair.append(0.6 * naive("sigmoid", *row, 0.2, eps=0.1) + 0.3 * naive("ipo", *row, 0.2)
                        + 2 * (nll + 0.25 * naive("orpo", *row, 0.2)))
    expected = 0.8 * np.mean(per_pair) + 0.5 * np.mean(-pc / nc)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # the metrics: DPO's implicit rewards beta * (log pi - log ref)
    chosen, rejected = 0.2 * (pc - rc), 0.2 * (pr - rr)
    np.testing.assert_allclose(stats["rewards/chosen"], chosen.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["rewards/rejected"], rejected.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["rewards/margins"], (chosen - rejected).mean(), rtol=1e-4, atol=1e-6)
    assert stats["rewards/accuracies"] == pytest.approx(float((chosen > rejected).mean()))
    np.testing.assert_allclose(stats["logps/chosen"], pc.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["logps/rejected"], pr.mean(), rtol=1e-6)


def test_reference_free_losses_ignore_the_reference():
    pc, pr, rc, rr, nc, nr = random_pairs(4)
    for name in ("simpo", "orpo"):
        args = DPOArgs(train_datasets="x", loss_type=name, beta=2.0)
        a, _ = paired_loss(PairLogProbs(t(pc), t(pr), t(nc), t(nr), t(rc), t(rr)), args)
        b, _ = paired_loss(PairLogProbs(t(pc), t(pr), t(nc), t(nr), t(rc * 0), t(rr * 3)), args)
        assert float(a) == float(b), name
        assert args.resolved_reference_mode() == "none"


def test_kto_matches_the_paper():
    """KTO eq. 8: w_d (1 - s(beta (r - z0))) desirable, w_u (1 - s(beta (z0 - r))) undesirable, z0 = max(0, KL)."""
    rng = np.random.default_rng(5)
    policy, ref = rng.normal(-20, 4, 8).astype(np.float32), rng.normal(-20, 4, 8).astype(np.float32)
    good = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    for kl in (-0.7, 0.4):
        got = pref.kto_loss(t(policy), t(ref), paddle.to_tensor(good), kl, 0.3, 1.5, 0.75).numpy()
        z0 = max(0.0, kl)
        expected = [1.5 * (1 - sigmoid(0.3 * (p - r - z0))) if g else 0.75 * (1 - sigmoid(0.3 * (z0 - p + r)))
                    for p, r, g in zip(policy, ref, good)]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # the gradient raises desirable completions and lowers undesirable ones
    p = t(policy)
    p.stop_gradient = False
    args = DPOArgs(train_datasets="x", loss_type="kto", beta=0.3)
    loss, stats = unpaired_loss(p, t(ref), t(np.full(8, 5.0)), paddle.to_tensor(good), 0.2, args)
    loss.backward()
    assert (p.grad.numpy()[good] < 0).all() and (p.grad.numpy()[~good] > 0).all()
    assert stats["kl"] == pytest.approx(0.2)


def test_sequence_log_probs_is_a_masked_row_sum():
    lp = np.random.default_rng(6).normal(-2, 1, (3, 7)).astype(np.float32)
    mask = (np.random.default_rng(7).random((3, 7)) < 0.5).astype(np.float32)
    total, count = pref.sequence_log_probs(t(lp), t(mask))
    np.testing.assert_allclose(total.numpy(), [sum(lp[b, j] for j in range(7) if mask[b, j]) for b in range(3)],
                               rtol=1e-6)
    np.testing.assert_allclose(count.numpy(), mask.sum(1))


def test_pair_stats_with_ties_count_no_accuracy():
    x = t([-3.0, -4.0])
    stats = pair_stats(PairLogProbs(x, x, t([1, 1]), t([1, 1]), x, x), 0.1)
    assert stats["rewards/accuracies"] == 0.0 and stats["rewards/margins"] == 0.0


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "simpo", "orpo"])
def test_each_loss_type_through_the_stage_arguments(name):
    """paired_loss with one loss_type and non-default beta, label_smoothing, simpo_gamma and
    orpo_lambda: the naive pair loss (ORPO with its NLL term), averaged over pairs."""
    pc, pr, rc, rr, nc, nr = random_pairs(8)
    args = DPOArgs(train_datasets="x", loss_type=name, beta=0.3, label_smoothing=0.15, simpo_gamma=1.2,
                   orpo_lambda=0.4)
    loss, _ = paired_loss(PairLogProbs(t(pc), t(pr), t(nc), t(nr), t(rc), t(rr)), args)
    rows = [list(map(float, row)) for row in zip(pc, pr, rc, rr, nc, nr)]
    per = [naive(name, *row, 0.3, eps=0.15, gamma=1.2) for row in rows]
    if name == "orpo":
        per = [-row[0] / row[4] + 0.4 * p for row, p in zip(rows, per)]
    np.testing.assert_allclose(float(loss), np.mean(per), rtol=1e-5)


def test_kto_stage_loss_with_class_weights_and_sft_term():
    rng = np.random.default_rng(9)
    policy, ref = rng.normal(-20, 4, 6).astype(np.float32), rng.normal(-20, 4, 6).astype(np.float32)
    tokens = rng.integers(4, 9, 6).astype(np.float32)
    good = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    args = DPOArgs(train_datasets="x", loss_type="kto", beta=0.2, kto_desirable_weight=1.3,
                   kto_undesirable_weight=0.6, pref_loss_ratio=0.9, sft_loss_ratio=0.4)
    loss, _ = unpaired_loss(t(policy), t(ref), t(tokens), paddle.to_tensor(good), 0.5, args)
    per = [1.3 * (1 - sigmoid(0.2 * (p - r - 0.5))) if g else 0.6 * (1 - sigmoid(0.2 * (0.5 - p + r)))
           for p, r, g in zip(policy, ref, good)]
    nll = np.mean([-p / n for p, n, g in zip(policy, tokens, good) if g])
    np.testing.assert_allclose(float(loss), 0.9 * np.mean(per) + 0.4 * nll, rtol=1e-5)
