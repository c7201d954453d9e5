"""The DPO stage on the tiny model: its log-probs against a per-sequence numpy reference, the data
layouts, the reference modes (a frozen copy, LoRA adapters off, a precomputed table, none), the
first step at ln 2, micro-batching, and that training moves the preference metrics."""

import json
import math
import os
import re
import shutil

import numpy as np
import paddle
import pytest
from trained_weights import assert_trained_weights_match

from ppo.args import DPOArgs, parse_args
from ppo.core.errors import UserError
from ppo.data import RawDataset
from ppo.data.preference import PairDataset, answer_masks
from ppo.models import load_causal_lm, load_tokenizer
from ppo.stages.dpo import reference as ref
from ppo.stages.dpo.trainer import DPOTrainer

LR = 1e-3


def log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def train(tiny_dir, out, *argv, **overrides):
    """A DPO run in this process on the tiny pairs; returns the trainer after ``train()``."""
    config = {"model_name_or_path": str(tiny_dir / "base"), "train_datasets": "tiny-preference/train:0.05",
              "eval_datasets": "tiny-preference/test:0.2", "output_dir": str(out), "max_length": 64,
              "max_steps": 2, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
              "learning_rate": LR, "lr_scheduler_type": "constant", "logging_steps": 1, "disable_tqdm": True,
              **overrides}
    args = parse_args(DPOArgs, [f"--{k}={v}" for k, v in config.items()] + list(argv))
    trainer = DPOTrainer(args)
    trainer.train()
    return trainer


def metrics(out, split):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


from trained_weights import weights  # noqa: E402


# ---------------------------------------------------------------------------------------------
# log-probs and data


def test_answer_masks_match_a_loop():
    lengths, prompts, T = [5, 9, 7], [2, 4, 7], 10
    expected = np.zeros((3, T - 1), dtype=np.float32)
    for b in range(3):
        for t in range(T - 1):  # position t scores token t + 1: an answer token when prompt <= t + 1 < length
            expected[b, t] = prompts[b] <= t + 1 < lengths[b]
    np.testing.assert_array_equal(answer_masks(lengths, prompts, T), expected)


def base_model_and_pairs(tiny_dir, n: int):
    """The tiny base model (eval mode), a tokenized tiny preference set and its first ``n`` pairs."""
    path = str(tiny_dir / "base")
    model = load_causal_lm(path)
    model.eval()
    data = PairDataset("tiny-preference/train:0.01", load_tokenizer(path), 64, seed=1)
    return model, data, [data[i] for i in range(n)]


def test_pair_log_probs_equal_a_per_sequence_numpy_reference(tiny_dir):
    """Both answers of every pair in one padded forward = each unpadded sequence on its own, the
    answer's log-probs summed in numpy from the logits."""
    model, data, items = base_model_and_pairs(tiny_dir, 4)
    with paddle.no_grad():
        c, r, nc, nr = ref.pair_log_probs(model, data.get_collator()(items))
        for b, item in enumerate(items):
            for side, total, count in (("better", c, nc), ("worse", r, nr)):
                ids = item[f"{side}_input_ids"]
                logits = model(paddle.to_tensor([ids]), return_dict=True).logits.numpy()[0]
                answer = range(item["prompt_length"], len(ids))
                expected = sum(log_softmax(logits[t - 1])[ids[t]] for t in answer)
                assert float(count[b]) == len(answer)
                np.testing.assert_allclose(float(total[b]), expected, rtol=2e-5)


