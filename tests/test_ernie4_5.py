"""ERNIE 4.5 dense as a model family (``ppo/models/families/ernie4_5.py``): the interleaved rotary
carried by a row permutation of the q/k projections (checked against the numpy forward of
test_hf_checkpoints, which rotates interleaved pairs, and against transformers' own
Ernie4_5ForCausalLM on both ends, through SFT), the bias switch, the tied head, the lean rollout
decoder and the score model against the training forward, refusals, and the main job on a tiny
ERNIE 4.5.  Transformers folders in and out: test_hf_checkpoints (CASES ernie4_5-*); tensor
parallel: test_ppo_parallel."""


import numpy as np
import paddle
import pytest

from ppo.core.errors import UserError
from ppo.models import family_named, family_of_model, load_causal_lm
from ppo.models.families.ernie4_5 import Ernie4_5Config, Ernie4_5ForCausalLM, Ernie4_5ModelForScore, evens_then_odds
from test_hf_checkpoints import IDS, hf_config, hf_tensors, paddle_logits, reference_forward, write_hf_folder
from test_qwen2 import assert_inference_equals_training_forward, assert_scores_equal_the_lean_decoder, randomize_biases
from test_qwen3 import assert_main_job_aligns, sft_and_back, transformers_folders_load_equal

DIMS = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=128, use_flash_attention=False,
            rope_theta=50000.0)


def make_model(tied: bool, use_bias: bool, seed=0):
    paddle.seed(seed)
    model = Ernie4_5ForCausalLM(Ernie4_5Config(**DIMS, tie_word_embeddings=tied, use_bias=use_bias))
    if use_bias:
        randomize_biases(model)
    model.eval()
    return model


