"""Score model, normaliser and reward losses against numpy / naive references."""

import json
import os

import numpy as np
import paddle
import pytest

from ppo.core.errors import UserError
from ppo.models import Normalizer, last_token_index, load_score_model, position_ids_from_mask
from rm.losses import divergence_span, score_regularization, sequence_wise_loss, token_wise_loss


def naive_last_index(mask):
    out = []
    for row in mask:
        idx = [t for t, m in enumerate(row) if m]
        out.append(idx[-1] if idx else 0)
    return np.array(out)


def test_last_token_index_left_and_right_padding():
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    got = last_token_index(paddle.to_tensor(mask)).numpy()
    np.testing.assert_array_equal(got, naive_last_index(mask))
    pos = position_ids_from_mask(paddle.to_tensor(mask)).numpy()
    np.testing.assert_array_equal(pos[1], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 2, 2])


@pytest.fixture(scope="module")
def score_model(tiny_dir):
    model = load_score_model(str(tiny_dir / "base"))
    model.eval()
    return model


def test_end_scores_same_for_left_right_and_no_padding(score_model):
    seq = [1, 40, 41, 42, 43, 44]
    pad = 3
    right = paddle.to_tensor([seq + [pad, pad]])
    right_mask = paddle.to_tensor([[1] * 6 + [0, 0]])
    left = paddle.to_tensor([[pad, pad] + seq])
    left_mask = paddle.to_tensor([[0, 0] + [1] * 6])
    plain = score_model(paddle.to_tensor([seq]), paddle.to_tensor([[1] * 6]))
    r = score_model(right, right_mask)
    l = score_model(left, left_mask)
    ref = float(plain.end_scores)
    assert abs(float(r.end_scores) - ref) < 1e-5
    assert abs(float(l.end_scores) - ref) < 1e-5
    # end score is the per-token score at the last real token
    assert abs(float(r.scores[0, 5, 0]) - ref) < 1e-6
    assert abs(float(l.scores[0, 7, 0]) - ref) < 1e-6
    assert r.scores.shape == [1, 8, 1] and r.end_scores.shape == [1, 1]


def test_save_load_round_trip_exact(score_model, tmp_path):
    score_model.normalizer = Normalizer("RunningMeanStd")
    score_model.normalizer.update([0.5, 1.5, -2.0])
    score_model.config.score_type = "critic"
    score_model.save_pretrained(str(tmp_path / "sm"))
    loaded = load_score_model(str(tmp_path / "sm"), score_type="critic")
    a, b = score_model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    assert loaded.normalizer.to_config() == score_model.normalizer.to_config()
    assert loaded.normalizer.count == 3
    assert loaded.config.score_type == "critic" and loaded.config.score_dim == 1
    cfg = json.load(open(tmp_path / "sm" / "config.json"))
    assert cfg["score_dim"] == 1 and abs(cfg["norm_mean"] - 0.0) < 1e-12


def test_mismatched_head_is_a_clear_error(score_model, tmp_path):
    path = str(tmp_path / "sm2")
    score_model.save_pretrained(path)
    with pytest.raises(UserError, match="score head of dim 1"):
        load_score_model(path, score_dim=2)
    # weights whose head shape disagrees with the config
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["score_dim"] = 3
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(UserError, match="score head"):
        load_score_model(path, score_dim=3)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        load_score_model(str(tmp_path / "nope"))


@pytest.mark.parametrize("kind", ["RunningMeanStd", "ExponentialMovingAverage"])
def test_normalizer_against_numpy(kind):
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (5, 17, 1, 40)]
    norm = Normalizer(kind, momentum=0.8)
    for b in batches:
        norm.update(b)
    if kind == "RunningMeanStd":
        allv = np.concatenate(batches)
        assert abs(norm.mean - allv.mean()) < 1e-10 and abs(norm.var - allv.var()) < 1e-10
    else:
        mean, var = batches[0].mean(), batches[0].var()
        for b in batches[1:]:
            mean, var = 0.8 * mean + 0.2 * b.mean(), 0.8 * var + 0.2 * b.var()
        assert abs(norm.mean - mean) < 1e-10 and abs(norm.var - var) < 1e-10
    x = np.array([1.0, 2.0])
    np.testing.assert_allclose(norm.normalize(x), (x - norm.mean) / np.sqrt(norm.var + 1e-6))
    assert norm.count == 63


def test_sequence_wise_loss_against_numpy():
    rng = np.random.default_rng(1)
    b, w = rng.normal(size=8).astype("float32"), rng.normal(size=8).astype("float32")
    got = float(sequence_wise_loss(paddle.to_tensor(b), paddle.to_tensor(w), margin=0.3))
    ref = np.mean([np.log1p(np.exp(-(bi - wi - 0.3))) for bi, wi in zip(b, w)])
    assert abs(got - ref) < 1e-5
    reg = float(score_regularization(paddle.to_tensor(b), paddle.to_tensor(w)))
    assert abs(reg - (np.mean(b**2) + np.mean(w**2)) / 2) < 1e-5


def test_token_wise_loss_against_naive_loop():
    rng = np.random.default_rng(2)
    better = np.array([[1, 5, 6, 7, 8, 3], [1, 5, 9, 9, 3, 3], [1, 4, 4, 3, 3, 3]])
    worse = np.array([[1, 5, 6, 2, 3, 3], [1, 5, 9, 9, 9, 9], [1, 7, 3, 3, 3, 3]])
    bmask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    wmask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    sb, sw = rng.normal(size=(3, 6)).astype("float32"), rng.normal(size=(3, 6)).astype("float32")
    span = divergence_span(*(paddle.to_tensor(x) for x in (better, worse, bmask, wmask)))
    got = float(token_wise_loss(paddle.to_tensor(sb), paddle.to_tensor(sw), span))
    losses = []
    for i in range(3):
        first = next(t for t in range(6) if better[i, t] != worse[i, t] or bmask[i, t] != wmask[i, t])
        end = max(max(t for t in range(6) if bmask[i, t]), max(t for t in range(6) if wmask[i, t]))
        terms = [np.log1p(np.exp(-(sb[i, t] - sw[i, t]))) for t in range(first, end + 1)]
        losses.append(np.mean(terms))
    assert abs(got - np.mean(losses)) < 1e-5
