"""The fused GPU rollout adapter (ppo.rollout.fused), on CPU.

PaddleNLP's fused inference model needs the CUDA-only ``paddlenlp_ops``, so these tests run the
adapter against ``ContractLlama``: a stand-in that takes the same inputs as
``LlamaForCausalLMInferenceModel`` (prepare_inputs_for_generation, then the forward), checks every
input against the contract written in the ppo.rollout.fused docstring, and computes the logits
with its own copy of a paddlenlp ``LlamaForCausalLM`` over each row's token history.  What they
cover: the adapter's packing, positions, cache shapes, sequence lengths and weight refresh; the
decoder selection and its single warning.  What they cannot cover: the fused kernels themselves.
"""

import copy
import logging

import numpy as np
import paddle
import pytest
from paddlenlp.transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from paddlenlp.transformers.conversion_utils import split_param_func

from ppo.distributed import parallel

from ppo.rollout import fused as fused_inference
from ppo.rollout.fused import FusedInferenceModel, fused_model_state, right_packed, rollout_decoder
from ppo.rollout.inference import InferenceModel
from ppo.rollout.collect import GenerationConfig, generate, generate_in_buckets
from tests.test_inference import assert_same_greedy, make_model, prompts
from tests.test_qwen2 import DIMS as QWEN2_DIMS
from tests.test_qwen2 import randomize_biases