def test_ernie_shapes_and_biases():
    model = make_model(True, True)
    family = family_of_model(model)
    assert family.name == "ernie4_5" and family.prefix == "ernie"
    layer = model.ernie.layers[0]
    assert list(layer.self_attn.q_proj.weight.shape) == [64, 4 * 32]
    assert all(getattr(layer.self_attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all(getattr(layer.mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj"))
    plain = make_model(True, False)
    assert plain.ernie.layers[0].self_attn.o_proj.bias is None and plain.ernie.layers[0].mlp.down_proj.bias is None
    layout = family.layout(model)
    assert layout.tied and layout.head_dim == 32 and layout.layers[0].o.bias is not None


def test_evens_then_odds_turns_interleaved_rotary_into_half_split():
    """The permutation the conversion applies: interleaved rotary of x equals the permuted half-split
    rotary of the permuted x (so q.k, with both permuted, is unchanged)."""
    D, T = 8, 5
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, D))
    inv = 1.0 / 10000 ** (np.arange(0, D, 2) / D)
    ang = np.outer(np.arange(T), inv)
    cos, sin = np.cos(ang), np.sin(ang)
    inter = np.empty_like(x)
    inter[:, 0::2] = x[:, 0::2] * cos - x[:, 1::2] * sin
    inter[:, 1::2] = x[:, 1::2] * cos + x[:, 0::2] * sin
    order = evens_then_odds(1, D)
    y = x[:, order]
    half = np.concatenate([y[:, : D // 2] * cos - y[:, D // 2:] * sin, y[:, D // 2:] * cos + y[:, : D // 2] * sin], -1)
    np.testing.assert_allclose(half, inter[:, order], atol=1e-12)
    assert list(evens_then_odds(2, 4)) == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("tied,use_bias", [(True, False), (False, True)], ids=["tied", "untied-biased"])
def test_ernie_inference_logits_greedy_and_log_probs_equal_the_training_forward(tied, use_bias):
    assert_inference_equals_training_forward(make_model(tied, use_bias))


def test_ernie_score_model_scores_equal_the_lean_decoder():
    paddle.seed(4)
    model = Ernie4_5ModelForScore(Ernie4_5Config(**DIMS, use_bias=True, score_dim=1, score_bias=True))
    randomize_biases(model)
    model.eval()
    assert_scores_equal_the_lean_decoder(model)


def test_the_rotary_layout_and_the_biases_matter(tmp_path, monkeypatch):
    """Guards for the equalities: with LLaMA's rotary, or without the biases, the numpy forward of the
    same folder moves away from the one the model matches."""
    monkeypatch.setenv("PPO_CACHE", str(tmp_path / "cache"))
    tensors, cfg = hf_tensors("ernie4_5", False, seed=2, biased=True), hf_config("ernie4_5", False, biased=True)
    write_hf_folder(str(tmp_path / "hf"), tensors, cfg)
    got = paddle_logits(load_causal_lm(str(tmp_path / "hf")), IDS)
    np.testing.assert_allclose(got, reference_forward(tensors, cfg, IDS)[1], rtol=1e-5, atol=1e-5)
    llama_rotary = reference_forward(tensors, dict(cfg, model_type="llama"), IDS)[1]
    assert np.abs(llama_rotary - got).max() > 1e-2
    unbiased = reference_forward({k: v for k, v in tensors.items() if not k.endswith(".bias")}, cfg, IDS)[1]
    assert np.abs(unbiased - got).max() > 1e-2


def test_ernie_refusals_are_one_line():
    family = family_named("ernie4_5")
    config = Ernie4_5Config(**DIMS).to_dict()
    for key, words in (("moe_num_experts", "mixture-of-experts"), ("fuse_attention_qkv", "fuse_attention_qkv"),
                       ("fuse_attention_ffn", "fuse_attention_ffn"), ("sequence_parallel", "sequence_parallel")):
        reason = family.unsupported({**config, key: 64 if key == "moe_num_experts" else True})
        assert reason and "\n" not in reason and words in reason, key
    assert family.unsupported(config) is None
    assert family.pipeline_unsupported(Ernie4_5Config(**DIMS)) is None  # untied: pipeline stages
    reason = family.pipeline_unsupported(Ernie4_5Config(**DIMS, tie_word_embeddings=True))
    assert reason and "\n" not in reason and "tie_word_embeddings false" in reason


def test_a_moe_folder_stops_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PPO_CACHE", str(tmp_path / "cache"))
    write_hf_folder(str(tmp_path / "hf"), hf_tensors("ernie4_5", True),
                    dict(hf_config("ernie4_5", True), moe_num_experts=64, architectures=["Ernie4_5_MoeForCausalLM"]))
    with pytest.raises(UserError, match="mixture-of-experts"):
        load_causal_lm(str(tmp_path / "hf"))


@pytest.mark.slow
def test_transformers_ernie_in_through_sft_and_back_equals_transformers(tiny_dir, tmp_path, monkeypatch):
    """Folders written by transformers' own Ernie4_5ForCausalLM (tied without biases, as
    ERNIE-4.5-0.3B; untied with use_bias) load with transformers' logits; after 3 SFT steps from the
    biased one, the exported ``hf/`` folder read by transformers has the trained logits (the q/k
    rows permuted back)."""
    monkeypatch.setenv("PPO_CACHE", str(tmp_path / "cache"))
    folders = transformers_folders_load_equal("ernie4_5", tiny_dir, tmp_path, [
        ("tied", ["--tied", "1", "--seed", "4"]), ("untied-biased", ["--tied", "0", "--bias", "1", "--seed", "4"])])
    exported = sft_and_back(*folders["untied-biased"], tmp_path)
    assert exported["model_type"] == "ernie4_5" and exported["use_bias"] is True and exported["head_dim"] == 16


@pytest.mark.slow
def test_main_job_quick_on_ernie_aligns_the_policy(tmp_path):
    """SFT -> reward model -> PPO on the built-in example with a tiny tied ERNIE 4.5 (shortened)."""
    assert_main_job_aligns(tmp_path, "ernie4_5")
