"""A few real PPO iterations in-process: every estimator, ptx, KL as a loss, checkpoints, and the
reward-tokenizer / critic-vocabulary / divergence paths."""

import json
import os

import numpy as np
import paddle
import pytest

from ppo.args import PPOArgs, parse_args
from ppo.core.errors import UserError
from ppo.models import load_score_model
from ppo.stages.ppo.evaluation import prompt_batch


@pytest.fixture(scope="module")
def dirs(tiny_dir, tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_smoke")
    rm = load_score_model(str(tiny_dir / "base"))
    rm.save_pretrained(str(out / "rm"))
    tiny_tokenizer.save_pretrained(str(out / "rm"))
    return {"actor": str(tiny_dir / "base"), "rm": str(out / "rm"), "out": out}


def family_dirs(request, family, tmp_path_factory):
    """``dirs`` for a tied-embedding Qwen2 (q/k/v biases), Qwen3 (q/k norms) or ERNIE 4.5: the actor
    and its score model."""
    models = request.getfixturevalue(f"{family.split('-')[0]}_tied_dir")
    return {"actor": str(models / "base"), "rm": str(models / "score"), "out": tmp_path_factory.mktemp(family)}


def args_for(dirs, name, **overrides):
    kwargs = dict(actor_model_name_or_path=dirs["actor"], reward_model_name_or_path=dirs["rm"],
                  train_datasets="tiny-prompts/train", eval_datasets="tiny-prompts/eval",
                  output_dir=str(dirs["out"] / name), max_length=48, max_new_tokens=8,
                  per_device_prompt_batch_size=4, per_device_train_batch_size=4, per_device_eval_batch_size=12,
                  learning_rate=1e-3, critic_learning_rate=1e-3, lr_scheduler_type="constant", max_steps=2,
                  logging_steps=1, disable_tqdm=True, seed=3)
    kwargs.update(overrides)
    return PPOArgs(**kwargs)


def run(args):
    from ppo.stages.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(args)
    before = {k: v.numpy().copy() for k, v in trainer.actor.state_dict().items()}
    trainer.train()
    changed = sum(int(np.abs(v.numpy() - before[k]).max() > 0) for k, v in trainer.actor.state_dict().items())
    with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f]
    return trainer, changed, logs


@pytest.mark.parametrize("estimator,extra", [
    ("gae", {}),
    ("grpo", {"num_return_sequences": 2, "kl_mode": "loss", "kl_estimator": "k3"}),
    ("rloo", {"num_return_sequences": 2, "adaptive_kl": True, "kl_target": 0.5, "kl_horizon": 100}),
    ("reinforce_plus_plus", {"ptx_datasets": "tiny-sft", "ptx_coeff": 0.5, "per_device_train_batch_size": 2,
                             "gradient_accumulation_steps": 2}),
])
def test_estimators_train(dirs, estimator, extra):
    args = args_for(dirs, f"est-{estimator}", adv_estimator=estimator, **extra)
    trainer, changed, logs = run(args)
    assert changed == len(trainer.actor.state_dict())  # every actor tensor moved
    train = [r for r in logs if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert all(np.isfinite(v) for v in r.values() if isinstance(v, float))
    assert (trainer.critic is None) == (estimator != "gae")
    assert ("critic_loss" in train[0]) == (estimator == "gae")
    if "ptx_datasets" in extra:
        assert train[0]["ptx_loss"] > 0
    if extra.get("adaptive_kl"):
        assert train[-1]["kl_coeff"] != args.kl_coeff  # the controller moved
    policy = os.path.join(args.output_dir, "policy")
    assert os.path.isfile(os.path.join(policy, "model.safetensors"))
    assert os.path.isfile(os.path.join(args.output_dir, "value", "config.json")) == (estimator == "gae")


def test_checkpoints_and_eval_samples(dirs, capsys):
    args = args_for(dirs, "ckpt", max_steps=4, save_steps=1, save_total_limit=2, eval_steps=2,
                    eval_samples_to_write=3)
    run(args)
    out = args.output_dir
    echoed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  reward ")]
    assert len(echoed) == 3 * 3 and all(" -> " in line for line in echoed)  # 3 evaluations x 3 samples
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    for d in ("checkpoint-3/policy", "checkpoint-3/value", "policy", "value"):
        assert os.path.isfile(os.path.join(out, d, "config.json")), d
    samples = sorted(os.listdir(os.path.join(out, "eval_samples")))
    assert samples == ["step-0.rank-0.jsonl", "step-2.rank-0.jsonl", "step-4.rank-0.jsonl"]
    rows = [json.loads(l) for l in open(os.path.join(out, "eval_samples", "step-4.rank-0.jsonl"))]
    assert len(rows) == 24 and all("Give me your view" in r["prompt"] for r in rows)
    from paddlenlp.transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(out, "policy"))  # loadable as a plain causal LM


