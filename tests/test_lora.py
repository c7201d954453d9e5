"""LoRA: the low-rank step against numpy, the reference as the base model with the adapters off,
rollout reading the current adapters, merged final models, exact resume, and the refusals."""

import json
import os
import types

import numpy as np
import paddle
import pytest

from ppo.args import PPOArgs, RewardArgs, SFTArgs
from ppo.core.errors import UserError
from ppo.models.lora import AdaptersOff, apply_lora, lora_layers, merged_for_export

from tests.test_resume import assert_bitwise_equal, train_metrics, weights


class OneLinear(paddle.nn.Layer):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.proj = paddle.nn.Linear(n_in, n_out)
        self.config = types.SimpleNamespace(tensor_parallel_degree=1)  # what LoRAModel reads

    def forward(self, x):
        return self.proj(x)


def test_lora_step_matches_numpy_low_rank_step():
    """y = x W + b + s x A B; loss = sum(y * G): dA = s x^T G B^T, dB = s (x A)^T G; W, b frozen."""
    paddle.seed(1)
    rng = np.random.default_rng(0)
    net = apply_lora(OneLinear(6, 5), rank=3, alpha=6.0, targets="proj")
    layer = net.proj
    s = 6.0 / 3
    W, b = layer.weight.numpy().copy(), layer.bias.numpy().copy()
    A = rng.normal(size=(6, 3)).astype("float32")
    B = rng.normal(size=(3, 5)).astype("float32")  # nonzero: paddlenlp starts B at 0, where dA vanishes
    layer.lora_B.set_value(B)
    layer.lora_A.set_value(A)
    x = rng.normal(size=(4, 6)).astype("float32")
    G = rng.normal(size=(4, 5)).astype("float32")
    trainable = [p for p in net.parameters() if not p.stop_gradient]
    assert {id(p) for p in trainable} == {id(layer.lora_A), id(layer.lora_B)}
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=trainable)
    y = net(paddle.to_tensor(x))
    np.testing.assert_allclose(y.numpy(), x @ W + b + s * x @ A @ B, rtol=1e-5, atol=1e-5)
    (y * paddle.to_tensor(G)).sum().backward()
    dA, dB = s * x.T @ G @ B.T, s * (x @ A).T @ G
    np.testing.assert_allclose(layer.lora_A.grad.numpy(), dA, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.lora_B.grad.numpy(), dB, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and layer.bias.grad is None
    opt.step()
    np.testing.assert_allclose(layer.lora_A.numpy(), A - 0.1 * dA, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.lora_B.numpy(), B - 0.1 * dB, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.weight.numpy(), W)


@pytest.fixture(scope="module")
def qwen2_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny tied Qwen2 (q/k/v biases): LoRA knows no family."""
    from ppo.tiny.build import build_causal_lm

    out = tmp_path_factory.mktemp("lora_qwen2")
    build_causal_lm(str(out / "base"), tiny_tokenizer, family="qwen2", seed=2, tie_word_embeddings=True)
    return out


@pytest.fixture(params=["llama", "qwen2"])
def family_dir(request, tiny_dir):
    return tiny_dir if request.param == "llama" else request.getfixturevalue("qwen2_dir")


def load_pair(tiny_dir):
    """(a LoRA model with random nonzero adapters, the untouched base model), same weights."""
    from ppo.models import load_causal_lm

    base = load_causal_lm(str(tiny_dir / "base"))
    paddle.seed(7)
    model = apply_lora(load_causal_lm(str(tiny_dir / "base")), 4, 8.0, "q_proj,v_proj,o_proj,gate_proj,down_proj")
    assert any(layer.bias is not None for layer in lora_layers(model)) == (base.config.model_type == "qwen2")
    for layer in lora_layers(model):
        layer.lora_B.set_value(paddle.randn(layer.lora_B.shape) * 0.5)
    base.eval()
    model.eval()
    return model, base


def sequences():
    rng = np.random.default_rng(3)
    ids = paddle.to_tensor(rng.integers(3, 300, size=(3, 10)), dtype="int64")
    mask = np.ones((3, 10), dtype="int64")
    mask[2, :3] = 0
    return ids, paddle.to_tensor(mask)


def test_reference_with_adapters_off_is_the_base_model(family_dir):
    from ppo.rollout.inference import InferenceModel
    from ppo.rollout.collect import forward_log_probs

    model, base = load_pair(family_dir)
    ids, mask = sequences()
    reference = AdaptersOff(model)
    assert reference.parameters() == [] and reference.buffers() == []  # offload moves nothing of the actor
    with paddle.no_grad():
        base_lp = forward_log_probs(base, ids, mask)[0].numpy()
        np.testing.assert_array_equal(forward_log_probs(reference, ids, mask)[0].numpy(), base_lp)
        np.testing.assert_array_equal(InferenceModel.of(reference).log_probs(ids, mask).numpy(),
                                      InferenceModel.of(base).log_probs(ids, mask).numpy())
        adapted = forward_log_probs(model, ids, mask)[0].numpy()
        assert np.abs(adapted - base_lp).max() > 1e-3  # the adapters do change the policy
        # the adapted model's lean inference path applies the adapters
        np.testing.assert_allclose(InferenceModel.of(model).log_probs(ids, mask).numpy(), adapted, atol=2e-5)
    assert all(not layer.disable_lora for layer in lora_layers(model))  # switched back on


def test_rollout_reads_the_current_adapters(family_dir):
    """After an optimizer step on the adapters, the inference path (log-probs and greedy decoding)
    agrees with the training forward; the reference stays the base model."""
    from ppo.rollout.inference import InferenceModel
    from ppo.rollout.collect import GenerationConfig, PaddleNLPDecoder, _generate, forward_log_probs

    model, base = load_pair(family_dir)
    ids, mask = sequences()
    view = InferenceModel.of(model)
    before = view.log_probs(ids, mask).numpy()
    model.train()
    opt = paddle.optimizer.AdamW(learning_rate=0.05, parameters=[p for p in model.parameters() if not p.stop_gradient])
    (-forward_log_probs(model, ids, mask)[0].mean()).backward()
    opt.step()
    model.eval()
    with paddle.no_grad():
        after = view.log_probs(ids, mask).numpy()
        assert np.abs(after - before).max() > 1e-3
        np.testing.assert_allclose(after, forward_log_probs(model, ids, mask)[0].numpy(), atol=2e-5)
        np.testing.assert_array_equal(InferenceModel.of(AdaptersOff(model)).log_probs(ids, mask).numpy(),
                                      InferenceModel.of(base).log_probs(ids, mask).numpy())
        config = GenerationConfig(max_new_tokens=6, do_sample=False)
        prompt, prompt_mask = ids[:, :5], mask[:, :5]
        fast = _generate(view, prompt, prompt_mask, config, 2, 0)[0].numpy()
        slow = _generate(PaddleNLPDecoder(model), prompt, prompt_mask, config, 2, 0)[0].numpy()
        np.testing.assert_array_equal(fast, slow)


def test_merged_export_is_a_plain_model_and_restores_exactly(tiny_dir, tmp_path):
    from paddlenlp.transformers import AutoModelForCausalLM

    from ppo.rollout.collect import forward_log_probs

    model, _ = load_pair(tiny_dir)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    with merged_for_export(model):
        assert not [k for k in model.state_dict() if "lora" in k]
        model.save_pretrained(str(tmp_path / "merged"))
    assert_bitwise_equal(state, {k: v.numpy() for k, v in model.state_dict().items()})
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    plain.eval()
    ids, mask = sequences()
    with paddle.no_grad():
        np.testing.assert_allclose(forward_log_probs(plain, ids, mask)[0].numpy(),
                                   forward_log_probs(model, ids, mask)[0].numpy(), atol=2e-5)


STAGES = {
    "sft": (SFTArgs, "tiny-sft"),
    "reward": (RewardArgs, "tiny-preference/train"),
}


def stage_args(stage, tiny_dir, out, **extra):
    args_cls, data = STAGES[stage]
    return args_cls(model_name_or_path=str(tiny_dir / "base"), train_datasets=data, max_length=64, max_steps=4,
                    per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2,
                    logging_steps=1, disable_tqdm=True, seed=5, lora=True, lora_rank=4,
                    output_dir=str(out), **extra)


def trainer_for(stage):
    from ppo.stages.sft.trainer import SFTTrainer
    from rm.reward_trainer import RewardTrainer

    return SFTTrainer if stage == "sft" else RewardTrainer


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_single_model_stage_trains_adapters_resumes_bitwise_and_saves_merged(stage, tiny_dir, tmp_path):
    cls = trainer_for(stage)
    straight = cls(stage_args(stage, tiny_dir, tmp_path / "straight", save_steps=2))
    before = {k: v.numpy().copy() for k, v in straight.model.state_dict().items()}
    straight.train()
    after = {k: v.numpy() for k, v in straight.model.state_dict().items()}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    expected = {k for k in before if ".lora_" in k or k.startswith("score_head.")}
    assert changed == expected, sorted(changed ^ expected)[:5]  # only adapters (and the RM's head) trained
    # the checkpoint holds the adapters and resumes exactly
    ckpt = tmp_path / "straight" / "checkpoint-2"
    assert [k for k in weights(ckpt) if ".lora_" in k]
    cls(stage_args(stage, tiny_dir, tmp_path / "resumed", resume_from_checkpoint=str(ckpt))).train()
    final = weights(tmp_path / "straight")
    assert_bitwise_equal(final, weights(tmp_path / "resumed"))
    assert_bitwise_equal(weights(tmp_path / "straight" / "lora" / "peft_model.safetensors"),
                         weights(tmp_path / "resumed" / "lora" / "peft_model.safetensors"))
    s, r = train_metrics(tmp_path / "straight"), train_metrics(tmp_path / "resumed")
    assert [s[k]["loss"] for k in (3, 4)] == [r[k]["loss"] for k in (3, 4)]
    # the final model is merged (no adapter keys) and its merged weights are W + s A B
    assert not [k for k in final if "lora" in k]
    adapters = weights(tmp_path / "straight" / "lora" / "peft_model.safetensors")
    config = json.load(open(tmp_path / "straight" / "lora" / "lora_config.json"))
    scale = config["lora_alpha"] / config["lora_rank"]
    name = next(k for k in adapters if k.endswith("q_proj.lora_A"))[:-len(".lora_A")]
    np.testing.assert_allclose(final[name + ".weight"],
                               before[name + ".weight"] + scale * adapters[name + ".lora_A"] @ adapters[name + ".lora_B"],
                               rtol=1e-5, atol=1e-6)
    if stage == "sft":  # plain from_pretrained loads it and computes what the adapted model computed
        from paddlenlp.transformers import AutoModelForCausalLM

        from ppo.rollout.collect import forward_log_probs

        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "straight"))
        plain.eval()
        straight.model.eval()
        ids, mask = sequences()
        from ppo.models import load_causal_lm

        exported = load_causal_lm(str(tmp_path / "straight" / "hf"))  # the Hugging Face copy is merged too
        exported.eval()
        with paddle.no_grad():
            expected = forward_log_probs(straight.model, ids, mask)[0].numpy()
            np.testing.assert_allclose(forward_log_probs(plain, ids, mask)[0].numpy(), expected, atol=2e-5)
            np.testing.assert_allclose(forward_log_probs(exported, ids, mask)[0].numpy(), expected, atol=2e-5)


@pytest.fixture(scope="module")
def reward_dir(tiny_dir, tiny_tokenizer, tmp_path_factory):
    from ppo.models import load_score_model

    out = tmp_path_factory.mktemp("lora_rm")
    load_score_model(str(tiny_dir / "base")).save_pretrained(str(out))
    tiny_tokenizer.save_pretrained(str(out))
    return str(out)


def ppo_args(tiny_dir, reward_dir, out, **extra):
    kwargs = dict(actor_model_name_or_path=str(tiny_dir / "base"), reward_model_name_or_path=reward_dir,
                  train_datasets="tiny-prompts/train", max_length=48, max_new_tokens=6,
                  per_device_prompt_batch_size=4, per_device_train_batch_size=2, update_iters=2,
                  learning_rate=1e-2, critic_learning_rate=1e-2, max_steps=4, logging_steps=1, disable_tqdm=True,
                  seed=9, lora=True, lora_rank=4, critic_lora=True, output_dir=str(out))
    return PPOArgs(**{**kwargs, **extra})


def test_ppo_lora_actor_and_critic(tiny_dir, reward_dir, tmp_path):
    from ppo.stages.ppo.trainer import PPOTrainer

    straight = PPOTrainer(ppo_args(tiny_dir, reward_dir, tmp_path / "straight", save_steps=2))
    reference = straight.models.reference
    assert isinstance(reference, AdaptersOff) and reference.model is straight.actor  # no second copy
    actor_before = {k: v.numpy().copy() for k, v in straight.actor.state_dict().items()}
    critic_before = {k: v.numpy().copy() for k, v in straight.critic.state_dict().items()}
    straight.train()
    changed = {k for k, v in straight.actor.state_dict().items() if not np.array_equal(v.numpy(), actor_before[k])}
    assert changed and all(".lora_" in k for k in changed)
    changed = {k for k, v in straight.critic.state_dict().items() if not np.array_equal(v.numpy(), critic_before[k])}
    assert changed and all(".lora_" in k or k.startswith("score_head.") for k in changed)
    logs = train_metrics(tmp_path / "straight")
    assert all(np.isfinite(v) for r in logs.values() for v in r.values() if isinstance(v, float))
    # the policy after training: the reference still is the base model (KL > 0 once adapters moved)
    ckpt = tmp_path / "straight" / "checkpoint-2"
    PPOTrainer(ppo_args(tiny_dir, reward_dir, tmp_path / "resumed", resume_from_checkpoint=str(ckpt))).train()
    for sub in ("policy", "value"):
        a = weights(tmp_path / "straight" / sub)
        assert not [k for k in a if "lora" in k]
        assert_bitwise_equal(a, weights(tmp_path / "resumed" / sub))
        assert os.path.isfile(tmp_path / "straight" / sub / "lora" / "peft_model.safetensors")
    resumed = train_metrics(tmp_path / "resumed")
    for step in (3, 4):
        for key, value in logs[step].items():
            if not key.startswith("time/"):
                assert resumed[step][key] == value, (step, key)


def test_lora_arguments_are_checked():
    with pytest.raises(UserError, match="lora_rank"):
        SFTArgs(model_name_or_path="x", lora=True, lora_rank=0).validate()
    with pytest.raises(UserError, match="lora_alpha"):
        SFTArgs(model_name_or_path="x", lora=True, lora_alpha=0).validate()
    with pytest.raises(UserError, match="lora_target_modules"):
        SFTArgs(model_name_or_path="x", lora=True, lora_target_modules=" , ").validate()
    SFTArgs(model_name_or_path="x", train_datasets="tiny-sft", lora=True, tensor_parallel_degree=2).validate()  # accepted
    with pytest.raises(UserError, match="'lora' needs pipeline_parallel_degree 1"):
        PPOArgs(train_datasets="tiny-prompts/train", lora=True, pipeline_parallel_degree=2).validate()
    with pytest.raises(UserError, match="'critic_lora' needs pipeline_parallel_degree 1"):
        PPOArgs(train_datasets="tiny-prompts/train", critic_lora=True, pipeline_parallel_degree=2).validate()


def test_targets_that_match_nothing_are_one_line(tiny_dir):
    from ppo.models import load_causal_lm

    with pytest.raises(UserError, match="'lora_target_modules' = 'nope_proj' matches no linear layer"):
        apply_lora(load_causal_lm(str(tiny_dir / "base")), 4, 8.0, "nope_proj")


def test_ppo_lora_without_the_inference_model(tiny_dir, reward_dir, tmp_path):
    """paddlenlp's own forward rolls out and scores: the reference runs it with the adapters off."""
    from ppo.stages.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(ppo_args(tiny_dir, reward_dir, tmp_path, use_inference_model=False, max_steps=2))
    trainer.train()
    logs = train_metrics(tmp_path)
    assert all(np.isfinite(v) for r in logs.values() for v in r.values() if isinstance(v, float))
    # B starts at zero: the first rollout's policy is the reference; after an update it is not
    assert logs[1]["kl"] == 0.0 and logs[2]["kl"] != 0.0


@pytest.mark.parametrize("granularity", ["full", "full_attn", "core_attn"])
def test_lora_gradients_identical_with_recompute(granularity):
    """Recompute over frozen base weights still gives the adapters their gradients, unchanged."""
    from ppo.models.recompute import enable_recompute
    from tests.test_recompute import batch, tiny_llama

    def grads(recompute):
        model = apply_lora(tiny_llama(0), 4, 8.0, "q_proj,v_proj,down_proj")
        for layer in lora_layers(model):
            layer.lora_B.set_value(paddle.full(layer.lora_B.shape, 0.1))
        if recompute:
            enable_recompute(model, granularity)
        model.train()
        ids, mask = batch()
        logits = model(input_ids=ids, attention_mask=mask, return_dict=True).logits
        paddle.nn.functional.cross_entropy(logits[:, :-1], ids[:, 1:].unsqueeze(-1)).mean().backward()
        return {n: p.grad.numpy() for n, p in model.named_parameters() if not p.stop_gradient}

    plain, recomputed = grads(False), grads(True)
    assert len(plain) == 12 and all(np.abs(g).max() > 0 for g in plain.values())
    assert_bitwise_equal(plain, recomputed)
