"""Mistral as a third model family: the lean rollout decoder and the score model equal paddlenlp's
training forward; one-line refusals (pipeline parallel, a sequence longer than the sliding window);
two PPO steps on a tiny Mistral whose exported transformers folder matches the numpy forward of
test_hf_checkpoints.  Loading transformers folders against that numpy forward: test_hf_checkpoints."""

import os

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import MistralConfig

from ppo.core.errors import UserError
from ppo.models import check_max_length, family_named, family_of_model
from ppo.models.families.mistral import MistralForCausalLM, MistralModelForScore
from test_qwen2 import assert_inference_equals_training_forward, assert_scores_equal_the_lean_decoder

DIMS = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, use_flash_attention=False, rope_theta=50000.0,
            sliding_window=64)


def test_mistral_inference_logits_greedy_and_log_probs_equal_the_training_forward():
    paddle.seed(0)
    model = MistralForCausalLM(MistralConfig(**DIMS))
    model.eval()
    family = family_of_model(model)
    assert family.name == "mistral"
    layout = family.layout(model)
    assert not layout.tied and not layout.lm_head_transposed and layout.layers[0].q.bias is None
    assert list(layout.cos.shape) == [128, 16]  # its rotary table is [positions, head_dim] already
    assert_inference_equals_training_forward(model)


def test_mistral_score_model_scores_equal_the_lean_decoder():
    paddle.seed(4)
    model = MistralModelForScore(MistralConfig(**DIMS, score_dim=1, score_bias=True))
    model.eval()
    assert_scores_equal_the_lean_decoder(model)


def test_mistral_refusals_are_one_line():
    family = family_named("mistral")
    reason = family.pipeline_unsupported(MistralConfig(**DIMS))
    assert "\n" not in reason and "no pipeline stages" in reason and "pipeline_parallel_degree must be 1" in reason
    config = dict(MistralConfig(**DIMS).to_dict(), model_type="mistral")
    check_max_length(config, 64, "/m")  # within the window
    with pytest.raises(UserError) as e:
        check_max_length(config, 65, "/m")
    message = str(e.value)
    assert "\n" not in message and "max_length=65" in message and "sliding attention window 64" in message
    assert "max_length <= 64" in message
    check_max_length(dict(config, sliding_window=None), 100, "/m")  # no window (Mistral v0.2 and later)
    # Qwen2 only where the config switches its window on
    qwen2 = {"model_type": "qwen2", "sliding_window": 32, "use_sliding_window": False}
    check_max_length(qwen2, 100, "/q")
    with pytest.raises(UserError, match="sliding attention window 32"):
        check_max_length(dict(qwen2, use_sliding_window=True), 100, "/q")


def build_mistral(tiny_dir, out, sliding_window: int):
    """A tiny Mistral (grouped kv heads) in ``out/base`` on the tiny tokenizer, and its score model
    in ``out/score`` (the base with a fixed-seed head); returns ``out``."""
    from paddlenlp.transformers import AutoTokenizer

    from ppo.models import load_score_model
    from ppo.tiny.build import build_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    build_causal_lm(str(out / "base"), tokenizer, family="mistral", seed=0, num_key_value_heads=2,
                    sliding_window=sliding_window)
    load_score_model(str(out / "base")).save_pretrained(str(out / "score"))
    tokenizer.save_pretrained(str(out / "score"))
    return out


@pytest.fixture(scope="module")
def mistral_dir(tiny_dir, tmp_path_factory):
    return build_mistral(tiny_dir, tmp_path_factory.mktemp("mistral"), sliding_window=48)


def test_ppo_steps_on_mistral_and_its_transformers_export(mistral_dir, tmp_path):
    from test_hf_checkpoints import check_export_matches

    from ppo.args import PPOArgs
    from ppo.stages.ppo.trainer import PPOTrainer

    common = dict(actor_model_name_or_path=str(mistral_dir / "base"),
                  reward_model_name_or_path=str(mistral_dir / "score"), train_datasets="tiny-prompts/train",
                  max_new_tokens=6, per_device_prompt_batch_size=4, per_device_train_batch_size=4,
                  learning_rate=1e-3, critic_learning_rate=1e-3, max_steps=2, logging_steps=1, disable_tqdm=True,
                  seed=3)
    with pytest.raises(UserError, match="sliding attention window 48"):
        PPOTrainer(PPOArgs(output_dir=str(tmp_path / "long"), max_length=64, **common))
    trainer = PPOTrainer(PPOArgs(output_dir=str(tmp_path / "ppo"), max_length=48, **common))
    before = {k: v.numpy().copy() for k, v in trainer.actor.state_dict().items()}
    trainer.train()
    assert family_of_model(trainer.actor).name == "mistral"
    moved = [k for k, v in trainer.actor.state_dict().items() if np.abs(v.numpy() - before[k]).max() > 0]
    assert len(moved) == len(before)
    for sub in ("policy", "value"):
        cfg = check_export_matches(tmp_path / "ppo" / sub)
        assert cfg["model_type"] == "mistral" and cfg["sliding_window"] == 48
    assert os.path.isfile(tmp_path / "ppo" / "policy" / "hf" / "model.safetensors")
