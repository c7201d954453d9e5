"""Numeric guards of the single-model stages: a non-finite loss skips the update, too many stop."""

import json
import os

import numpy as np
import paddle
import pytest

from ppo.args import RewardArgs
from ppo.stages.guard import TrainingDiverged


def reward_trainer(tiny_dir, out, **kw):
    from rm.reward_trainer import RewardTrainer

    args = dict(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-preference/train",
                output_dir=str(out), max_length=64, max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                learning_rate=1e-3, disable_tqdm=True)
    args.update(kw)
    return RewardTrainer(RewardArgs(**args))


def poison(trainer, bad_steps):
    """Make the loss NaN on the given (1-based) steps."""
    original = trainer.compute_loss
    calls = {"n": 0}

    def compute_loss(batch):
        calls["n"] += 1
        loss, stats = original(batch)
        if calls["n"] in bad_steps:
            loss = loss * float("nan")
        return loss, stats

    trainer.compute_loss = compute_loss


def test_nan_loss_is_skipped_and_counted(tiny_dir, tmp_path):
    trainer = reward_trainer(tiny_dir, tmp_path / "skip", save_steps=3)
    poison(trainer, {2})
    weights = {}
    original_step = trainer.after_step

    def after_step(stats):
        original_step(stats)
        weights[len(weights) + 1] = {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()}

    trainer.after_step = after_step
    trainer.train()
    logs = {r["step"]: r for r in map(json.loads, open(tmp_path / "skip" / "metrics.jsonl")) if r["split"] == "train"}
    assert [logs[s]["skipped_updates"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert not np.isfinite(logs[2]["loss"]) and np.isfinite(logs[3]["loss"])
    assert len(weights) == 3  # three applied updates
    for v in trainer.model.state_dict().values():
        assert np.all(np.isfinite(v.numpy()))
    assert os.path.isfile(tmp_path / "skip" / "checkpoint-3" / "manifest.json")


def test_too_many_bad_steps_stop_with_the_step_and_quantity(tiny_dir, tmp_path):
    trainer = reward_trainer(tiny_dir, tmp_path / "stop", max_nonfinite_steps=1)
    poison(trainer, {2, 3})
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at reward model step 3 \(2 bad update"):
        trainer.train()
    assert not os.path.exists(tmp_path / "stop" / "model.safetensors")


def test_no_checkpoint_with_non_finite_weights(tiny_dir, tmp_path):
    trainer = reward_trainer(tiny_dir, tmp_path / "nanw")
    p = trainer.model.score_head.weight
    p.set_value(paddle.full(p.shape, float("nan")))
    with pytest.raises(TrainingDiverged, match="refusing to save a checkpoint"):
        trainer.save_checkpoint(1)
    assert not [d for d in os.listdir(tmp_path / "nanw") if "checkpoint" in d]


def test_no_final_model_with_non_finite_weights(tiny_dir, tmp_path):
    trainer = reward_trainer(tiny_dir, tmp_path / "nanf")
    p = trainer.model.score_head.weight
    p.set_value(paddle.full(p.shape, float("inf")))
    with pytest.raises(TrainingDiverged, match="refusing to save the final model: model parameter score_head"):
        trainer.save(str(tmp_path / "nanf" / "final"), 1)
    assert not os.path.exists(tmp_path / "nanf" / "final")
    assert not [d for d in os.listdir(tmp_path / "nanf") if d.startswith(".tmp")]
