"""Qwen3 as a model family (``ppo/models/families/qwen3.py``): the training forward against the numpy
forward of test_hf_checkpoints (per-head q/k norms, a head_dim that is not hidden / heads, no
biases), each difference dropped by hand and seen to change the logits, the lean rollout decoder
and the score model against the training forward, tensor-parallel-free LoRA and recompute paths,
one-line refusals, and the main job on a tiny Qwen3.  Transformers folders in and out:
test_hf_checkpoints (CASES qwen3-*); tensor parallel: test_ppo_parallel."""

import json
import os

import numpy as np
import paddle
import pytest

from ppo.core.errors import UserError
from ppo.models import family_named, family_of_model, load_causal_lm
from ppo.models.families.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3ModelForScore
from test_hf_checkpoints import IDS, hf_config, hf_tensors, paddle_logits, reference_forward, write_hf_folder
from test_qwen2 import assert_inference_equals_training_forward, assert_scores_equal_the_lean_decoder

DIMS = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=128, use_flash_attention=False,
            rope_theta=50000.0)


def randomize_head_norms(model, seed=7):
    """The norms start at ones: make their weights matter too."""
    rng = np.random.default_rng(seed)
    n = 0
    for name, p in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            p.set_value(paddle.to_tensor((1 + rng.normal(0, 0.5, p.shape)).astype("float32")))
            n += 1
    assert n > 0 and n % 2 == 0  # a q and a k norm per layer


def make_model(tied: bool, seed=0, **overrides):
    paddle.seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**dict(DIMS, **overrides), tie_word_embeddings=tied))
    randomize_head_norms(model)
    model.eval()
    return model


def test_qwen3_shapes_and_layout():
    model = make_model(False)
    family = family_of_model(model)
    assert family.name == "qwen3" and family.prefix == "qwen3"
    attn = model.qwen3.layers[0].self_attn
    assert list(attn.q_proj.weight.shape) == [64, 4 * 32] and list(attn.o_proj.weight.shape) == [4 * 32, 64]
    assert list(attn.k_proj.weight.shape) == [64, 2 * 32] and attn.q_proj.bias is None
    layout = family.layout(model)
    assert layout.head_dim == 32 and list(layout.cos.shape) == [128, 32]
    assert layout.layers[0].q_norm is attn.q_norm.weight and layout.layers[0].k_norm is attn.k_norm.weight
    names = [n for n, _ in model.named_parameters()]
    assert "qwen3.layers.0.self_attn.q_norm.weight" in names and not any(n.startswith("qwen2.") for n in names)
    biased = make_model(False, attention_bias=True)
    assert biased.qwen3.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen3_forward_equals_the_numpy_reference(tmp_path, tied):
    """A transformers-named folder written here, loaded: logits equal the numpy forward."""
    tensors, cfg = hf_tensors("qwen3", tied, seed=11), hf_config("qwen3", tied)
    write_hf_folder(str(tmp_path / "hf"), tensors, cfg)
    os.environ["PPO_CACHE"] = str(tmp_path / "cache")
    try:
        model = load_causal_lm(str(tmp_path / "hf"))
    finally:
        del os.environ["PPO_CACHE"]
    _, want = reference_forward(tensors, cfg, IDS)
    np.testing.assert_allclose(paddle_logits(model, IDS), want, rtol=1e-5, atol=1e-5)
    # each Qwen3 difference matters: without the q/k norms, or with LLaMA's head size, the numpy
    # forward moves away from the model's (so the equality above is not vacuous)
    plain = {k: v for k, v in tensors.items() if not k.endswith(("q_norm.weight", "k_norm.weight"))}
    assert np.abs(reference_forward(plain, cfg, IDS)[1] - want).max() > 1e-2
    only_q = {k: v for k, v in tensors.items() if not k.endswith("k_norm.weight")}
    assert np.abs(reference_forward(only_q, cfg, IDS)[1] - want).max() > 1e-2