class ContractLlama:
    """Follows LlamaForCausalLMInferenceModel's input contract; logits from a plain LLaMA copy.
    With ``live`` set (a model), every prefill also checks that the copy holds its weights."""

    live = None

    def __init__(self, config, dtype):
        self.config = config
        self.dtype = dtype
        from paddlenlp.transformers.model_utils import dtype_guard

        with dtype_guard(dtype):  # as PaddleNLP's model is built
            self.copy = self.build_copy(config)
        self.copy.eval()
        self.loads = 0
        self.history = None
        self.cache_lengths = []  # the slots per row of every prefill's KV cache

    @staticmethod
    def build_copy(config):
        return LlamaForCausalLM(config)

    def eval(self):
        pass

    @staticmethod
    def get_cache_kvs_shape(config, max_batch_size, max_length):
        heads = config.num_key_value_heads // max(config.tensor_parallel_degree, 1)
        return [[2, max_batch_size, heads, max_length, config.hidden_size // config.num_attention_heads]
                for _ in range(config.num_hidden_layers)]

    def set_state_dict(self, state):
        assert all(isinstance(v, np.ndarray) for v in state.values())
        self.default_dtype_at_load = paddle.get_default_dtype()
        assert set(state) == set(self.copy.state_dict())
        self.copy.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        self.loads += 1

    def prepare_inputs_for_generation(self, input_ids, cache_kvs, seq_len_encoder, seq_len_decoder, tgt_ids, tgt_pos,
                                      tgt_generation_mask, **kwargs):
        decode = kwargs.get("cache") is not None
        mask = tgt_generation_mask if decode else kwargs["attention_mask"]
        return dict(input_ids=tgt_ids if decode else input_ids,
                    position_ids=tgt_pos if decode else kwargs["position_ids"],
                    attention_mask=(mask - 1) * 1e4, cache_kvs=cache_kvs, seq_len_encoder=seq_len_encoder,
                    seq_len_decoder=seq_len_decoder, cache=kwargs.get("cache"))

    def _last_logits(self):
        rows = []
        for tokens in self.history:
            ids = paddle.to_tensor([tokens], dtype="int64")
            with paddle.no_grad():
                rows.append(self.copy(input_ids=ids, return_dict=True).logits[0, -1])
        return (paddle.stack(rows),)

    def __call__(self, input_ids, position_ids, attention_mask, cache_kvs, seq_len_encoder, seq_len_decoder, cache):
        B = input_ids.shape[0]
        shapes = self.get_cache_kvs_shape(self.config, B, cache_kvs[0].shape[3])
        assert [list(c.shape) for c in cache_kvs] == shapes and str(cache_kvs[0].dtype).endswith(self.dtype)
        mask = attention_mask.numpy()
        if cache is None:  # prefill: right padded, lengths in seq_len_encoder
            if self.live is not None:
                mine = self.copy.state_dict()
                for name, value in self.live.state_dict().items():
                    np.testing.assert_array_equal(mine[name].numpy(), value.numpy(), err_msg=name)
            lengths = seq_len_encoder.numpy().reshape(-1)
            assert seq_len_encoder.dtype == paddle.int32 and (seq_len_decoder.numpy().reshape(-1) == lengths).all()
            P = input_ids.shape[1]
            self.cache_lengths.append(cache_kvs[0].shape[3])
            assert P == lengths.max() and mask.shape == (B, 1, P, P)  # as wide as the longest prompt
            ids, pos = input_ids.numpy(), position_ids.numpy()
            self.history = []
            for b, n in enumerate(lengths):
                allowed = np.zeros((P, P), bool)
                allowed[:n, :n] = np.tril(np.ones((n, n), bool))
                np.testing.assert_array_equal(mask[b, 0], np.where(allowed, 0.0, -1e4))
                np.testing.assert_array_equal(pos[b, :n], np.arange(n))
                self.history.append(list(ids[b, :n]))
        else:  # decode: one token per row at position == tokens already cached
            assert input_ids.shape == [B, 1] and mask.shape == (B, 1, 1, cache_kvs[0].shape[3]) and (mask == 0).all()
            pos, cached = position_ids.numpy().reshape(-1), seq_len_decoder.numpy().reshape(-1)
            assert seq_len_decoder.dtype == paddle.int32
            for b, tokens in enumerate(self.history):
                # the kernel writes this token's keys and values at slot pos: it must exist
                assert pos[b] == cached[b] == len(tokens) < cache_kvs[0].shape[3]
                tokens.append(int(input_ids[b, 0]))
        return self._last_logits()


class ContractQwen2(ContractLlama):
    """Follows Qwen2ForCausalLMInferenceModel's contract: the same inputs as the LLaMA one (its
    ``prepare_inputs_for_generation`` and cache shapes are the same code), and its weights read as
    that model's ``set_state_dict`` reads them: per layer the q/k/v biases by their separate names
    only, the attention weights fused (``qkv_proj``, split per kv head) or separate, the MLP fused
    (``gate_up_fused_proj``, two halves) or separate; the LM head only when given (tied: it is the
    embedding).  Logits from an unfused Qwen2 copy loaded with what it read."""

    @staticmethod
    def build_copy(config):
        plain = copy.deepcopy(config)
        plain.fuse_attention_qkv = plain.fuse_attention_ffn = False
        return Qwen2ForCausalLM(plain)

    def set_state_dict(self, state):
        assert all(isinstance(v, np.ndarray) for v in state.values())
        self.default_dtype_at_load = paddle.get_default_dtype()
        split, config = split_param_func(), self.config
        mp = max(1, config.tensor_parallel_degree)
        read = {k: state[k] for k in ("qwen2.embed_tokens.weight", "qwen2.norm.weight")}
        for i in range(config.num_hidden_layers):
            at = f"qwen2.layers.{i}."
            if at + "self_attn.qkv_proj.weight" in state:
                qkv = split(state[at + "self_attn.qkv_proj.weight"], is_qkv=True,
                            num_heads=config.num_attention_heads // mp,
                            num_key_value_heads=config.num_key_value_heads // mp)
            else:
                qkv = [state[at + f"self_attn.{x}_proj.weight"] for x in "qkv"]
            if at + "mlp.gate_up_fused_proj.weight" in state:
                gate_up = split(state[at + "mlp.gate_up_fused_proj.weight"])
            else:
                gate_up = [state[at + f"mlp.{x}_proj.weight"] for x in ("gate", "up")]
            for x, w in zip("qkv", qkv):
                read[at + f"self_attn.{x}_proj.weight"] = w
                read[at + f"self_attn.{x}_proj.bias"] = state[at + f"self_attn.{x}_proj.bias"]
            read[at + "mlp.gate_proj.weight"], read[at + "mlp.up_proj.weight"] = gate_up
            for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                         "post_attention_layernorm.weight"):
                read[at + name] = state[at + name]
        if "lm_head.weight" in state:
            read["lm_head.weight"] = state["lm_head.weight"]
        mine = self.copy.state_dict()
        assert set(read) == set(mine), set(mine) ^ set(read)
        for name, value in read.items():
            assert list(value.shape) == list(mine[name].shape), name
        self.copy.set_state_dict({k: paddle.to_tensor(v) for k, v in read.items()})
        self.loads += 1


def fused(model):
    return FusedInferenceModel(model, factory=ContractLlama)


@pytest.mark.parametrize("rows", [slice(0, 6), slice(1, 4)], ids=["one-full-row", "every-row-padded"])
def test_right_packed_moves_each_prompt_to_the_left_edge(rows):
    ids, mask = prompts(B=6, P=7)
    ids, mask = ids[rows], mask[rows]
    got, lengths = right_packed(ids, mask)
    ids, mask = ids.numpy(), mask.numpy()
    assert got.shape == [len(ids), mask.sum(axis=1).max()]
    for b in range(len(ids)):  # naive reference
        real = [int(t) for t, m in zip(ids[b], mask[b]) if m]
        assert lengths[b] == len(real)
        assert list(got.numpy()[b, :len(real)]) == real
        assert (got.numpy()[b, len(real):] == 0).all()


@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 2}])
def test_greedy_tokens_equal_the_training_model(extra):
    model = make_model(**extra)
    assert_same_greedy(fused(model), model, GenerationConfig(max_new_tokens=8, do_sample=False, repetition_penalty=1.3))