def test_kto_batches_pair_each_prompt_with_the_next_completion():
    from ppo.data.preference import collate_unpaired

    items = [{"prompt_ids": [1, 2], "answer_ids": [7, 8, 9], "desirable": True},
             {"prompt_ids": [3], "answer_ids": [5], "desirable": False},
             {"prompt_ids": [4, 4, 4], "answer_ids": [6, 6], "desirable": True}]
    batch = collate_unpaired(items, pad_token_id=0, max_length=5)
    rows = [[int(x) for x, m in zip(ids, mask) if m] for ids, mask in
            zip(batch["kl_input_ids"].numpy(), batch["kl_attention_mask"].numpy())]
    assert rows == [[1, 2, 5], [3, 6, 6], [4, 4, 4, 7, 8]]  # the last cut at max_length
    assert batch["desirable"].numpy().tolist() == [1, 0, 1]
    np.testing.assert_array_equal(batch["kl_answer_mask"].numpy()[2], [0, 0, 1, 1])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_preference_layouts(tmp_path):
    """PaddleNLP's src/tgt/response/sort (multi-turn, sort picks the chosen answer), prompt/chosen/
    rejected as text and as chat messages, and KTO's prompt/completion/label."""
    file = write_jsonl(tmp_path / "pn.jsonl", [
        {"src": ["hi", "tell me a fact"], "tgt": ["hello"], "response": ["bad one", "good one"], "sort": [0, 3]},
        {"src": "only turn", "tgt": [], "response": ["first", "second"], "sort": [2, 1]}])
    a, b = RawDataset.load("paddlenlp-dpo", file)
    assert a["input"] == ["hi", "hello", "tell me a fact"] and a["answer"] == "good one" \
        and a["other_answer"] == "bad one" and a["better"] is True
    assert b["input"] == "only turn" and b["answer"] == "first" and b["other_answer"] == "second"
    file = write_jsonl(tmp_path / "pcr.jsonl", [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
         "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}])
    a, b = RawDataset.load("prompt-chosen-rejected", file)
    assert (a["input"], a["answer"], a["other_answer"]) == ("p1", "c1", "r1")
    assert b["input"] == ["be brief\nq", "a", "q2"] and (b["answer"], b["other_answer"]) == ("yes", "no")
    file = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True},
                                                {"prompt": "p", "completion": "d", "label": False}])
    a, b = RawDataset.load("prompt-completion-label", file)
    assert (a["desirable"], b["desirable"]) == (True, False) and a["answer"] == "c"


