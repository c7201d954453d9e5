"""SFT's loss: the answer-token NLL (the same function as PPO's ptx term) against numpy, and one
token-mean per optimizer step, whatever the micro-batching."""

import json
import os

import numpy as np
import paddle
import pytest

from ppo.core import algorithms as algo
from ppo.args import SFTArgs
from ppo.data import SupervisedDataset, answer_mask
from ppo.models import load_causal_lm, load_tokenizer
from ppo.rollout.collect import forward_log_probs
from trained_weights import weights
from ppo.stages.sft.trainer import SFTTrainer, answer_token_loss, lm_logits


def log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


@pytest.mark.parametrize("shape", [(1, 2, 5), (3, 7, 11), (4, 9, 16)])
def test_answer_token_loss_matches_numpy(shape):
    """Mean over labelled positions t+1 of -log softmax(logits[t])[labels[t+1]], with its count."""
    B, T, V = shape
    rng = np.random.default_rng(V)
    logits = rng.normal(0.0, 2.0, size=shape).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    labels[rng.random((B, T)) < 0.4] = -100
    labels[0, 0], labels[0, -1] = -100, 1  # the first label is never a target; at least one target
    total, count = 0.0, 0
    for b in range(B):
        for j in range(T - 1):
            if labels[b, j + 1] != -100:
                total -= log_softmax(logits[b, j])[labels[b, j + 1]]
                count += 1
    loss, n = answer_token_loss(paddle.to_tensor(logits), paddle.to_tensor(labels))
    assert n == count
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def test_answer_token_loss_without_answer_tokens_is_zero():
    loss, n = answer_token_loss(paddle.ones([2, 4, 5]), paddle.full([2, 4], -100, dtype="int64"))
    assert n == 0 and float(loss) == 0.0


def test_ptx_path_is_the_sft_loss_on_a_real_model(tiny_dir):
    """PPO's ptx term (forward_log_probs over the rows, nll_sum over answer_mask) and SFT's loss
    are one answer-token NLL: both equal a numpy reference from the model's logits."""
    path = str(tiny_dir / "base")
    model = load_causal_lm(path)
    model.eval()
    data = SupervisedDataset("tiny-sft", load_tokenizer(path), 48, seed=3)
    batch = data.get_collator()([data[i] for i in range(4)])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with paddle.no_grad():
        logits = lm_logits(model, ids, mask).numpy()
        ptx_lp, _ = forward_log_probs(model, ids, mask)
        ptx = float(algo.nll_sum(ptx_lp, answer_mask(labels)))
        sft, n = answer_token_loss(paddle.to_tensor(logits), labels)
    ids_np, labels_np = ids.numpy(), labels.numpy()
    expected, count = 0.0, 0
    for b in range(ids_np.shape[0]):
        for j in range(ids_np.shape[1] - 1):
            if labels_np[b, j + 1] != -100:
                assert labels_np[b, j + 1] == ids_np[b, j + 1]  # the answer tokens are the sequence's own
                expected -= log_softmax(logits[b, j])[ids_np[b, j + 1]]
                count += 1
    assert n == count > 0
    np.testing.assert_allclose(ptx, expected, rtol=1e-5)
    np.testing.assert_allclose(float(sft) * n, expected, rtol=1e-5)


def train_one_step(tiny_dir, out, batch, accumulation):
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
    start = weights(tiny_dir / "base")
    for k in weights_a:
        np.testing.assert_allclose(weights_b[k], weights_a[k], rtol=0, atol=1e-5, err_msg=k)
    assert max(float(np.abs(weights_a[k] - start[k]).max()) for k in weights_a) > 5e-4  # it trained


@pytest.mark.parametrize("before", ["paddle", "onednn"])
def test_a_run_leaves_the_matmul_path_it_found(tiny_dir, tmp_path, before):
    """A run in-process with its own cpu_gemm choice puts the process's matmul path back when it
    ends: whatever the process runs after training keeps the path it had."""
    from ppo.models import cpu_gemm

    cpu_gemm.activate(before) if before == "onednn" else cpu_gemm.deactivate()
    found = cpu_gemm.snapshot()
    run_mode = "paddle" if before == "onednn" else "onednn"
    args = SFTArgs(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-sft", output_dir=str(tmp_path / "o"),
                   max_length=48, per_device_train_batch_size=2, max_steps=1, disable_tqdm=True, cpu_gemm=run_mode)
    trainer = SFTTrainer(args)
    assert cpu_gemm.STATE.active == (run_mode == "onednn")
    trainer.train()
    assert cpu_gemm.snapshot() == found


def test_bf16_ends_with_the_precision_that_chose_it(monkeypatch):
    """bf16 matmuls (a CPU with bf16 units; claimed here, no product runs) last until the run's
    Precision closes; the fp32 oneDNN path it found comes back."""
    from ppo.models import cpu_gemm
    from ppo.stages.optim import Precision

    cpu_gemm.activate("onednn")
    found = cpu_gemm.snapshot()
    monkeypatch.setattr(cpu_gemm, "cpu_has_bf16", lambda: True)
    precision = Precision(bf16=True, fp16=False, on_gpu=False, cpu_gemm_mode="auto")
    assert cpu_gemm.STATE.active and cpu_gemm.STATE.bf16
    precision.close()
    assert cpu_gemm.snapshot() == found and not cpu_gemm.STATE.bf16