def test_dropping_the_head_norms_changes_the_model():
    model = make_model(False)
    ids = paddle.to_tensor([IDS])
    with paddle.no_grad():
        normed = model(input_ids=ids, return_dict=True).logits.numpy()
        for layer in model.qwen3.layers:
            layer.self_attn.k_norm.weight.set_value(paddle.ones_like(layer.self_attn.k_norm.weight))
        ones = model(input_ids=ids, return_dict=True).logits.numpy()
    assert np.abs(normed - ones).max() > 1e-3


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen3_inference_logits_greedy_and_log_probs_equal_the_training_forward(tied):
    assert_inference_equals_training_forward(make_model(tied))


def test_qwen3_score_model_scores_equal_the_lean_decoder():
    paddle.seed(4)
    model = Qwen3ModelForScore(Qwen3Config(**DIMS, score_dim=1, score_bias=True))
    randomize_head_norms(model)
    model.eval()
    assert_scores_equal_the_lean_decoder(model)


def test_qwen3_recompute_and_lora_keep_the_gradients():
    """Full-layer and core-attention recompute give the same gradients as none; LoRA on q/k/v/o
    starts equal to the base model and trains its adapters only."""
    from ppo.models.lora import apply_lora
    from ppo.models.recompute import enable_recompute

    ids = paddle.to_tensor([IDS * 2])
    grads = {}
    for granularity in ("none", "full", "full_attn", "core_attn"):
        model = make_model(False, seed=3)
        model.train()
        if granularity != "none":
            enable_recompute(model, granularity)
        loss = model(input_ids=ids, labels=ids, return_dict=True).loss
        loss.backward()
        grads[granularity] = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    for granularity in ("full", "full_attn", "core_attn"):
        assert set(grads[granularity]) == set(grads["none"])
        for name, g in grads["none"].items():
            np.testing.assert_allclose(grads[granularity][name], g, rtol=1e-4, atol=1e-6, err_msg=name)
    assert any("q_norm" in n for n in grads["none"])
    model = make_model(False, seed=3)
    before = paddle_logits(model, IDS)
    apply_lora(model, rank=4, alpha=8.0, targets="q_proj,k_proj,v_proj,o_proj")
    np.testing.assert_allclose(paddle_logits(model, IDS), before, rtol=1e-6, atol=1e-6)
    trainable = [n for n, p in model.named_parameters() if not p.stop_gradient]
    assert trainable and all("lora" in n for n in trainable)


def test_qwen3_refusals_are_one_line(tmp_path):
    family = family_named("qwen3")
    for key, word in (("fuse_attention_qkv", "fuse_attention_qkv"), ("sequence_parallel", "sequence_parallel")):
        reason = family.unsupported({**Qwen3Config(**DIMS).to_dict(), key: True})
        assert reason and "\n" not in reason and word in reason
    assert family.pipeline_unsupported(Qwen3Config(**DIMS)) is None  # untied: pipeline stages
    reason = family.pipeline_unsupported(Qwen3Config(**DIMS, tie_word_embeddings=True))
    assert reason and "\n" not in reason and "tie_word_embeddings false" in reason
    # a transformers folder without its q/k norms is refused by name
    tensors = {k: v for k, v in hf_tensors("qwen3", False).items() if not k.endswith("q_norm.weight")}
    write_hf_folder(str(tmp_path / "hf"), tensors, hf_config("qwen3", False))
    os.environ["PPO_CACHE"] = str(tmp_path / "cache")
    try:
        with pytest.raises(UserError, match="has no tensor for qwen3.layers.0.self_attn.q_norm.weight"):
            load_causal_lm(str(tmp_path / "hf"))
    finally:
        del os.environ["PPO_CACHE"]


@pytest.mark.slow
def test_main_job_quick_on_qwen3_aligns_the_policy(tmp_path):
    """SFT -> reward model -> PPO on the built-in example with a tiny tied Qwen3 (shortened; DPO and
    online DPO do not depend on the family: test_entrypoints runs them on LLaMA)."""
    assert_main_job_aligns(tmp_path, "qwen3")


