"""SFT's loss is one token-mean per optimizer step, whatever the micro-batching."""

import json
import os

import numpy as np
import paddle

from ppo.args import SFTArgs


def train_one_step(tiny_dir, out, batch, accumulation):
    from ppo.sft_trainer import SFTTrainer

    args = SFTArgs(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-sft", output_dir=str(out),
                   max_length=48, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                   max_steps=1, learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=0.0,
                   logging_steps=1, disable_tqdm=True, seed=5)
    trainer = SFTTrainer(args)
    rows = [i for m in trainer.sampler.micro_batches(0) for i in m]
    answers = [int((np.asarray(trainer.train_data[i]["labels"]) != -100).sum()) for i in rows]
    trainer.train()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    return rows, answers, train[0], {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()}


def test_batch_4x1_equals_batch_1x4(tiny_dir, tmp_path):
    rows_a, answers, a, weights_a = train_one_step(tiny_dir, tmp_path / "b4a1", 4, 1)
    rows_b, _, b, weights_b = train_one_step(tiny_dir, tmp_path / "b1a4", 1, 4)
    assert rows_a == rows_b and len(set(answers)) > 1  # the same rows, with answers of different lengths
    assert abs(a["loss"] - b["loss"]) < 1e-6 * a["loss"]
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * a["grad_norm"]
    start = paddle.load(str(tiny_dir / "base" / "model_state.pdparams"))
    for k in weights_a:
        np.testing.assert_allclose(weights_b[k], weights_a[k], rtol=0, atol=1e-5, err_msg=k)
    assert max(float(np.abs(weights_a[k] - start[k].numpy()).max()) for k in weights_a) > 5e-4  # it trained