@pytest.mark.parametrize("layout,record,needle", [
    ("paddlenlp-dpo", {"src": "q", "tgt": [], "response": ["same", "same"], "sort": [1, 0]}, "identical chosen"),
    ("paddlenlp-dpo", {"src": "q", "tgt": [], "response": ["a", ""], "sort": [1, 0]}, "empty rejected answer"),
    ("paddlenlp-dpo", {"src": "q", "tgt": [], "response": ["a", "b"]}, "missing field(s) 'sort'"),
    ("paddlenlp-dpo", {"src": "q", "tgt": [], "response": ["a", "b"], "sort": [1, 1]}, "two different"),
    ("paddlenlp-dpo", {"src": "q", "tgt": [], "response": ["a", "b"], "sort": [float("nan"), 1]}, "two different"),
    ("paddlenlp-dpo", {"src": ["q", "q2"], "tgt": [], "response": ["a", "b"], "sort": [1, 0]}, "expected 1"),
    ("paddlenlp-dpo", {"src": "q", "tgt": [], "response": "a", "sort": [1, 0]}, "two answer strings"),
    ("prompt-chosen-rejected", {"prompt": "q", "chosen": " ", "rejected": "b"}, "empty chosen answer"),
    ("prompt-chosen-rejected", {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     "alternate user and assistant"),
    ("prompt-chosen-rejected", {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "one assistant message"),
    ("prompt-completion-label", {"prompt": "q", "completion": "a", "label": "yes"}, "expected true"),
])
def test_damaged_layout_records_are_one_line(tmp_path, layout, record, needle):
    file = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(UserError) as e:
        RawDataset.load(layout, file)
    assert needle in str(e.value) and "record 0" in str(e.value) and "\n" not in str(e.value)


def test_layouts_need_a_path():
    with pytest.raises(UserError, match="reads a local file: give its path"):
        RawDataset.load("paddlenlp-dpo")


# ---------------------------------------------------------------------------------------------
# training


def test_first_step_is_ln2_and_training_moves_the_preference_metrics(tiny_dir, tmp_path):
    out = tmp_path / "dpo"
    train(tiny_dir, out, max_steps=12, eval_steps=12, learning_rate=2e-3)
    rows = metrics(out, "train")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is its reference
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    before, after = metrics(out, "eval")[0], metrics(out, "eval")[-1]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["rewards/accuracies"] == 0.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert key in after and key in rows[-1]
    # observed: eval accuracy 0.7-0.8 and margin about 0.1 after 12 steps from the random base
    assert after["rewards/accuracies"] > 0.6 and after["rewards/margins"] > 0.03
    assert after["loss"] < math.log(2) - 0.01
    assert after["rewards/chosen"] > after["rewards/rejected"]
    assert os.path.isfile(out / "model.safetensors")


def test_micro_batches_and_accumulation_take_the_same_step(tiny_dir, tmp_path):
    """Batch 8 x accumulation 1 and batch 1 x accumulation 8: one pair mean per step, the same weights."""
    a = train(tiny_dir, tmp_path / "a", per_device_train_batch_size=8, gradient_accumulation_steps=1,
              loss_type="sigmoid,orpo", sft_loss_ratio=0.5, eval_datasets="", evaluation_strategy="no")
    b = train(tiny_dir, tmp_path / "b", per_device_train_batch_size=1, gradient_accumulation_steps=8,
              loss_type="sigmoid,orpo", sft_loss_ratio=0.5, eval_datasets="", evaluation_strategy="no")
    assert a.sampler.micro_batches(0) != b.sampler.micro_batches(0)
    assert_trained_weights_match(weights(tmp_path / "a"), weights(tmp_path / "b"), LR, 2)


def test_precomputed_reference_equals_the_online_one_and_is_reused(tiny_dir, tmp_path):
    online = train(tiny_dir, tmp_path / "online", reference_mode="model")
    out = tmp_path / "pre"
    pre = train(tiny_dir, out, reference_mode="precompute", save_steps=1)
    assert pre.reference.model is None and pre.reference.mode == "precompute"
    # the table against the frozen reference's own log-probs, pair by pair
    for split, data in (("train", pre.train_data), ("eval", pre.eval_data)):
        batch = pre.collate(data, list(range(len(data))))
        c, r = online.reference.pairs(batch, split, online.precision)
        np.testing.assert_allclose(pre.reference.table[f"{split}_chosen"], c.numpy(), rtol=1e-5)
        np.testing.assert_allclose(pre.reference.table[f"{split}_rejected"], r.numpy(), rtol=1e-5)
    assert_trained_weights_match(weights(tmp_path / "online"), weights(out), LR, 2)
    for split in ("train", "eval"):
        for key in ("loss", "rewards/chosen", "rewards/margins"):
            np.testing.assert_allclose([m[key] for m in metrics(out, split)],
                                       [m[key] for m in metrics(tmp_path / "online", split)], rtol=1e-4, atol=1e-6)
    # resume: the stored table is read back (not recomputed)
    stored = out / ref.TABLE_DIR / ref.FINGERPRINT
    before = stored.read_bytes(), stored.stat().st_mtime_ns
    again = train(tiny_dir, out, reference_mode="precompute", save_steps=1,
                  resume_from_checkpoint=str(out / "checkpoint-1"))
    assert (stored.read_bytes(), stored.stat().st_mtime_ns) == before
    np.testing.assert_array_equal(again.reference.table["train_chosen"], pre.reference.table["train_chosen"])
    # other data, another reference or a damaged table: refused with one line
    with pytest.raises(UserError, match="computed for another data than this run's"):
        train(tiny_dir, out, reference_mode="precompute", save_steps=1, eval_datasets="tiny-preference/test:0.3",
              resume_from_checkpoint=str(out / "checkpoint-1"))
    with pytest.raises(UserError, match="computed for another reference than this run's"):
        train(tiny_dir, out, reference_mode="precompute", save_steps=1, ref_model_name_or_path=str(out),
              resume_from_checkpoint=str(out / "checkpoint-1"))
    table = out / ref.TABLE_DIR / ref.TABLE
    table.write_bytes(table.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError, match="is missing or damaged"):
        train(tiny_dir, out, reference_mode="precompute", save_steps=1,
              resume_from_checkpoint=str(out / "checkpoint-1"))


def test_offloaded_reference_gives_the_same_run(tiny_dir, tmp_path):
    """offload_reference: the frozen copy's weights leave memory between forwards (files on CPU) and
    come back for each; the run equals the one that keeps them."""
    kept = train(tiny_dir, tmp_path / "kept", reference_mode="model")
    off = train(tiny_dir, tmp_path / "off", reference_mode="model", offload_reference=True)
    assert off.reference.store is not None and kept.reference.store is None
    assert all(p._is_initialized() is False for p in off.reference.model.parameters())  # out between forwards
    a, b = weights(tmp_path / "kept"), weights(tmp_path / "off")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_lora_reference_is_the_policy_with_adapters_off(tiny_dir, tmp_path):
    out = tmp_path / "lora"
    trainer = train(tiny_dir, out, lora=True, lora_rank=4, learning_rate=5e-3)
    assert trainer.reference.mode == "lora" and trainer.reference.model.parameters() == []
    assert metrics(out, "train")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0 at the start
    # after training the adapters move the policy, and the reference still scores the base model
    base = load_causal_lm(str(tiny_dir / "base"))
    base.eval()
    batch = trainer.collate(trainer.eval_data, list(range(4)))
    with paddle.no_grad():
        c, r = trainer.reference.pairs(batch, "eval", trainer.precision)
        bc, br, _, _ = ref.pair_log_probs(base, batch)
        pc, _, _, _ = ref.pair_log_probs(trainer.model, batch)
    np.testing.assert_allclose(c.numpy(), bc.numpy(), rtol=1e-5)
    np.testing.assert_allclose(r.numpy(), br.numpy(), rtol=1e-5)
    assert np.abs(pc.numpy() - bc.numpy()).max() > 1e-3


def test_reference_free_losses_load_no_reference(tiny_dir, tmp_path):
    trainer = train(tiny_dir, tmp_path / "simpo", loss_type="simpo", beta=2.0, max_steps=1)
    assert trainer.reference.mode == "none" and trainer.reference.model is None
    row = metrics(tmp_path / "simpo", "train")[0]
    # SimPO's reward is beta times the summed log-prob (the reference is 0)
    assert row["rewards/chosen"] == pytest.approx(2.0 * row["logps/chosen"], rel=1e-5)


def test_kto_on_unpaired_completions(tiny_dir, tmp_path):
    """KTO on the tiny pairs split into labelled completions: it runs with its KL estimate, and
    desirable completions gain on undesirable ones."""
    records = []
    for sample in RawDataset.load("tiny-preference/train"):
        good, bad = (sample["answer"], sample["other_answer"]) if sample["better"] else \
            (sample["other_answer"], sample["answer"])
        records += [{"prompt": sample["input"], "completion": good, "label": True},
                    {"prompt": sample["input"], "completion": bad, "label": False}]
    file = write_jsonl(tmp_path / "kto.jsonl", records[:480])
    out = tmp_path / "kto"
    train(tiny_dir, out, loss_type="kto", train_datasets=f"prompt-completion-label:1:{file}",
          eval_datasets=f"prompt-completion-label:0.5:{file}", max_steps=20, eval_steps=20, beta=0.5)
    rows, evals = metrics(out, "train"), metrics(out, "eval")
    assert all(math.isfinite(r["kl"]) for r in rows) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert max(abs(r["kl"]) for r in rows[1:]) > 0.1  # the estimate follows the policy away from the reference
    gap = [e["rewards/desirable"] - e["rewards/undesirable"] for e in evals]
    # observed: 0 before training, about 0.7 after 20 steps (both rise: the random base learns the format)
    assert gap[0] == pytest.approx(0.0, abs=1e-6) and gap[-1] > 0.2
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.03


# ---------------------------------------------------------------------------------------------
# online DPO


def test_best_and_worst_pairs_skip_ties():
    from ppo.stages.dpo.online import best_and_worst

    prompts = ["a", ["q", "r", "s"], "c"]
    responses = ["a1", "a2", "a3", "b1", "b2", "b3", "same", "same", "same"]
    scores = np.array([0.5, 2.0, -1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 1.0])
    pairs, skipped = best_and_worst(prompts, responses, scores, 3)
    assert skipped == 2  # b: all scores equal; c: best and worst read the same
    assert pairs == [{"prompt": "a", "chosen": "a2", "rejected": "a3"}]
    pairs, _ = best_and_worst(prompts[1:2], ["x", "y", "z"], np.array([0.0, 1.0, 2.0]), 3)
    assert pairs[0]["prompt"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"},
                                  {"role": "user", "content": "s"}] and pairs[0]["chosen"] == "z"


def online(tiny_dir, out, *argv, **overrides):
    from dpo.run_dpo import main

    config = {"model_name_or_path": str(tiny_dir / "base"), "train_datasets": "tiny-preference/train:0.05",
              "eval_datasets": "tiny-preference/test:0.2", "output_dir": str(out), "max_length": 64,
              "max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": LR, "disable_tqdm": True,
              "online_rounds": 2, "online_prompts": "tiny-prompts/train", "online_prompts_per_round": 16,
              "online_samples": 4, "online_reward_model_name_or_path": str(tiny_dir / "score"),
              "online_reward_functions": "tiny_guard", "extra_modules": "ppo.tiny.task",
              "max_new_tokens": 12, "eval_steps": 0, **overrides}
    main([f"--{k}={v}" for k, v in config.items()] + list(argv))


def test_online_rounds_rank_train_publish_and_resume(tiny_dir, tmp_path):
    """Two rounds on the policy's own samples ranked by a reward model + tiny_guard: each round's
    pairs are its best vs worst responses, each round trains from the previous round's model, the
    last is published in output_dir, a second run is refused and a resumed one skips finished
    rounds (best_and_worst's ranking is checked above)."""
    from ppo.stages.dpo.online import STATE

    out = tmp_path / "online"
    online(tiny_dir, out)
    state = json.load(open(out / STATE))
    assert [r["round"] for r in state["rounds"]] == [0, 1]
    for r in (0, 1):
        pairs = [json.loads(line) for line in open(out / f"round-{r}" / "pairs.jsonl")]
        assert 8 <= len(pairs) == state["rounds"][r]["pairs"] <= 16
        assert all(p["chosen"] != p["rejected"] and isinstance(p["prompt"], str) for p in pairs)
        stats = state["rounds"][r]
        assert stats["best_mean"] > stats["score_mean"] > stats["worst_mean"]
        assert "score/reward_model" in stats and "score/tiny_guard" in stats
    round1 = json.load(open(out / "round-1" / "training_state.json"))
    assert round1["args"]["model_name_or_path"] == str(out / "round-0")  # round 1 starts from round 0
    assert round1["args"]["ref_model_name_or_path"] == str(tiny_dir / "base")  # against the fixed reference
    np.testing.assert_array_equal(weights(out)["llama.embed_tokens.weight"],
                                  weights(out / "round-1")["llama.embed_tokens.weight"])
    with pytest.raises(UserError, match="already holds an online DPO run"):
        online(tiny_dir, out)
    before = (out / STATE).read_bytes()
    online(tiny_dir, out, resume_from_checkpoint="auto")  # every round finished: nothing to do
    assert (out / STATE).read_bytes() == before
    # a damaged state file or round statistics file of a copy: one line naming it, nothing written
    for rel, damaged in ((STATE, b'{"rounds": [{"round": 0'), (STATE, b"\xff\xfe[]"), (STATE, b"[1, 2]"),
                         ("round-1/sampling.json", b""), ("round-1/sampling.json", b'{"pairs": 8,')):
        copy = tmp_path / "damaged"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(out, copy)
        if rel != STATE:  # round 1 unfinished, so its sampled pairs and their statistics are read again
            (copy / STATE).write_text(json.dumps({**state, "rounds": state["rounds"][:1]}))
        (copy / rel).write_bytes(damaged)
        listing = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
        with pytest.raises(UserError, match=re.escape(f"'{copy / rel}'")):
            online(tiny_dir, copy, resume_from_checkpoint="auto", online_rounds=3)
        assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == listing
    # a third round continues from the second
    online(tiny_dir, out, resume_from_checkpoint="auto", online_rounds=3)
    assert [r["round"] for r in json.load(open(out / STATE))["rounds"]] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# pairs packed one per row


def test_packed_rows_attend_as_two_rows_would():
    from ppo.data.preference import collate_packed_pairs

    item = {"better_input_ids": [1, 2, 3, 7, 8], "worse_input_ids": [1, 2, 3, 9], "prompt_length": 3}
    other = {"better_input_ids": [4, 5, 6, 6, 6, 6], "worse_input_ids": [4, 5, 6, 1, 1], "prompt_length": 2}
    batch = collate_packed_pairs([item, other], pad_token_id=0)
    assert batch["packed_input_ids"].numpy()[0].tolist() == [1, 2, 3, 7, 8, 9, 0, 0, 0]
    assert batch["packed_position_ids"].numpy()[0, :6].tolist() == [0, 1, 2, 3, 4, 3]
    mask = batch["packed_attention_mask"].numpy()[0]
    for i in range(9):
        for j in range(9):
            if i >= 6:
                expected = i == j  # padding sees itself only
            elif i == 5:  # the rejected token: the prompt and itself, not the chosen answer
                expected = j in (0, 1, 2, 5)
            else:
                expected = j <= i
            assert mask[i, j] == expected, (i, j)
    assert batch["packed_chosen_mask"].numpy()[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert batch["packed_rejected_mask"].numpy()[0].tolist() == [0] * 8  # a one-token rejected answer
    assert batch["packed_first_rejected"].numpy().tolist() == [[2, 9], [1, 6]]
    # the second pair: prompt [4, 5], chosen [6, 6, 6, 6], rejected [6, 1, 1] at positions 2, 3, 4
    assert batch["packed_input_ids"].numpy()[1].tolist() == [4, 5, 6, 6, 6, 6, 6, 1, 1]
    assert batch["packed_position_ids"].numpy()[1].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4]
    assert batch["packed_rejected_mask"].numpy()[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


def test_packed_pairs_equal_two_rows_in_log_probs_and_training(tiny_dir, tmp_path):
    from ppo.data.preference import collate_packed_pairs, collate_pairs

    model, _, items = base_model_and_pairs(tiny_dir, 6)
    with paddle.no_grad():
        two = ref.pair_log_probs(model, collate_pairs(items, 0))
        packed = ref.pair_log_probs(model, collate_packed_pairs(items, 0))
    for a, b in zip(two, packed):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    a = train(tiny_dir, tmp_path / "two", sft_loss_ratio=0.3)
    b = train(tiny_dir, tmp_path / "packed", sft_loss_ratio=0.3, pack_pairs=True)
    assert "packed_input_ids" in b.collate(b.train_data, [0, 1])
    assert_trained_weights_match(weights(tmp_path / "two"), weights(tmp_path / "packed"), LR, 2)
    for x, y in zip(metrics(tmp_path / "two", "eval"), metrics(tmp_path / "packed", "eval")):
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-5)


def test_sigterm_during_a_dpo_step_checkpoints_and_resumes_exactly(tiny_dir, tmp_path):
    """SIGTERM inside step 2's loss (precomputed reference): a checkpoint after step 2, the
    reference table kept, and the resumed run bitwise equal to a straight one."""
    import signal

    from ppo.storage.graceful import StopRequested
    from ppo.storage.manifest import list_checkpoints

    common = dict(reference_mode="precompute", max_steps=4, sft_loss_ratio=0.2)
    train(tiny_dir, tmp_path / "straight", **common)
    out = tmp_path / "stopped"
    config = {"model_name_or_path": str(tiny_dir / "base"), "train_datasets": "tiny-preference/train:0.05",
              "eval_datasets": "tiny-preference/test:0.2", "output_dir": str(out), "max_length": 64,
              "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "learning_rate": LR,
              "lr_scheduler_type": "constant", "logging_steps": 1, "disable_tqdm": True, **common}
    trainer = DPOTrainer(parse_args(DPOArgs, [f"--{k}={v}" for k, v in config.items()]))
    compute, seen = trainer.compute_loss, []

    def compute_and_signal(batch):
        seen.append(1)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return compute(batch)

    trainer.compute_loss = compute_and_signal
    with pytest.raises(StopRequested, match="stopped by SIGTERM after step 2 of 4"):
        trainer.train()
    assert [n for n, _ in list_checkpoints(str(out))] == [2]
    assert (out / ref.TABLE_DIR / ref.TABLE).is_file() and not (out / "model.safetensors").exists()
    train(tiny_dir, out, resume_from_checkpoint="auto", **common)
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(out, "train")] == [1, 2, 3, 4]