def assert_main_job_aligns(tmp_path, family):
    """The quick main job without DPO on a tiny ``family`` model: every stage saved that family,
    PPO beat SFT on the gold rule, and the reward model ranks held-out pairs."""
    from ppo.tiny.pipeline import main

    report = main(["--output_dir", str(tmp_path / "tiny"), "--quick", "--family", family, "--without_dpo"])
    for stage in ("base", "sft", "rm", os.path.join("ppo", "policy")):
        with open(tmp_path / "tiny" / stage / "config.json") as f:
            assert json.load(f)["model_type"] == family, stage
    assert report["ppo_gold_sampled"] > report["sft_gold_sampled"] + 0.2
    assert report["reward_model_heldout_accuracy"] >= 0.9


# ---------------------------------------------------------------------------------------------
# transformers itself on both ends (tests/hf_reference.py, in its own process: no torch here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def transformers_run(*argv):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "hf_reference.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def transformers_logits(folder, tmp_path):
    out = tmp_path / f"logits-{len(os.listdir(tmp_path))}.npy"
    transformers_run("logits", folder, json.dumps(IDS), out)
    return np.load(out)


def transformers_folders_load_equal(family, tiny_dir, tmp_path, variants):
    """Folders written by transformers' own class (``variants``: (name, write arguments)) on the tiny
    tokenizer; each loads here with transformers' logits within 1e-4.  Returns {name: (folder, logits)}."""
    import shutil

    from paddlenlp.transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer")))
    out = {}
    for name, extra in variants:
        src = tmp_path / f"hf-{name}"
        transformers_run("write", family, src, "--vocab", vocab, *extra)
        for file in os.listdir(tiny_dir / "tokenizer"):
            shutil.copy2(tiny_dir / "tokenizer" / file, src / file)
        want = transformers_logits(src, tmp_path)
        np.testing.assert_allclose(paddle_logits(load_causal_lm(str(src)), IDS), want, rtol=1e-4, atol=1e-4,
                                   err_msg=name)
        out[name] = (src, want)
    return out


def sft_and_back(src, want, tmp_path):
    """3 SFT steps from the transformers folder ``src``: the model moved, and its ``hf/`` export read
    by transformers has the trained logits.  Returns the exported config."""
    from ppo.args import SFTArgs, parse_args
    from ppo.stages.sft.trainer import SFTTrainer

    out = tmp_path / "sft"
    argv = [os.path.join(ROOT, "config", "tiny", "sft_argument.json"), "--model_name_or_path", str(src),
            "--output_dir", str(out), "--max_steps", "3", "--eval_steps", "100", "--logging_steps", "1",
            "--learning_rate", "0.01", "--disable_tqdm", "true"]
    SFTTrainer(parse_args(SFTArgs, argv)).train()
    trained = paddle_logits(load_causal_lm(str(out)), IDS)
    assert np.abs(trained - want).max() > 1e-3  # SFT moved the model
    np.testing.assert_allclose(transformers_logits(out / "hf", tmp_path), trained, rtol=1e-4, atol=1e-4)
    with open(out / "hf" / "config.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_transformers_qwen3_in_through_sft_and_back_equals_transformers(tiny_dir, tmp_path, monkeypatch):
    """Folders written by transformers' own Qwen3ForCausalLM (random q/k norm weights, head_dim 16
    with hidden 32 and 4 heads; tied and untied) load with transformers' logits; after 3 SFT steps
    from the tied one, the exported ``hf/`` folder read by transformers has the trained logits."""
    monkeypatch.setenv("PPO_CACHE", str(tmp_path / "cache"))
    folders = transformers_folders_load_equal("qwen3", tiny_dir, tmp_path, [
        ("untied", ["--tied", "0", "--seed", "3"]), ("tied", ["--tied", "1", "--seed", "3"])])
    exported = sft_and_back(*folders["tied"], tmp_path)
    assert exported["model_type"] == "qwen3" and exported["head_dim"] == 16 and exported["tie_word_embeddings"]
