"""The model seam (ppo.models.families): only family files name a family's classes; the registry
refuses other models with one line; the layout is the model's real parameters; the lean decoder
uses every projection bias a layout gives."""

import ast
import pathlib
import re

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

from ppo.core.errors import UserError
from ppo.rollout.inference import InferenceModel
from ppo.models import family_named, family_of, family_of_model, load_score_model, position_ids_from_mask
from ppo.models.families.llama import LlamaModelForScore

PPO = pathlib.Path(__file__).resolve().parent.parent / "ppo"
FAMILIES = PPO / "models" / "families"
# the demo's sentencepiece tokenizer class: a vocabulary format, not a model family
ALLOWED = {"LlamaTokenizer"}


def family_names_in(path: pathlib.Path, root: pathlib.Path = PPO.parent) -> list[str]:
    """Identifiers, attributes, imported modules and non-docstring strings of ``path`` that name
    LLaMA (comments and docstrings may mention it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        words = []
        if isinstance(node, ast.Name):
            words = [node.id]
        elif isinstance(node, ast.Attribute):
            words = [node.attr] if node.attr == "llama" else []
        elif isinstance(node, ast.alias):
            words = [node.name, node.asname or ""]
        elif isinstance(node, ast.ImportFrom):
            words = [node.module or ""]
        elif isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            words = [node.name]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words = [node.value]
        for word in words:
            if word in ALLOWED:
                continue
            if word == "llama" or re.search(r"Llama|(^|\.)llama(\.|$)", word):
                found.append(f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}: {word}")
    return found


def test_only_family_files_name_llama():
    offenders = [hit for path in sorted(PPO.rglob("*.py")) if FAMILIES not in path.parents
                 for hit in family_names_in(path)]
    assert not offenders, "model-family names outside ppo/models/families/:\n" + "\n".join(offenders)


def test_the_scan_sees_names_attributes_imports_and_strings(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""LLaMA in a docstring is fine."""\n'
                     "from paddlenlp.transformers.llama.modeling_pp import X\n"
                     "from paddlenlp.transformers import LlamaConfig\n"
                     "h = model.llama\n"
                     'name = "LlamaForCausalLM"\n'
                     'kind = "llama"\n'
                     "tok = LlamaTokenizer  # the allowed tokenizer class\n")
    hits = sorted(hit.split(": ", 1)[1] for hit in family_names_in(probe, tmp_path))
    assert hits == sorted(["paddlenlp.transformers.llama.modeling_pp", "LlamaConfig", "llama", "LlamaForCausalLM",
                           "llama"])


def test_registry_refuses_unknown_families_with_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        family_of({"model_type": "gpt", "architectures": ["GPTForCausalLM"]}, "actor_model_name_or_path", "/m")
    message = str(e.value)
    assert "\n" not in message and "'actor_model_name_or_path' = '/m'" in message and "'gpt'" in message
    assert "supported model families: ernie4_5, llama, mistral, qwen2, qwen3" in message
    with pytest.raises(UserError, match=r"did you mean 'llama'.*supported: ernie4_5, llama, mistral, qwen2, qwen3$"):
        family_named("lama")
    # by architecture when model_type is missing
    assert family_of({"architectures": ["LlamaForCausalLM"]}).name == "llama"
    # a saved folder of another family, through the loader
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt", "architectures": ["GPTForCausalLM"]}')
    with pytest.raises(UserError, match=r"^'model_name_or_path' = '.*gpt' is a 'gpt' model; supported model "
                                        r"families: ernie4_5, llama, mistral, qwen2, qwen3$"):
        load_score_model(str(folder))


def tiny_llama(seed=0, **extra):
    paddle.seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, use_flash_attention=False)
    for key, value in extra.items():
        setattr(config, key, value)  # after construction: __init__ resets fuse_attention_*
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 2}, {"fuse_attention_qkv": True,
                                                                      "fuse_attention_ffn": True},
                                   {"tie_word_embeddings": True}],
                         ids=["plain", "grouped-kv", "fused", "tied"])
