"""Offloading model and optimizer state: bitwise round trips, identity, memory really released."""

import gc
import os

import numpy as np
import paddle
import psutil
import pytest

from ppo.core.errors import UserError
from ppo.distributed.offload import (FileStore, default_store, offload_model, offload_optimizer,
                         parse_offload_level, reload_model, reload_optimizer, _return_freed_memory)


def snapshot(tensors):
    """Everything the round trip must keep, per tensor object."""
    return {id(t): (t.name, t.dtype, tuple(t.shape), t.stop_gradient, t.numpy().tobytes()) for t in tensors}


def model_tensors(model):
    return list(model.parameters()) + list(model.buffers())


def optimizer_tensors(opt):
    return [t for per_param in opt._accumulators.values() for t in per_param.values()]


def assert_released(tensors):
    for t in tensors:
        assert not t._is_initialized(), t.name


def tiny_llama():
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    paddle.seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, dtype="float32",
                         use_flash_attention=False)
    return LlamaForCausalLM(config)


def llama_logits(model):
    with paddle.no_grad():
        out = model(paddle.to_tensor([[1, 5, 9, 42, 7]]))
    return (out[0] if isinstance(out, tuple) else out).numpy()


class MixedDtypes(paddle.nn.Layer):
    """Parameters and buffers in the dtypes a round trip through numpy could get wrong."""

    def __init__(self):
        super().__init__()
        normal = paddle.nn.initializer.Normal()
        self.bf16 = self.create_parameter([5, 3], dtype="bfloat16", default_initializer=normal)
        self.fp16 = self.create_parameter([7], dtype="float16", default_initializer=normal)
        self.register_buffer("steps", paddle.to_tensor([3, -1, 2**40], dtype="int64"))
        self.register_buffer("mask", paddle.to_tensor([True, False, True]), persistable=False)
        self.register_buffer("scalar", paddle.to_tensor(1.5, dtype="float64"))


def mlp(seed):
    paddle.seed(seed)
    return paddle.nn.Sequential(paddle.nn.Linear(8, 16), paddle.nn.LayerNorm(16), paddle.nn.GELU(),
                                paddle.nn.Linear(16, 4))


def rss_mb():
    return psutil.Process().memory_info().rss / 2**20


# ---------------------------------------------------------------------------------------------


def test_parse_offload_level():
    assert parse_offload_level("") == frozenset()
    assert parse_offload_level(" freeze_model  optimizer ") == {"freeze_model", "optimizer"}
    assert parse_offload_level("freeze_model optimizer train_model") == {
        "freeze_model", "optimizer", "train_model"}
    with pytest.raises(UserError) as err:
        parse_offload_level("freeze_model optimzer")
    message = str(err.value)
    assert "\n" not in message and "'optimzer'" in message and "did you mean 'optimizer'" in message
    assert all(word in message for word in ("freeze_model", "optimizer", "train_model"))


def test_llama_round_trip_is_bitwise_and_keeps_identity(tmp_path):
    model = tiny_llama()
    tensors = model_tensors(model)
    assert len(list(model.buffers())) > 0  # rotary tables: buffers are covered, not only parameters
    before = snapshot(tensors)
    ids = [id(t) for t in tensors]
    logits = llama_logits(model)

    with FileStore(str(tmp_path)) as store:
        offload_model(model, store, "ref")
        assert_released(tensors)
        assert [tuple(t.shape) for t in tensors] == [b[2] for b in before.values()]  # metadata stays
        files = os.listdir(store.dir)
        assert len(files) == 1
        offload_model(model, store, "ref")  # already offloaded: nothing new written
        assert os.listdir(store.dir) == files

        reload_model(model, store, "ref")
        reload_model(model, store, "ref")  # already resident: no-op
        assert os.listdir(store.dir) == []  # the group's file goes once it is read back

    assert [id(t) for t in model_tensors(model)] == ids
    assert snapshot(model_tensors(model)) == before
    assert np.array_equal(llama_logits(model), logits)


def test_round_trip_of_every_dtype(tmp_path):
    layer = MixedDtypes()
    tensors = model_tensors(layer)
    assert len(tensors) == 5
    before = snapshot(tensors)
    with FileStore(str(tmp_path)) as store:
        offload_model(layer, store)  # key defaults to the model itself
        assert_released(tensors)
        reload_model(layer, store)
    assert snapshot(model_tensors(layer)) == before
    assert layer.bf16.dtype == paddle.bfloat16


