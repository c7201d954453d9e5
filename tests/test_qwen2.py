"""Qwen2 as a model family: the lean rollout decoder equals paddlenlp's training forward (q/k/v biases,
tied and untied heads), the score model, and SFT / reward model / PPO one step each on a tiny Qwen2."""

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import Qwen2Config, Qwen2ForCausalLM

from ppo.core.errors import UserError
from ppo.rollout.inference import InferenceModel
from ppo.models import family_of_model, position_ids_from_mask
from ppo.models.families.qwen2 import Qwen2ModelForScore
from ppo.rollout.collect import GenerationConfig, forward_log_probs, generate

DIMS = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, use_flash_attention=False, rope_theta=50000.0)


def randomize_biases(model, seed=7):
    """paddlenlp starts the q/k/v biases at zero: make them matter."""
    rng = np.random.default_rng(seed)
    n = 0
    for name, p in model.named_parameters():
        if name.endswith("_proj.bias"):
            p.set_value(paddle.to_tensor(rng.normal(0, 0.5, p.shape).astype("float32")))
            n += 1
    assert n > 0


def make_model(tied: bool, seed=0):
    paddle.seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**DIMS, tie_word_embeddings=tied))
    randomize_biases(model)
    model.eval()
    return model


def prompts(B=5, P=9, vocab=320, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(B, P))
    mask = np.ones((B, P), dtype="int64")
    for b in range(B):
        mask[b, : b % 4] = 0
        ids[b, : b % 4] = 3
    return paddle.to_tensor(ids, dtype="int64"), paddle.to_tensor(mask)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_layout_has_biases_and_the_head(tied):
    model = make_model(tied)
    family = family_of_model(model)
    assert family.name == "qwen2"
    layout = family.layout(model)
    assert layout.layers[0].q.bias is model.qwen2.layers[0].self_attn.q_proj.bias
    assert layout.layers[0].o.bias is None
    assert layout.tied == tied and layout.lm_head_transposed == tied


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_inference_logits_greedy_and_log_probs_equal_the_training_forward(tied):
    assert_inference_equals_training_forward(make_model(tied))


def assert_inference_equals_training_forward(model):
    """The lean decoder's first logits, greedy tokens and log-probs equal ``model``'s own forward."""
    ids, mask = prompts()
    inference = InferenceModel(model)
    pos = position_ids_from_mask(mask)
    with paddle.no_grad():
        first = inference.start(ids, mask, pos, max_new_tokens=3)
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos, return_dict=True).logits[:, -1]
    np.testing.assert_allclose(first.numpy(), full.numpy(), rtol=1e-5, atol=1e-5)
    config = GenerationConfig(max_new_tokens=10, do_sample=False)
    ref, ref_mask = generate(model, ids, mask, config, eos_token_id=2, pad_token_id=3)
    got, got_mask = generate(InferenceModel(model), ids, mask, config, eos_token_id=2, pad_token_id=3)
    np.testing.assert_array_equal(got.numpy(), ref.numpy())
    np.testing.assert_array_equal(got_mask.numpy(), ref_mask.numpy())
    with paddle.no_grad():
        want, _ = forward_log_probs(model, ref, ref_mask, temperature=0.7)
    have = InferenceModel.of(model).log_probs(ref, ref_mask, temperature=0.7)
    real = ref_mask[:, 1:].numpy() * ref_mask[:, :-1].numpy() > 0
    np.testing.assert_allclose(have.numpy()[real], want.numpy()[real], rtol=1e-5, atol=1e-5)


def test_qwen2_biases_change_the_logits():
    """Guard for the test above: dropping the biases would change the logits."""
    model = make_model(False)
    ids, mask = prompts()
    pos = position_ids_from_mask(mask)
    with paddle.no_grad():
        with_bias = model(input_ids=ids, attention_mask=mask, position_ids=pos, return_dict=True).logits
        for layer in model.qwen2.layers:
            layer.self_attn.q_proj.bias.set_value(paddle.zeros_like(layer.self_attn.q_proj.bias))
        without = model(input_ids=ids, attention_mask=mask, position_ids=pos, return_dict=True).logits
    assert np.abs(with_bias.numpy() - without.numpy()).max() > 1e-3


def test_qwen2_score_model_scores_equal_the_lean_decoder():
    paddle.seed(4)
    model = Qwen2ModelForScore(Qwen2Config(**DIMS, score_dim=1, score_bias=True))
    randomize_biases(model)
    model.eval()
    assert_scores_equal_the_lean_decoder(model)


def assert_scores_equal_the_lean_decoder(model):
    ids, mask = prompts(seed=5)
    with paddle.no_grad():
        out = model(ids, mask)
    scores, end = InferenceModel.of(model).scores(ids, mask)
    real = mask.numpy() > 0
    np.testing.assert_allclose(scores.numpy()[..., 0][real], out.scores.numpy()[..., 0][real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(end.numpy(), out.end_scores.numpy(), rtol=1e-5, atol=1e-5)


def test_tied_qwen2_refuses_pipeline_with_one_line():
    from ppo.models.families import family_named

    reason = family_named("qwen2").pipeline_unsupported(Qwen2Config(**DIMS, tie_word_embeddings=True))
    assert reason is not None and "\n" not in reason and "tie_word_embeddings" in reason
    assert family_named("qwen2").pipeline_unsupported(Qwen2Config(**DIMS, tie_word_embeddings=False)) is None


@pytest.mark.slow
def test_main_job_quick_on_tied_qwen2_aligns_the_policy(tmp_path):
    """SFT -> reward model -> PPO on the built-in example with a tied-embedding Qwen2 (shortened)."""
    import json
    import os

    from ppo.tiny.pipeline import main

    report = main(["--output_dir", str(tmp_path / "tiny"), "--quick", "--family", "qwen2", "--without_dpo"])
    for stage in ("base", "sft", "rm", os.path.join("ppo", "policy")):
        with open(tmp_path / "tiny" / stage / "config.json") as f:
            config = json.load(f)
        assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True, stage
    # observed: SFT about 0.5 sampled gold, PPO about 0.87 after 20 steps
    assert report["ppo_gold_sampled"] > report["sft_gold_sampled"] + 0.2
    assert report["reward_model_heldout_accuracy"] >= 0.9