def test_llama_layout_is_the_models_parameters(extra):
    model = tiny_llama(**extra)
    family = family_of_model(model)
    assert family.name == "llama" and family.backbone(model) is model.llama
    layout = family.layout(model)
    hidden, inter, H, KV = 32, 48, 4, extra.get("num_key_value_heads", 4)
    D = hidden // H
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim) == (H, KV, D)
    assert layout.embed_tokens.shape == [96, hidden] and layout.norm.shape == [hidden]
    assert layout.cos.shape == [64, D] and layout.sin.shape == [64, D]
    if extra.get("tie_word_embeddings"):
        assert layout.tied and layout.lm_head_transposed and layout.lm_head is layout.embed_tokens
    else:
        assert not layout.tied and layout.lm_head.shape == [hidden, 96]
    for w in layout.layers:
        assert w.input_norm.shape == [hidden] and w.post_attention_norm.shape == [hidden]
        assert w.o.weight.shape == [H * D, hidden] and w.down.weight.shape == [inter, hidden]
        if extra.get("fuse_attention_qkv"):
            assert w.q is None and w.qkv.weight.shape == [hidden, (H + 2 * KV) * D]
            assert w.gate is None and w.gate_up.weight.shape == [hidden, 2 * inter]
        else:
            assert w.qkv is None and w.gate_up is None
            assert w.q.weight.shape == [hidden, H * D]
            assert w.k.weight.shape == w.v.weight.shape == [hidden, KV * D]
            assert w.gate.weight.shape == w.up.weight.shape == [hidden, inter]
        # LLaMA has no projection biases
        projections = [p for p in (w.q, w.k, w.v, w.qkv, w.o, w.gate, w.up, w.gate_up, w.down) if p is not None]
        assert all(p.bias is None for p in projections)
    # every parameter of the model is in the layout, as the live tensor (not a copy)
    assert _layout_tensor_ids(layout) == {id(p) for p in model.parameters()}


def _layout_tensor_ids(layout):
    ids = {id(layout.embed_tokens), id(layout.norm)}
    if layout.lm_head is not None:
        ids.add(id(layout.lm_head))
    for w in layout.layers:
        ids |= {id(w.input_norm), id(w.post_attention_norm)}
        for p in (w.q, w.k, w.v, w.qkv, w.o, w.gate, w.up, w.gate_up, w.down):
            if p is not None:
                ids |= {id(p.weight)} | ({id(p.bias)} if p.bias is not None else set())
    return ids


def test_score_model_layout_has_no_lm_head():
    paddle.seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, use_flash_attention=False)
    model = LlamaModelForScore(config)
    family = family_of_model(model)
    assert family.score_model_class is LlamaModelForScore and family.backbone(model) is model.llama
    layout = family.layout(model)
    assert layout.lm_head is None
    head = {id(model.score_head.weight), id(model.score_head.bias)}
    assert _layout_tensor_ids(layout) == {id(p) for p in model.parameters()} - head


def with_biases(model, names=("q_proj", "k_proj", "v_proj", "o_proj"), mlp_names=("down_proj",), seed=7):
    """``model`` with its projections replaced by biased ones (same weights, random biases): the
    paddlenlp forward then computes a LLaMA with projection biases (Qwen2's q/k/v ones included)."""
    rng = np.random.default_rng(seed)
    for layer in model.llama.layers:
        for parent, attrs in ((layer.self_attn, names), (layer.mlp, mlp_names)):
            for name in attrs:
                old = getattr(parent, name)
                new = paddle.nn.Linear(*old.weight.shape)
                new.weight.set_value(old.weight)
                new.bias.set_value(paddle.to_tensor(rng.normal(0, 0.5, old.weight.shape[1]).astype("float32")))
                setattr(parent, name, new)
    return model