def test_optimizer_round_trip_and_next_step_match_a_twin_never_offloaded(tmp_path):
    models = [mlp(seed=1), mlp(seed=1)]
    opts = [paddle.optimizer.AdamW(learning_rate=1e-2, weight_decay=0.1, parameters=m.parameters())
            for m in models]
    paddle.seed(2)
    batches = [(paddle.randn([6, 8]), paddle.randn([6, 4])) for _ in range(3)]

    def step(model, opt, batch):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.clear_grad()

    for batch in batches[:2]:
        for model, opt in zip(models, opts):
            step(model, opt, batch)

    model, opt = models[1], opts[1]
    accumulators = optimizer_tensors(opt)
    kinds = set(opt._accumulators)
    assert {"moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc"} <= kinds
    before = snapshot(accumulators)
    params_before = snapshot(model.parameters())
    param_list = list(opt._parameter_list)

    store = FileStore(str(tmp_path))
    offload_model(model, store, "actor")
    offload_optimizer(opt, store, "actor")  # same key as the model: separate namespaces
    assert_released(accumulators)
    assert_released(model.parameters())
    offload_optimizer(opt, store, "actor")
    reload_optimizer(opt, store, "actor")
    reload_optimizer(opt, store, "actor")
    reload_model(model, store, "actor")
    store.close()

    assert snapshot(optimizer_tensors(opt)) == before
    assert snapshot(model.parameters()) == params_before
    assert all(a is b for a, b in zip(opt._parameter_list, param_list))
    assert all(a is b for a, b in zip(opt._parameter_list, model.parameters()))

    for model, opt in zip(models, opts):
        step(model, opt, batches[2])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert a.numpy().tobytes() == b.numpy().tobytes(), a.name


def test_master_weights_are_offloaded(tmp_path):
    model = mlp(seed=3)
    opt = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=model.parameters())
    # On GPUs a bfloat16 model keeps float32 master copies here; the CPU kernels have no bfloat16
    # AdamW, so plant one to check it travels with the rest of the state.
    weight = model[0].weight
    opt._master_weights[weight.name] = paddle.randn(weight.shape)
    master = opt._master_weights[weight.name]
    before = snapshot([master])
    with FileStore(str(tmp_path)) as store:
        offload_optimizer(opt, store)
        assert_released([master])
        reload_optimizer(opt, store)
    assert snapshot([opt._master_weights[weight.name]]) == before


def test_file_store_really_releases_process_memory(tmp_path):
    paddle.seed(4)
    model = paddle.nn.Sequential(*[paddle.nn.Linear(1024, 1024) for _ in range(40)])
    params = list(model.parameters())
    offloaded_mb = sum(int(np.prod(p.shape)) * 4 for p in params) / 2**20
    spot = {i: params[i].numpy().tobytes() for i in (0, 41, 79)}
    gc.collect()
    _return_freed_memory()

    store = FileStore(str(tmp_path))
    resident = rss_mb()
    offload_model(model, store)
    released = rss_mb()
    reload_model(model, store)
    reloaded = rss_mb()
    store.close()

    print(f"\noffloaded {offloaded_mb:.0f} MB of parameters: RSS {resident:.0f} MB -> "
          f"{released:.0f} MB offloaded (-{resident - released:.0f}) -> {reloaded:.0f} MB reloaded")
    assert resident - released >= offloaded_mb / 2
    assert reloaded - released >= offloaded_mb / 2
    assert all(params[i].numpy().tobytes() == data for i, data in spot.items())


def test_close_deletes_files_and_brings_back_what_is_still_held(tmp_path):
    model = mlp(seed=5)
    before = snapshot(model.parameters())
    store = FileStore(str(tmp_path))
    offload_model(model, store)
    assert os.path.isdir(store.dir) and os.listdir(store.dir)
    store.close()
    assert not os.path.exists(store.dir)
    assert os.listdir(tmp_path) == []
    assert snapshot(model.parameters()) == before  # closing never loses weights
    store.close()  # twice is fine


def test_default_store_on_cpu_is_file_backed(tmp_path):
    store = default_store(str(tmp_path))
    assert isinstance(store, FileStore) and store.dir.startswith(str(tmp_path))
    store.close()