def test_reward_model_with_another_tokenizer(dirs, tmp_path):
    """Sequences are decoded and re-tokenized for a reward model with a different vocabulary."""
    from ppo.rollout.collect import collect, retokenize
    from ppo.tiny.build import build_llama, build_tokenizer
    from ppo.tiny.task import corpus

    other = build_tokenizer(str(tmp_path / "tok"), vocab_size=200, texts=list(corpus())[:800])
    build_llama(str(tmp_path / "base2"), other, seed=1)
    rm2 = load_score_model(str(tmp_path / "base2"))
    rm2.save_pretrained(str(tmp_path / "rm2"))
    other.save_pretrained(str(tmp_path / "rm2"))
    from ppo.stages.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(args_for(dirs, "retok", reward_model_name_or_path=str(tmp_path / "rm2"),
                                  reward_critic_model_name_or_path=dirs["rm"]))
    ids, mask = prompt_batch(trainer.data.prompts, [0, 1, 2])
    paddle.seed(11)
    exp = collect(trainer.models, ids, mask, trainer.gen, 48)
    r_ids, r_mask = retokenize(exp.sequences, exp.attention_mask, exp.prompt_length, trainer.tokenizer, other, 48)
    assert int(r_ids.max()) < len(other)
    with paddle.no_grad():
        expected = trainer.models.reward(r_ids, r_mask).end_scores.squeeze(-1).numpy()
    # scored by the inference model (paddle's fused RMSNorm) vs paddlenlp's forward: float rounding
    np.testing.assert_allclose(exp.end_scores.numpy(), expected, rtol=1e-5, atol=1e-6)
    trainer.train()  # a full run through the re-tokenizing path


def test_critic_must_share_the_actor_vocabulary(dirs, tmp_path):
    from ppo.tiny.build import build_llama, build_tokenizer
    from ppo.tiny.task import corpus
    from ppo.stages.ppo.trainer import PPOTrainer

    other = build_tokenizer(str(tmp_path / "tok"), vocab_size=200, texts=list(corpus())[:800])
    build_llama(str(tmp_path / "critic_base"), other, seed=1)
    with pytest.raises(UserError, match="must share the actor's vocabulary"):
        PPOTrainer(args_for(dirs, "vocab", reward_critic_model_name_or_path=str(tmp_path / "critic_base")))


def nan_reward_model(dirs, folder):
    rm = load_score_model(dirs["rm"])
    w = rm.score_head.weight.numpy()
    w[:] = np.nan
    rm.score_head.weight.set_value(w)
    rm.save_pretrained(folder)
    from paddlenlp.transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(dirs["rm"]).save_pretrained(folder)
    return folder


def test_non_finite_reward_stops_with_the_step(dirs, tmp_path):
    from ppo.stages.ppo.trainer import PPOTrainer
    from ppo.stages.guard import TrainingDiverged

    nan_rm = nan_reward_model(dirs, str(tmp_path / "nan_rm"))
    args = args_for(dirs, "nan", reward_model_name_or_path=nan_rm, reward_critic_model_name_or_path=dirs["rm"],
                    max_nonfinite_steps=0)
    with pytest.raises(TrainingDiverged, match=r"non-finite reward at PPO step 1 \(1 bad update"):
        PPOTrainer(args).train()
    assert not os.path.exists(os.path.join(args.output_dir, "policy"))
    # the default skips up to 3 bad iterations in a row, then stops naming the 4th
    args = args_for(dirs, "nan3", reward_model_name_or_path=nan_rm, reward_critic_model_name_or_path=dirs["rm"],
                    max_steps=6)
    with pytest.raises(TrainingDiverged, match=r"non-finite reward at PPO step 4 \(4 bad update"):
        PPOTrainer(args).train()