def test_prompts_that_all_have_padding():
    model = make_model()
    ids, mask = prompts()
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    ref, _ = generate(model, ids[1:4], mask[1:4], config, eos_token_id=2, pad_token_id=3)
    got, _ = generate(fused(model), ids[1:4], mask[1:4], config, eos_token_id=2, pad_token_id=3)
    np.testing.assert_array_equal(got.numpy(), ref.numpy())


@pytest.mark.parametrize("rows,longest", [(slice(0, 5), 9), (slice(1, 4), 8)], ids=["one-full-row", "every-row-padded"])
def test_kv_cache_holds_the_longest_prompt_and_every_new_token(rows, longest):
    """The cache is as long as the longest real prompt + max_new_tokens (counted here from the
    mask), not the padded prompt width; an EOS that never comes makes every decode step run."""
    model = make_model()
    ids, mask = (t[rows] for t in prompts(B=5, P=9))
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    decoder = fused(model)
    got, _ = generate(decoder, ids, mask, config, eos_token_id=10_000, pad_token_id=3)
    assert got.shape[1] == 9 + 5
    assert max(sum(int(m) for m in row) for row in mask.numpy()) == longest  # real tokens of the longest prompt
    assert decoder.fused.cache_lengths == [longest + config.max_new_tokens]


def test_weights_load_in_the_fused_precision_and_layout():
    model = make_model()
    decoder = FusedInferenceModel(model, dtype="float64", factory=ContractLlama)
    paddle.seed(11)
    decoder.refresh()  # builds the fused model: its initialisers must not move the run's random stream
    after = paddle.rand([4]).numpy()
    paddle.seed(11)
    np.testing.assert_array_equal(after, paddle.rand([4]).numpy())
    assert decoder.fused.default_dtype_at_load == "float64" and paddle.get_default_dtype() == "float32"
    assert all(v.dtype == np.float64 for v in fused_model_state(model, "float64").values())
    # a fused QKV next to separate gate / up projections: those are fused for PaddleNLP's loader
    model = make_model(fuse_attention_qkv=True)
    state = fused_model_state(model)
    plain = {k: v.numpy() for k, v in model.state_dict().items()}
    for i in range(2):
        prefix = f"llama.layers.{i}.mlp."
        assert prefix + "gate_proj.weight" not in state and prefix + "up_proj.weight" not in state
        np.testing.assert_array_equal(state[prefix + "gate_up_fused_proj.weight"],
                                      np.concatenate([plain[prefix + "gate_proj.weight"],
                                                      plain[prefix + "up_proj.weight"]], axis=1))
    assert set(state) - set(plain) == {f"llama.layers.{i}.mlp.gate_up_fused_proj.weight" for i in range(2)}
    unfused = make_model()
    assert {k: v.numpy().tolist() for k, v in unfused.state_dict().items()} == \
        {k: v.tolist() for k, v in fused_model_state(unfused).items()}


