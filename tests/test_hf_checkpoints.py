"""Hugging Face (transformers-written) folders in and out, against an independent numpy forward.

The test writes safetensors files in transformers' naming and layout itself (the ``safetensors``
package's numpy writer; a hand-written header for bfloat16) and computes the logits with its own
numpy forward (embedding, RMSNorm, RoPE with the config's theta, grouped-query attention with
optional q/k/v bias, SwiGLU, tied or untied head).  No torch, no transformers.  The stages start
from such a folder too: SFT -> reward model -> PPO in one process, SFT and the reward model under
tensor parallel 2 against one process.
"""

import json
import os
import shutil
import struct

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file, save_file

from trained_weights import assert_trained_weights_match
from ppo.storage.tensors import open_tensors

from ppo.core.errors import UserError
from ppo.models import hf, load_causal_lm, load_score_model

VOCAB, H, FFN, LAYERS, HEADS, KV = 96, 32, 48, 2, 4, 2
QWEN3_HEAD_DIM = 16  # decoupled: not H / HEADS (8)


# ---------------------------------------------------------------------------------------------
# the independent reference


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def reference_forward(t, cfg, ids):
    """Numpy float64 forward of one sequence ``ids`` [T] over transformers-named tensors ``t``
    -> (final hidden [T, H], logits [T, V] or None without an LM head)."""
    t = {k: np.asarray(v, dtype=np.float64) for k, v in t.items()}
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    D = cfg.get("head_dim") or cfg["hidden_size"] // nh
    theta = cfg["rope_parameters"]["rope_theta"] if "rope_parameters" in cfg else cfg.get("rope_theta", 10000.0)
    eps, T = cfg["rms_norm_eps"], len(ids)
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    angles = np.outer(np.arange(T), inv)
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))

    def rope(x):  # [heads, T, D]
        if cfg.get("model_type") == "ernie4_5":  # interleaved pairs (2i, 2i+1) at frequency i
            c, s_ = np.repeat(cos[:, : D // 2], 2, -1), np.repeat(sin[:, : D // 2], 2, -1)
            rotated = np.stack([-x[..., 1::2], x[..., 0::2]], -1).reshape(x.shape)
            return x * c + rotated * s_
        return x * cos + np.concatenate([-x[..., D // 2:], x[..., : D // 2]], -1) * sin

    def linear(name, x):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    def heads(x, n):
        return x.reshape(T, n, D).transpose(1, 0, 2)

    def head_norm(x, name):  # Qwen3: each head RMS-normalised before the rotary embedding
        return rms(x, t[name + ".weight"], eps) if name + ".weight" in t else x

    x = t["model.embed_tokens.weight"][ids]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"], eps)
        q = rope(head_norm(heads(linear(p + "self_attn.q_proj", h), nh), p + "self_attn.q_norm"))
        k = np.repeat(rope(head_norm(heads(linear(p + "self_attn.k_proj", h), nkv), p + "self_attn.k_norm")),
                      nh // nkv, axis=0)
        v = np.repeat(heads(linear(p + "self_attn.v_proj", h), nkv), nh // nkv, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(D) + causal
        a = np.exp(s - s.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)) @ v
        x = x + linear(p + "self_attn.o_proj", a.transpose(1, 0, 2).reshape(T, -1))
        h = rms(x, t[p + "post_attention_layernorm.weight"], eps)
        gate = linear(p + "mlp.gate_proj", h)
        x = x + linear(p + "mlp.down_proj", gate / (1 + np.exp(-gate)) * linear(p + "mlp.up_proj", h))
    x = rms(x, t["model.norm.weight"], eps)
    if "score.weight" in t:
        return x, None
    head = t["lm_head.weight"] if "lm_head.weight" in t else t["model.embed_tokens.weight"]
    return x, x @ head.T


# ---------------------------------------------------------------------------------------------
# transformers-style folders written by the test


def hf_tensors(family, tied, seed=0, bf16_exact=False, biased=False):
    rng = np.random.default_rng(seed)
    D = QWEN3_HEAD_DIM if family in ("qwen3", "ernie4_5") else H // HEADS

    def w(*shape, scale=0.15):
        return rng.normal(0, scale, shape).astype(np.float32)

    t = {"model.embed_tokens.weight": w(VOCAB, H, scale=0.5), "model.norm.weight": 1 + w(H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(HEADS * D, H), p + "self_attn.k_proj.weight": w(KV * D, H),
                  p + "self_attn.v_proj.weight": w(KV * D, H), p + "self_attn.o_proj.weight": w(H, HEADS * D),
                  p + "mlp.gate_proj.weight": w(FFN, H), p + "mlp.up_proj.weight": w(FFN, H),
                  p + "mlp.down_proj.weight": w(H, FFN), p + "input_layernorm.weight": 1 + w(H),
                  p + "post_attention_layernorm.weight": 1 + w(H)})
        if family == "qwen2":
            t.update({p + "self_attn.q_proj.bias": w(HEADS * D, scale=0.5), p + "self_attn.k_proj.bias": w(KV * D, scale=0.5),
                      p + "self_attn.v_proj.bias": w(KV * D, scale=0.5)})
        if family == "ernie4_5" and biased:  # use_bias: every projection has one
            t.update({p + name + ".bias": w(n, scale=0.5) for name, n in (
                ("self_attn.q_proj", HEADS * D), ("self_attn.k_proj", KV * D), ("self_attn.v_proj", KV * D),
                ("self_attn.o_proj", H), ("mlp.gate_proj", FFN), ("mlp.up_proj", FFN), ("mlp.down_proj", H))})
        if family == "qwen3":  # per-head q/k norms, far from 1 so that each one matters
            t.update({p + "self_attn.q_norm.weight": 1 + w(D, scale=0.5), p + "self_attn.k_norm.weight": 1 + w(D, scale=0.5)})
    if not tied:
        t["lm_head.weight"] = w(VOCAB, H, scale=0.5)
    if bf16_exact:  # representable in bfloat16: the stored file is then exact
        t = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in t.items()}
    return t


def hf_config(family, tied, v5=True, biased=False):
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "ernie4_5": "Ernie4_5ForCausalLM"}[family]
    cfg = dict(architectures=[arch], model_type=family, vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN,
               num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
               max_position_embeddings=128, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=tied,
               bos_token_id=1, eos_token_id=2, pad_token_id=3)  # IDS holds a 3: a pad embedding is still read
    if family == "mistral":  # a window longer than the test's sequences; head_dim as transformers 4.4x+ writes it
        cfg.update(sliding_window=64, head_dim=H // HEADS)
    if family == "qwen3":  # as transformers' Qwen3 writes it: heads x head_dim (64) is not hidden_size (32)
        cfg.update(head_dim=QWEN3_HEAD_DIM, attention_bias=False, use_sliding_window=False, sliding_window=None,
                   max_window_layers=LAYERS)
    if family == "ernie4_5":  # as transformers' Ernie4_5 writes it: its own head_dim and the bias switch
        cfg.update(head_dim=QWEN3_HEAD_DIM, use_bias=biased)
    if v5:  # transformers 5.x: rope_theta inside rope_parameters, "dtype"
        cfg.update(rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, dtype="float32",
                   transformers_version="5.0.0")
    else:
        cfg.update(rope_theta=50000.0, rope_scaling=None, torch_dtype="float32", transformers_version="4.46.0")
    return cfg


def write_bf16(path, tensors):
    """A bfloat16 safetensors file (numpy has no bfloat16: the header is written by hand)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        blob = (a.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_hf_folder(path, tensors, cfg, shards=1, bf16=False):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = sorted(tensors)
    if shards == 1:
        (write_bf16 if bf16 else save_file)(
            os.path.join(path, "model.safetensors"), {n: tensors[n] for n in names}) if bf16 else \
            save_file({n: tensors[n] for n in names}, os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(path, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def snapshot(path):
    return {n: (os.path.getsize(os.path.join(path, n)), os.path.getmtime(os.path.join(path, n)))
            for n in sorted(os.listdir(path))}


def paddle_logits(model, ids):
    model.eval()
    with paddle.no_grad():
        out = model(input_ids=paddle.to_tensor([ids]), return_dict=True)
    return out.logits.astype("float32").numpy()[0]


IDS = [5, 17, 3, 88, 42, 9, 60, 1, 33, 71, 2]
CASES = {"llama": ("llama", False, 1), "qwen2-untied": ("qwen2", False, 1), "qwen2-tied": ("qwen2", True, 1),
         "qwen2-sharded": ("qwen2", False, 3), "mistral": ("mistral", False, 1), "qwen3-untied": ("qwen3", False, 1),
         "qwen3-tied": ("qwen3", True, 1), "ernie4_5-tied": ("ernie4_5", True, 1),
         "ernie4_5-biased": ("ernie4_5-biased", False, 1)}


def family_case(family):
    """(family, biased) of a CASES family entry ('ernie4_5-biased': ERNIE 4.5 with use_bias)."""
    return (family[: -len("-biased")], True) if family.endswith("-biased") else (family, False)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPO_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("v5", [True, False], ids=["transformers5", "transformers4"])
def test_hf_folder_loads_with_the_reference_logits(tmp_path, case, v5):
    family, tied, shards = CASES[case]
    family, biased = family_case(family)
    tensors, cfg = hf_tensors(family, tied, biased=biased), hf_config(family, tied, v5, biased=biased)
    src = str(tmp_path / "hf")
    write_hf_folder(src, tensors, cfg, shards=shards)
    before = snapshot(src)
    model = load_causal_lm(src)
    _, want = reference_forward(tensors, cfg, IDS)
    np.testing.assert_allclose(paddle_logits(model, IDS), want, rtol=1e-5, atol=1e-5)
    assert snapshot(src) == before  # the user's folder is never written to
    target = hf.resolve(src)
    assert target.startswith(str(tmp_path / "cache" / "converted"))
    stamp = os.path.getmtime(os.path.join(target, "model.safetensors"))
    assert hf.resolve(src) == target and os.path.getmtime(os.path.join(target, "model.safetensors")) == stamp
    assert bool(model.config.tie_word_embeddings) == tied


def test_bf16_folder_loads_in_bf16_with_the_reference_logits(tmp_path):
    tensors = hf_tensors("qwen2", False, bf16_exact=True)
    cfg = dict(hf_config("qwen2", False), dtype="bfloat16")
    src = str(tmp_path / "hf")
    write_hf_folder(src, tensors, cfg, bf16=True)
    model = load_causal_lm(src, dtype="float32")  # the toolkit's float32 training copy
    _, want = reference_forward(tensors, cfg, IDS)
    np.testing.assert_allclose(paddle_logits(model, IDS), want, rtol=1e-5, atol=1e-5)
    target = hf.resolve(src)
    with open_tensors(os.path.join(target, "model.safetensors")) as f:  # stored as bf16, not widened
        assert {f.dtype(name) for name in f.keys()} == {"BF16"}


def test_paddlenlp_safetensors_folder_is_not_converted(tmp_path):
    """paddlenlp's own safetensors folder (backbone named by the family prefix) loads as it is."""
    src = str(tmp_path / "hf")
    write_hf_folder(src, hf_tensors("qwen2", False), hf_config("qwen2", False))
    model = load_causal_lm(src)
    out = str(tmp_path / "paddlenlp")
    model.save_pretrained(out, safe_serialization=True)
    assert not os.path.isfile(os.path.join(out, "model_state.pdparams"))
    assert not hf.is_hf_folder(out) and hf.resolve(out) == out
    assert hf.is_hf_folder(src)
    np.testing.assert_allclose(paddle_logits(load_causal_lm(out), IDS), paddle_logits(model, IDS), rtol=1e-6, atol=1e-6)


def _resolve_in_another_process(src, cache, queue):
    os.environ["PPO_CACHE"] = cache
    import paddle  # noqa: F401  (imported before saying ready: the conversion itself is then quick)

    queue.put("ready")
    try:
        queue.put(hf.resolve(src))
    except Exception as e:  # reported to the test, not swallowed
        queue.put(f"error: {type(e).__name__}: {e}")


@pytest.mark.slow
def test_concurrent_processes_convert_once(tmp_path):
    """Ranks starting together: while one process holds the conversion lock (here: the test,
    converting itself), the others wait, then reuse its folder without converting again."""
    import fcntl
    import multiprocessing
    import time

    src = str(tmp_path / "hf")
    write_hf_folder(src, hf_tensors("qwen2", True), hf_config("qwen2", True), shards=2)
    root = hf.cache_root()
    os.makedirs(root)
    target = os.path.join(root, hf._cache_key(src))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_another_process, args=(src, str(tmp_path / "cache"), queue))
             for _ in range(2)]
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for p in procs:
            p.start()
        assert [queue.get(timeout=300) for _ in procs] == ["ready", "ready"]
        time.sleep(5)  # without the lock they would convert meanwhile
        assert queue.empty() and not os.path.exists(target)  # nobody converted past the lock
        hf._convert(src, target, "model_name_or_path")
        stamp = os.path.getmtime(os.path.join(target, "converted_from.json"))
        fcntl.flock(lock, fcntl.LOCK_UN)
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [target, target], results
    assert os.path.getmtime(os.path.join(target, "converted_from.json")) == stamp  # reused, not rewritten
    assert sorted(os.listdir(root)) == sorted([os.path.basename(target), os.path.basename(target) + ".lock"])


def test_a_conversion_finishing_second_keeps_the_first(tmp_path):
    """Where the file lock does not hold (a filesystem without coherent locks), two processes may
    both convert: the one finishing second finds the folder complete, drops its own copy and goes on."""
    src = str(tmp_path / "hf")
    tensors, cfg = hf_tensors("qwen2", True), hf_config("qwen2", True)
    write_hf_folder(src, tensors, cfg)
    target = hf.resolve(src)
    stamp = os.stat(os.path.join(target, "model.safetensors")).st_mtime_ns
    hf._convert(src, target, "model_name_or_path")  # the late converter
    assert os.stat(os.path.join(target, "model.safetensors")).st_mtime_ns == stamp
    assert sorted(os.listdir(os.path.dirname(target))) == [os.path.basename(target), os.path.basename(target) + ".lock"]
    _, want = reference_forward(tensors, cfg, IDS)
    np.testing.assert_allclose(paddle_logits(load_causal_lm(src), IDS), want, rtol=1e-5, atol=1e-5)


def test_theta_matters_for_the_reference():
    """Guard: the v5 rope_theta mapping is visible in the logits (10000 differs from 50000)."""
    tensors, cfg = hf_tensors("llama", False), hf_config("llama", False)
    other = dict(cfg, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert np.abs(reference_forward(tensors, cfg, IDS)[1] - reference_forward(tensors, other, IDS)[1]).max() > 1e-3


def test_missing_shard_is_one_line(tmp_path):
    src = str(tmp_path / "hf")
    write_hf_folder(src, hf_tensors("qwen2", False), hf_config("qwen2", False), shards=2)
    os.remove(os.path.join(src, "model-00002-of-00002.safetensors"))
    with pytest.raises(UserError) as e:
        load_causal_lm(src, "actor_model_name_or_path")
    assert "\n" not in str(e.value) and "model-00002-of-00002.safetensors" in str(e.value)
    assert "'actor_model_name_or_path'" in str(e.value)


def test_truncated_shard_index_is_one_line(tmp_path):
    src = str(tmp_path / "hf")
    write_hf_folder(src, hf_tensors("qwen2", False), hf_config("qwen2", False), shards=2)
    index = os.path.join(src, "model.safetensors.index.json")
    text = open(index).read()
    open(index, "w").write(text[: len(text) // 2])
    with pytest.raises(UserError) as e:
        load_causal_lm(src, "actor_model_name_or_path")
    assert "\n" not in str(e.value) and "weight index" in str(e.value) and index in str(e.value)


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling"])
def test_unmappable_rope_scaling_is_one_line(tmp_path, field):
    cfg = hf_config("llama", False, v5=field == "rope_parameters")
    cfg[field] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 50000.0}
    src = str(tmp_path / "hf")
    write_hf_folder(src, hf_tensors("llama", False), cfg)
    with pytest.raises(UserError) as e:
        load_causal_lm(src)
    assert "\n" not in str(e.value) and "'yarn'" in str(e.value) and field in str(e.value)


def test_tied_mistral_and_a_foreign_head_dim_are_one_line(tmp_path):
    """paddlenlp's Mistral has no tied head; its models compute head_dim as hidden / heads."""
    src = str(tmp_path / "tied")
    write_hf_folder(src, hf_tensors("mistral", True), hf_config("mistral", True))
    with pytest.raises(UserError) as e:
        load_causal_lm(src, "actor_model_name_or_path")
    assert "\n" not in str(e.value) and f"'actor_model_name_or_path' = '{src}'" in str(e.value)
    assert "tie_word_embeddings must be false" in str(e.value)
    src = str(tmp_path / "head-dim")
    write_hf_folder(src, hf_tensors("mistral", False), dict(hf_config("mistral", False), head_dim=16))
    with pytest.raises(UserError) as e:
        load_causal_lm(src)
    assert "\n" not in str(e.value) and "head_dim 16" in str(e.value) and "32 / 4" in str(e.value)


def test_unsupported_family_is_one_line(tmp_path):
    cfg = dict(hf_config("llama", False), model_type="gpt2", architectures=["GPT2LMHeadModel"])
    src = str(tmp_path / "hf")
    write_hf_folder(src, hf_tensors("llama", False), cfg)
    with pytest.raises(UserError) as e:
        load_causal_lm(src)
    assert "\n" not in str(e.value) and "'gpt2'" in str(e.value)


# ---------------------------------------------------------------------------------------------
# out


@pytest.mark.parametrize("case", ["llama", "qwen2-untied", "qwen2-tied", "mistral", "qwen3-untied", "qwen3-tied",
                                  "ernie4_5-tied", "ernie4_5-biased"])
def test_export_reads_back_with_the_reference_logits(tmp_path, case):
    family, tied, _ = CASES[case]
    family, biased = family_case(family)
    src = str(tmp_path / "hf")
    write_hf_folder(src, hf_tensors(family, tied, seed=3, biased=biased), hf_config(family, tied, biased=biased))
    model = load_causal_lm(src)
    with paddle.no_grad():  # move away from the source so the export must carry the live weights
        model.parameters()[1].set_value(model.parameters()[1] * 1.5)
    out = str(tmp_path / "out")
    hf.export(model, out)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [type(model).__name__] and cfg["tie_word_embeddings"] == tied
    assert ("lm_head.weight" in tensors) == (not tied)
    _, want = reference_forward(tensors, cfg, IDS)
    np.testing.assert_allclose(paddle_logits(model, IDS), want, rtol=1e-5, atol=1e-5)
    again = load_causal_lm(out)  # and the toolkit reads its own export back
    np.testing.assert_allclose(paddle_logits(again, IDS), want, rtol=1e-5, atol=1e-5)


def test_score_model_export_is_backbone_plus_score_head(tmp_path):
    src = str(tmp_path / "hf")
    cfg = hf_config("qwen2", True)
    write_hf_folder(src, hf_tensors("qwen2", True, seed=4), cfg)
    model = load_score_model(src, score_type="reward")
    with paddle.no_grad():
        model.score_head.bias.set_value(paddle.to_tensor([0.25]))
    out = str(tmp_path / "out")
    hf.export(model, out)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    assert exported["architectures"] == ["Qwen2ForSequenceClassification"] and exported["num_labels"] == 1
    assert tensors["score.weight"].shape == (1, H) and "lm_head.weight" not in tensors
    hidden, _ = reference_forward(tensors, exported, IDS)
    want = hidden[-1] @ tensors["score.weight"].T + tensors["score.bias"]
    model.eval()
    with paddle.no_grad():
        got = model(paddle.to_tensor([IDS]), paddle.ones([1, len(IDS)], dtype="int64")).end_scores.numpy()[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    again = load_score_model(out, score_type="reward")  # read back as a score model, head included
    again.eval()
    with paddle.no_grad():
        got2 = again(paddle.to_tensor([IDS]), paddle.ones([1, len(IDS)], dtype="int64")).end_scores.numpy()[0]
    np.testing.assert_allclose(got2, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the stages: transformers folders in, transformers folders out


def check_export_matches(folder, load=None):
    """``<folder>/hf`` read by the numpy forward equals the toolkit's model loaded from ``load``
    (default: the paddlenlp model saved in ``folder``; ``<folder>/hf`` reads the export back, converted
    into the cache) -> the exported config."""
    load = str(load or folder)
    tensors = load_file(os.path.join(folder, "hf", "model.safetensors"))
    with open(os.path.join(folder, "hf", "config.json")) as f:
        cfg = json.load(f)
    hidden, logits = reference_forward(tensors, cfg, IDS)
    if "score.weight" in tensors:
        model = load_score_model(load)
        model.eval()
        with paddle.no_grad():
            got = model(paddle.to_tensor([IDS]), paddle.ones([1, len(IDS)], dtype="int64")).end_scores.numpy()[0]
        np.testing.assert_allclose(got, hidden[-1] @ tensors["score.weight"].T + tensors.get("score.bias", 0),
                                   rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(paddle_logits(load_causal_lm(load), IDS), logits, rtol=1e-5, atol=1e-5)
    assert os.path.isfile(os.path.join(folder, "hf", "tokenizer_config.json"))
    return cfg


def write_stage_folder(tiny_dir, src, tied):
    """A transformers Qwen2 folder ``src`` on the tiny tokenizer (its files copied in): random
    weights with q/k/v biases, the vocabulary the tiny task's."""
    from paddlenlp.transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer")))
    tensors = hf_tensors("qwen2", tied, seed=5)
    rng = np.random.default_rng(6)
    tensors["model.embed_tokens.weight"] = rng.normal(0, 0.5, (vocab, H)).astype(np.float32)
    if not tied:
        tensors["lm_head.weight"] = rng.normal(0, 0.5, (vocab, H)).astype(np.float32)
    cfg = dict(hf_config("qwen2", tied), vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    write_hf_folder(str(src), tensors, cfg)
    for name in os.listdir(tiny_dir / "tokenizer"):
        shutil.copy2(tiny_dir / "tokenizer" / name, src / name)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_sft_rm_ppo_from_a_qwen2_transformers_folder(tiny_dir, tmp_path, monkeypatch, tied):
    """SFT and the reward model start from a transformers folder, PPO reads the reward model's
    transformers export; every final model is exported and its export matches the numpy forward."""
    from test_entrypoints import run

    monkeypatch.setenv("PPO_CACHE", str(tmp_path / "cache"))  # the stage processes inherit it
    src = tmp_path / "hf-base"
    write_stage_folder(tiny_dir, src, tied)
    before = snapshot(str(src))
    short = ["--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1"]
    run("ppo/run_sft.py", "config/tiny/sft_argument.json", "--model_name_or_path", src,
        "--output_dir", tmp_path / "sft", *short)
    exported = check_export_matches(tmp_path / "sft")
    assert exported["architectures"] == ["Qwen2ForCausalLM"] and exported["tie_word_embeddings"] == tied
    run("rm/run_reward.py", "config/tiny/rm_argument.json", "--model_name_or_path", src,
        "--output_dir", tmp_path / "rm", *short)
    assert check_export_matches(tmp_path / "rm")["architectures"] == ["Qwen2ForSequenceClassification"]
    run("ppo/run_ppo.py", "config/tiny/ppo_argument.json", "--actor_model_name_or_path", tmp_path / "sft" / "hf",
        "--reward_model_name_or_path", tmp_path / "rm" / "hf", "--output_dir", tmp_path / "ppo",
        "--max_steps", "1", "--eval_steps", "100", "--save_steps", "0")
    for sub in ("policy", "value"):
        check_export_matches(tmp_path / "ppo" / sub)
    assert snapshot(str(src)) == before
    assert len(os.listdir(tmp_path / "cache" / "converted")) >= 3  # base, sft/hf, rm/hf (+ locks)


def stage_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["sft", "reward-model"])
def test_sft_and_reward_model_from_a_transformers_folder_under_tensor_parallel_match_one_process(
        tiny_dir, tmp_path, monkeypatch, stage):
    """SFT and the reward model under tensor parallel 2 start from a transformers folder (untied
    Qwen2, q/k/v biases) with an empty cache: the folder is converted once for both ranks, each loads
    its shards from that copy, and training equals one process started from the same folder (the
    tolerances of test_entrypoints' two-rank tests); the final model's transformers export matches
    the numpy forward and equals the one-process export."""
    from test_entrypoints import ROOT, run

    src = tmp_path / "hf-base"
    write_stage_folder(tiny_dir, src, tied=False)
    before = snapshot(str(src))
    script, config = {"sft": ("ppo/run_sft.py", "config/tiny/sft_argument.json"),
                      "reward-model": ("rm/run_reward.py", "config/tiny/rm_argument.json")}[stage]
    common = [config, "--model_name_or_path", src, "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "3",
              "--per_device_train_batch_size", "8"]
    monkeypatch.setenv("PPO_CACHE", str(tmp_path / "cache-one"))  # inherited by the stage processes
    run(script, *common, "--output_dir", tmp_path / "one")
    monkeypatch.setenv("PPO_CACHE", str(tmp_path / "cache-tp"))
    run(script, *common, "--output_dir", tmp_path / "tp", "--tensor_parallel_degree", "2", nproc=2)
    one, tp = stage_metrics(tmp_path / "one"), stage_metrics(tmp_path / "tp")
    assert len(one) == len(tp) == 3
    for a, b in zip(one, tp):
        # the same batch; reductions in another order (split matmuls, all-reduce): ~1e-7 apart
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"]), (a, b)
        assert a.get("accuracy") == b.get("accuracy"), (a, b)
    logs = [(tmp_path / "tp" / "launch-logs" / f"workerlog.{rank}").read_text() for rank in range(2)]
    assert sum(log.count("converting the transformers folder") for log in logs) == 1
    target = str(tmp_path / "cache-tp" / "converted" / hf._cache_key(str(src)))
    assert all(f"the transformers folder {src} loads from its converted copy {target}" in log for log in logs)
    assert snapshot(str(src)) == before
    with open(os.path.join(ROOT, config)) as f:
        lr = json.load(f)["learning_rate"]
    assert_trained_weights_match(tmp_path / "one", tmp_path / "tp", lr=lr, steps=3)
    exported = check_export_matches(tmp_path / "tp")
    assert exported["architectures"] == ["Qwen2ForCausalLM" if stage == "sft" else "Qwen2ForSequenceClassification"]
    ha, hb = (load_file(str(tmp_path / run_ / "hf" / "model.safetensors")) for run_ in ("one", "tp"))
    assert_trained_weights_match(ha, hb, lr=lr, steps=3)


@pytest.mark.slow
def test_conversion_and_export_memory_is_bounded(tmp_path):
    """benchmarks/hf_memory.py at 1/16 of Qwen2-1.5B's width (bf16, 4 shards): converting it in and
    exporting it back each grow the peak resident memory by at most the model plus one shard, which
    a float32 copy of the model, or the model held twice, would exceed."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("hf_memory", os.path.join(root, "benchmarks", "hf_memory.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--shape", "small", "--work", str(tmp_path)])
    assert result["input_shards"] == 4
    for phase in ("convert", "export"):
        growth = result["phases"][phase]["growth"]
        assert 0 < growth <= result["model_bytes"] + result["shard_bytes"], (phase, result)
    # the exported folder holds the model's tensors in bf16, as the input did
    exported = os.path.join(str(tmp_path), "exported")
    assert sum(os.path.getsize(os.path.join(exported, n)) for n in os.listdir(exported)
               if n.endswith(".safetensors")) >= result["model_bytes"]