def test_a_single_bad_iteration_is_skipped_and_counted(dirs):
    from ppo.stages.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(args_for(dirs, "skip-one", max_steps=3, save_steps=2))
    original = trainer.rollout

    def rollout(step):
        exp = original(step)
        if step == 1:  # the second iteration's reward is corrupted
            exp.end_scores = exp.end_scores * float("nan")
        return exp

    trainer.rollout = rollout
    before = {k: v.numpy().copy() for k, v in trainer.actor.state_dict().items()}
    trainer.train()
    logs = [json.loads(l) for l in open(os.path.join(trainer.args.output_dir, "metrics.jsonl"))]
    train = {r["step"]: r for r in logs if r["split"] == "train"}
    assert sorted(train) == [1, 3] and train[1]["skipped_updates"] == 0 and train[3]["skipped_updates"] == 1
    for k, v in trainer.actor.state_dict().items():
        assert np.all(np.isfinite(v.numpy())) and np.abs(v.numpy() - before[k]).max() > 0, k
    assert os.path.isfile(os.path.join(trainer.args.output_dir, "checkpoint-2", "manifest.json"))


def test_group_estimator_needs_two_samples(tmp_path):
    with pytest.raises(UserError, match="num_return_sequences must be >= 2"):
        parse_args(PPOArgs, ["--train_datasets", "tiny-prompts/train", "--adv_estimator", "grpo"])


def test_batch_sizes_must_divide(dirs):
    from ppo.stages.ppo.trainer import PPOTrainer

    with pytest.raises(UserError, match="must be divisible"):
        PPOTrainer(args_for(dirs, "div", per_device_train_batch_size=3))


@pytest.mark.parametrize("family", ["llama", "qwen2-tied", "qwen3-tied", "ernie4_5-tied"])
def test_offload_levels_do_not_change_the_result(family, request, tmp_path, tmp_path_factory):
    """Two PPO iterations (with evaluation and a checkpoint) with every offload level equal the run
    without offload bit for bit, and the offloaded models really were out of memory during generation;
    for LLaMA and for tied-embedding Qwen2, Qwen3 and ERNIE 4.5 (one weight is both the embedding and
    the LM head)."""
    from ppo.stages.ppo.trainer import PPOTrainer

    dirs = request.getfixturevalue("dirs") if family == "llama" else family_dirs(request, family, tmp_path_factory)
    common = dict(max_steps=2, save_steps=1, eval_steps=1, seed=21)
    plain = PPOTrainer(args_for(dirs, "no-offload", **common))
    plain.train()
    offloaded = PPOTrainer(args_for(dirs, "offload", offload_level="freeze_model optimizer train_model",
                                    offload_dir=str(tmp_path), **common))
    seen = {}
    original = offloaded.offload.before_scoring

    def spy():
        seen["reference"] = all(not p._is_initialized() for p in offloaded.models.reference.parameters())
        seen["critic"] = all(not p._is_initialized() for p in offloaded.critic.parameters())
        seen["files"] = len(os.listdir(offloaded.offload.store.dir))
        original()

    offloaded.offload.before_scoring = spy
    offloaded.train()
    assert bool(offloaded.actor.config.tie_word_embeddings) == family.endswith("-tied")
    assert seen == {"reference": True, "critic": True, "files": seen["files"]} and seen["files"] >= 3
    for a, b in ((plain.actor, offloaded.actor), (plain.critic, offloaded.critic)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=name)
    assert not os.path.exists(offloaded.offload.store.dir)  # files removed at the end
    with pytest.raises(UserError, match="did you mean 'optimizer'"):
        PPOTrainer(args_for(dirs, "bad-offload", offload_level="optimzer"))