def test_buckets_refresh_once_and_every_rollout_decodes_the_current_weights():
    model = make_model()
    decoder = fused(model)
    ids, mask = prompts(B=6)
    config = GenerationConfig(max_new_tokens=6, do_sample=False, micro_batch_size=2)
    first, _ = generate_in_buckets(decoder, ids, mask, config, eos_token_id=2, pad_token_id=3)
    assert decoder.fused.loads == 1  # three buckets, one weight copy
    np.testing.assert_array_equal(first.numpy(), generate(model, ids, mask, config, 2, 3)[0].numpy())

    opt = paddle.optimizer.SGD(learning_rate=0.5, parameters=model.parameters())
    model.train()
    model(input_ids=ids, attention_mask=mask, return_dict=True).logits[:, :, 7].mean().backward()
    opt.step()
    model.eval()
    # the fused copy is stale until it is told so (the trainer does after every update) and the next
    # generation call refreshes it
    name = "llama.layers.0.mlp.down_proj.weight"
    assert not np.allclose(decoder.fused.copy.state_dict()[name].numpy(), model.state_dict()[name].numpy())
    decoder.weights_changed()
    second, _ = generate_in_buckets(decoder, ids, mask, config, eos_token_id=2, pad_token_id=3)
    assert decoder.fused.loads == 2
    generate_in_buckets(decoder, ids, mask, config, eos_token_id=2, pad_token_id=3)
    assert decoder.fused.loads == 2  # unchanged weights are not copied again
    np.testing.assert_array_equal(second.numpy(), generate(model, ids, mask, config, 2, 3)[0].numpy())
    assert not np.array_equal(first.numpy(), second.numpy())  # the update changed the rollout
    decoder.release()
    assert decoder.cache is None


def test_selection_cpu_build_gpu_without_ops_warns_once_gpu_with_ops(monkeypatch, caplog):
    # this CPU environment has no paddlenlp_ops (and its paddle lacks fused_moe, which the module imports)
    assert fused_inference.fused_unavailable_reason() is not None
    model = make_model()
    with caplog.at_level(logging.WARNING, logger="ppo"):
        assert type(rollout_decoder(model)) is InferenceModel  # CPU build: no warning
        assert not caplog.records
        monkeypatch.setattr(parallel, "device", lambda: "gpu")
        monkeypatch.setattr(fused_inference, "fused_unavailable_reason",
                            lambda: "ModuleNotFoundError: No module named 'paddlenlp_ops'")
        monkeypatch.setattr(fused_inference, "_warned", False)
        assert type(rollout_decoder(model)) is InferenceModel
        assert type(rollout_decoder(model, static_decode=True)) is InferenceModel
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "paddlenlp_ops" in warnings[0]
        monkeypatch.setattr(fused_inference, "fused_unavailable_reason", lambda: None)
        decoder = rollout_decoder(model, dtype="bfloat16")
        assert type(decoder) is FusedInferenceModel and decoder.dtype == "bfloat16" and decoder.model is model
        assert type(rollout_decoder(model)) is InferenceModel  # float32 training
        # a model the fused kernels cannot reproduce falls back (with the one warning already given)
        model.config.rope_scaling_type = "linear"
        assert type(rollout_decoder(model)) is InferenceModel


def test_unsupported_configs_are_named():
    config = make_model().config
    assert fused_inference.unsupported_config(config) is None
    config.rope_scaling_factor = 2.0
    assert "rotary scaling" in fused_inference.unsupported_config(config)
    config.rope_scaling_factor = 1.0
    config.tensor_parallel_degree = 8  # 4 heads
    assert "not divisible" in fused_inference.unsupported_config(config)


def test_ppo_refreshes_the_fused_copy_after_each_update_only(tiny_dir, tmp_path, monkeypatch):
    """The PPO trainer with the fused decoder (over the stand-in): every prefill decodes the actor's
    current weights, and the copy is refreshed once per generation call after an update, not for
    unchanged weights (the evaluation before training and the first rollout share one copy)."""
    import ppo.stages.ppo.roles as models_module
    import ppo.stages.ppo.trainer as trainer_module
    from ppo.args import PPOArgs
    from ppo.models import load_score_model

    load_score_model(str(tiny_dir / "base")).save_pretrained(str(tmp_path / "rm"))
    from paddlenlp.transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tiny_dir / "base")).save_pretrained(str(tmp_path / "rm"))
    monkeypatch.setattr(models_module, "rollout_decoder",
                        lambda model, static_decode=False, dtype=None: FusedInferenceModel(model, factory=ContractLlama))
    args = PPOArgs(actor_model_name_or_path=str(tiny_dir / "base"), reward_model_name_or_path=str(tmp_path / "rm"),
                   train_datasets="tiny-prompts/train", eval_datasets="tiny-prompts/eval",
                   output_dir=str(tmp_path / "ppo"), max_length=48, max_new_tokens=6, per_device_prompt_batch_size=4,
                   per_device_train_batch_size=4, per_device_eval_batch_size=12, learning_rate=1e-3,
                   critic_learning_rate=1e-3, max_steps=2, eval_steps=10, logging_steps=1, disable_tqdm=True, seed=3)
    trainer = trainer_module.PPOTrainer(args)
    decoder = trainer.models.decoder
    assert type(decoder) is FusedInferenceModel
    monkeypatch.setattr(ContractLlama, "live", trainer.models.actor)
    trainer.train()
    # eval at 0 (two batches) and rollout 1: one copy; rollout 2 after update 1; final eval after update 2
    assert decoder.fused.loads == 3