def numpy_forward(layout, ids):
    """Logits [S, V] of one unpadded sequence ``ids`` [S], in float64 from the layout's arrays."""
    a = lambda t: None if t is None else t.numpy().astype(np.float64)  # noqa: E731
    lin = lambda x, p: x @ a(p.weight) + (0 if p.bias is None else a(p.bias))  # noqa: E731
    norm = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + layout.rms_norm_eps) * a(w)  # noqa: E731
    H, KV, D = layout.num_heads, layout.num_kv_heads, layout.head_dim
    S = len(ids)
    cos, sin = a(layout.cos)[:S, None], a(layout.sin)[:S, None]  # [S, 1, D]
    rope = lambda x: x * cos + np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1) * sin  # noqa: E731
    h = a(layout.embed_tokens)[ids]
    causal = np.tril(np.ones((S, S), bool))
    for w in layout.layers:
        x = norm(h, w.input_norm)
        q = rope(lin(x, w.q).reshape(S, H, D))
        k = np.repeat(rope(lin(x, w.k).reshape(S, KV, D)), H // KV, axis=1)
        v = np.repeat(lin(x, w.v).reshape(S, KV, D), H // KV, axis=1)
        scores = np.einsum("shd,thd->hst", q, k) / np.sqrt(D)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        h = h + lin(np.einsum("hst,thd->shd", probs, v).reshape(S, H * D), w.o)
        x = norm(h, w.post_attention_norm)
        gate = lin(x, w.gate)
        h = h + lin(gate / (1 + np.exp(-gate)) * lin(x, w.up), w.down)
    return norm(h, layout.norm) @ a(layout.lm_head)


@pytest.mark.parametrize("kv", [4, 2], ids=["plain", "grouped-kv"])
def test_lean_decoder_adds_the_biases_the_layout_gives(kv):
    model = with_biases(tiny_llama(seed=3, num_key_value_heads=kv))
    layout = family_of_model(model).layout(model)
    w = layout.layers[0]
    assert all(p.bias is not None for p in (w.q, w.k, w.v, w.o, w.down)) and w.gate.bias is None
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, size=(2, 7))
    want = np.stack([numpy_forward(layout, row) for row in ids])  # [B, S, V]
    x = paddle.to_tensor(ids, dtype="int64")
    mask = paddle.ones_like(x)
    pos = position_ids_from_mask(mask)
    inference = InferenceModel(model)
    with paddle.no_grad():
        train = model(input_ids=x, attention_mask=mask, position_ids=pos, return_dict=True).logits.numpy()
        first = inference.start(x[:, :6], mask[:, :6], pos[:, :6], max_new_tokens=2).numpy()
        second = inference.step(x[:, 6], mask[:, 6], pos[:, 6:]).numpy()
        scored = inference.log_probs(x, mask).numpy()
    np.testing.assert_allclose(train, want, rtol=1e-4, atol=1e-4)  # the reference is the biased model
    np.testing.assert_allclose(first, want[:, 5], rtol=1e-4, atol=1e-4)   # prefill
    np.testing.assert_allclose(second, want[:, 6], rtol=1e-4, atol=1e-4)  # a decode step
    log_softmax = want - np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - want.max(-1, keepdims=True)
    want_lp = np.take_along_axis(log_softmax[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(scored, want_lp, rtol=1e-4, atol=1e-4)
    # the biases matter at this tolerance: without them the logits are far off
    unbiased = numpy_forward(type(layout)(**{**{f: getattr(layout, f) for f in layout.__slots__},
                                             "layers": [_no_bias(w) for w in layout.layers]}), ids[0])
    assert np.abs(unbiased - want[0]).max() > 1e-2


def _no_bias(weights):
    from dataclasses import replace

    from ppo.models.families import Projection

    return replace(weights, **{f: Projection(getattr(weights, f).weight) for f in ("q", "k", "v", "o", "down")})


def test_lean_decoder_adds_a_fused_qkv_bias():
    """paddlenlp's fused q/k/v projection with a bias (Qwen2's layout under fuse_attention_qkv):
    the decoder's logits equal the training forward's, and differ without the bias."""
    model = with_biases(tiny_llama(seed=5, num_key_value_heads=2, fuse_attention_qkv=True),
                        names=("qkv_proj",), mlp_names=())
    assert family_of_model(model).layout(model).layers[1].qkv.bias is not None
    x = paddle.to_tensor(np.random.default_rng(1).integers(0, 96, size=(2, 6)), dtype="int64")
    mask = paddle.ones_like(x)
    pos = position_ids_from_mask(mask)
    with paddle.no_grad():
        want = model(input_ids=x, attention_mask=mask, position_ids=pos, return_dict=True).logits[:, -1].numpy()
        got = InferenceModel(model).start(x, mask, pos, max_new_tokens=1).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for layer in model.llama.layers:
            layer.self_attn.qkv_proj.bias.set_value(paddle.zeros_like(layer.self_attn.qkv_proj.bias))
        assert np.abs(InferenceModel(model).start(x, mask, pos, max_new_tokens=1).numpy() - want).max() > 1e-2