# ---------------------------------------------------------------------------------------------
# Qwen2 (q/k/v biases, tied or untied head) on PaddleNLP's fused Qwen2, through the same adapter


def qwen2_model(tied=False, **extra):
    paddle.seed(0)
    config = Qwen2Config(**QWEN2_DIMS, tie_word_embeddings=tied)
    for key, value in extra.items():  # after construction: __init__ resets fuse_attention_*
        setattr(config, key, value)
    model = Qwen2ForCausalLM(config)
    assert hasattr(model.qwen2.layers[0].self_attn, "qkv_proj") == bool(extra.get("fuse_attention_qkv"))
    randomize_biases(model)
    model.eval()
    return model


@pytest.mark.parametrize("tied,extra", [(False, {}), (True, {}), (False, {"fuse_attention_qkv": True}),
                                        (True, {"fuse_attention_qkv": True, "fuse_attention_ffn": True})],
                         ids=["untied", "tied", "fused-qkv", "tied-fused-weights"])
def test_qwen2_greedy_tokens_equal_the_training_model(tied, extra):
    model = qwen2_model(tied, **extra)
    decoder = FusedInferenceModel(model, factory=ContractQwen2)
    if not extra:  # the same parameter names: the copy must hold the live weights at every prefill
        decoder_class = type("Live", (ContractQwen2,), {"live": model})
        decoder = FusedInferenceModel(model, factory=decoder_class)
    assert_same_greedy(decoder, model, GenerationConfig(max_new_tokens=8, do_sample=False, repetition_penalty=1.3))
    assert decoder.fused.loads == 1


def test_a_fused_qwen2_qkv_bias_is_split_per_kv_head():
    """The fused bias [per kv head: its query heads, its key, its value] goes to q / k / v by head."""
    model = qwen2_model(fuse_attention_qkv=True)
    state = fused_model_state(model)
    fused_bias = model.state_dict()["qwen2.layers.1.self_attn.qkv_proj.bias"].numpy()
    D, groups = 16, 2  # head_dim 64 / 4; 4 query heads over 2 kv heads
    blocks = fused_bias.reshape(2, groups + 2, D)  # naive reference: [kv head][q.., k, v][D]
    np.testing.assert_array_equal(state["qwen2.layers.1.self_attn.q_proj.bias"], blocks[:, :groups].reshape(-1))
    np.testing.assert_array_equal(state["qwen2.layers.1.self_attn.k_proj.bias"], blocks[:, groups].reshape(-1))
    np.testing.assert_array_equal(state["qwen2.layers.1.self_attn.v_proj.bias"], blocks[:, groups + 1].reshape(-1))
    assert "qwen2.layers.1.self_attn.qkv_proj.bias" not in state


def test_qwen2_selects_the_fused_model_and_mistral_falls_back_with_one_warning(monkeypatch, caplog):
    import importlib.util
    import os

    from paddlenlp.transformers import MistralConfig

    from ppo.models.families import family_named
    from ppo.models.families.mistral import MistralForCausalLM

    # the class the Qwen2 family names exists in PaddleNLP's fused package (which cannot import on CPU)
    name = family_named("qwen2").fused_inference_name
    package = os.path.dirname(importlib.util.find_spec("paddlenlp").origin)
    with open(os.path.join(package, "experimental", "transformers", "qwen2", "modeling.py")) as f:
        assert f"class {name}(" in f.read()
    monkeypatch.setattr(parallel, "device", lambda: "gpu")
    monkeypatch.setattr(fused_inference, "fused_unavailable_reason", lambda: None)
    monkeypatch.setattr(fused_inference, "_warned", False)
    for tied in (False, True):
        decoder = rollout_decoder(qwen2_model(tied), dtype="bfloat16")
        assert type(decoder) is FusedInferenceModel and decoder.dtype == "bfloat16"
    paddle.seed(0)
    mistral = MistralForCausalLM(MistralConfig(**{k: v for k, v in QWEN2_DIMS.items()}))
    with caplog.at_level(logging.WARNING, logger="ppo"):
        assert type(rollout_decoder(mistral, dtype="bfloat16")) is InferenceModel
        assert type(rollout_decoder(mistral, dtype="bfloat16")) is InferenceModel
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no fused inference model for the mistral family" in warnings[0]
