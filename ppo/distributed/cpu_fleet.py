"""Make fleet's tensor-parallel and pipeline-parallel paths run over gloo on a CPU build.

Paddle's CPU wheel ships fleet's mp/pp code but not what it needs underneath: some collective
kernels have no CPU version and the gloo process group lacks the ``*_on_calc_stream`` methods.
``enable_cpu_fleet()`` patches those gaps at the Python level, once, before ``fleet.init``:

1. ``TensorParallel`` input broadcast asserts a gpu/xpu/custom device: broadcast on CPU instead.
2. ``PipelineLayer`` reads ``ParallelEnv().device_id``, never set on CPU: default it to 0.
3. ``ProcessGroupGloo`` gets the ``*_on_calc_stream`` methods, delegating to its plain (synchronous)
   ones; pipeline p2p uses the blocking-safe order and whole-tensor sends (gloo has no partial send).
4. ``mp_ops._c_identity`` / ``_mp_allreduce`` / ``_c_concat`` / ``_c_split`` /
   ``_c_softmax_with_cross_entropy`` (no CPU kernels, or an in-place reduction autograd trips on)
   become PyLayers over plain ``paddle.distributed`` collectives, out of place.
5. Each new gloo group rendezvouses in a private store: in the shared one, groups created by
   different ranks at once (4+ ranks) read each other's stale keys.
6. Group-sharded stage 2 (``sharding stage2``): ``group_sharded_parallel`` and its optimizer assert
   a GPU, the optimizer and its gradient clip parse a device id out of the device name ("gpu:0"),
   and the parameter storage moves each parameter "to the host" and clears it, which on CPU is the
   same tensor (the data is lost).  The wrapper builds the same two stage-2 classes for "cpu", the
   optimizer is constructed and clips under the name "cpu:0", and parameters are copied into the
   storage in place.

On a GPU, XPU or custom-device build with a device present it does nothing.  The patched names are
private paddle internals: written for paddle 3.3.1 and also tested on 3.0.0; any other major.minor
is refused rather than patched blind.
"""

from __future__ import annotations

import inspect
import os
import socket

import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer

from ppo.core.errors import UserError

WRITTEN_FOR = "3.3.1"
SUPPORTED = ("3.3", "3.0")

_ENABLED = False


def enable_cpu_fleet() -> bool:
    """Patch fleet for tensor/pipeline parallel over gloo on CPU; call once before ``fleet.init``.

    Returns True when it patched something, False on an accelerator build or when already enabled.
    """
    global _ENABLED
    if _ENABLED or _on_accelerator():
        return False
    version = ".".join(paddle.__version__.split(".")[:2])
    if version not in SUPPORTED:
        raise UserError(f"paddle {paddle.__version__}: ppo.distributed.cpu_fleet patches private fleet internals of "
                        f"paddle {' / '.join(SUPPORTED)} (written for {WRITTEN_FOR}); install one of those "
                        f"to run tensor or pipeline parallel on CPU")
    _patch_broadcast_input_data()
    _patch_device_id()
    _patch_gloo_calc_stream()
    _patch_pipeline_p2p()
    _patch_mp_ops()
    _patch_new_group()
    _patch_group_sharded_stage2()
    _ENABLED = True
    return True


def _on_accelerator() -> bool:
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return True
    return paddle.is_compiled_with_xpu() or bool(paddle.device.get_all_custom_device_type())


# 1. TensorParallel._pre_forward -> broadcast_input_data asserts gpu/xpu/custom; the nested
#    broadcast it wraps works on CPU tensors as they are.
def _broadcast_input_data(hcg, *inputs, **kwargs):
    from paddle.distributed.fleet.utils import hybrid_parallel_util as hpu

    if inputs:
        inputs = hpu._broadcast_nested_data(hcg, "cpu", paddle.CPUPlace(), inputs)
    if kwargs:
        kwargs = hpu._broadcast_nested_data(hcg, "cpu", paddle.CPUPlace(), kwargs)
    return inputs, kwargs


def _patch_broadcast_input_data():
    from paddle.distributed.fleet.meta_parallel import tensor_parallel
    from paddle.distributed.fleet.utils import hybrid_parallel_util

    hybrid_parallel_util.broadcast_input_data = _broadcast_input_data
    tensor_parallel.broadcast_input_data = _broadcast_input_data  # imported by name there


# 2. PipelineLayer.__init__ reads ParallelEnv().device_id; only accelerator builds set _device_id.
#    A class default is used by every instance that did not set its own.
def _patch_device_id():
    dist.ParallelEnv._device_id = 0


# 3. The gloo group implements only the plain, synchronous methods; the mp layers and pipeline p2p
#    call the *_on_calc_stream ones.  A synchronous call is already ordered like the calc stream.
_SUM = paddle.base.core.ReduceOp.SUM
_GLOO_CALC_STREAM = {
    "all_reduce_on_calc_stream": lambda pg, t, op=_SUM: pg.all_reduce(t, op, True),
    "broadcast_on_calc_stream": lambda pg, t, src: pg.broadcast(t, src, True),
    "reduce_on_calc_stream": lambda pg, t, dst, op=_SUM: pg.reduce(t, dst, op, True),
    "all_gather_on_calc_stream": lambda pg, out, t: pg.all_gather(out, t, True),
    "all_gather_into_tensor_on_calc_stream": lambda pg, out, t: pg.all_gather_into_tensor(out, t, True),
    "send_on_calc_stream": lambda pg, t, dst: pg.send(t, dst, True),
    "recv_on_calc_stream": lambda pg, t, src: pg.recv(t, src, True),
}


def _patch_gloo_calc_stream():
    for name, method in _GLOO_CALC_STREAM.items():
        setattr(paddle.base.core.ProcessGroupGloo, name, method)


# Gloo's send blocks until the peer receives, so the default batched order (both neighbours send
# first) deadlocks: use the order paddle keeps for devices without async send.  Gloo has no
# send_partial either: send whole tensors (then the mp all-gather after recv is skipped too).
def _patch_pipeline_p2p():
    from paddle.distributed.fleet.meta_parallel.pp_utils import p2p_communication as p2p

    p2p._sync_send = True
    p2p._is_valid_send_recv_partial = lambda tensor, mp_degree: False


# 4. Model-parallel ops.  Forward and backward use plain collectives on copies: the stock
#    _mp_allreduce reduces in place a tensor autograd saved, which TP backward rejects.
def _all_reduce_copy(x, group, op=dist.ReduceOp.SUM):
    out = x.clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def _all_gather_last(x, group):
    parts = []
    dist.all_gather(parts, x, group=group)
    return paddle.concat(parts, axis=-1)


def _own_chunk_last(x, group):
    return paddle.split(x, group.nranks, axis=-1)[group.rank].clone()


class _Identity(PyLayer):
    """c_identity: forward x, backward the sum of the grads over the group."""

    @staticmethod
    def forward(ctx, x, group, skip):
        ctx.group = group
        return x if skip else x.clone()

    @staticmethod
    def backward(ctx, dy):
        return _all_reduce_copy(dy, ctx.group)


class _AllReduce(PyLayer):
    """mp_allreduce_sum: forward the sum over the group, backward the grad as it is."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx, dy):
        return dy


class _Concat(PyLayer):
    """c_concat: forward all-gather along the last axis, backward this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, dy):
        return _own_chunk_last(dy, ctx.group)


class _Split(PyLayer):
    """c_split: forward this rank's slice of the last axis, backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_chunk_last(x, group)

    @staticmethod
    def backward(ctx, dy):
        return _all_gather_last(dy, ctx.group)


class _VocabParallelCrossEntropy(PyLayer):
    """c_softmax_with_cross_entropy: logits ``[..., V/n]`` (this rank's vocab slice), label ``[..., 1]``
    global ids -> loss ``[..., 1]`` = logsumexp(all logits) - logit[label]; 0 where label == ignore_index.
    Grad w.r.t. the slice: softmax - onehot(label), times the loss grad."""

    @staticmethod
    def forward(ctx, logits, label, group, ignore_index):
        vocab = logits.shape[-1]
        local = label - group.rank * vocab
        inside = paddle.logical_and(local >= 0, local < vocab)
        local = paddle.where(inside, local, paddle.zeros_like(local))
        shifted = logits - _all_reduce_copy(logits.max(axis=-1, keepdim=True), group, dist.ReduceOp.MAX)
        exp = paddle.exp(shifted)
        total = _all_reduce_copy(exp.sum(axis=-1, keepdim=True), group)
        # (broadcast=False: paddle's default copies the [B, T, V] logits first)
        picked = paddle.take_along_axis(shifted, local, axis=-1, broadcast=False) * inside.astype(logits.dtype)
        picked = _all_reduce_copy(picked, group)
        keep = (label != ignore_index).astype(logits.dtype)
        loss = (paddle.log(total) - picked) * keep
        softmax = exp / total
        ctx.save_for_backward(softmax, local, inside, keep)
        return loss, softmax

    @staticmethod
    def backward(ctx, dloss, *unused):
        softmax, local, inside, keep = ctx.saved_tensor()
        onehot = paddle.nn.functional.one_hot(local.squeeze(-1), softmax.shape[-1]).astype(softmax.dtype)
        grad = softmax - onehot * inside.astype(softmax.dtype)
        return grad * (dloss * keep), None


def _dygraph_or(original, impl):
    """``impl`` in dynamic mode, called with ``original``'s arguments by name and ``group`` resolved
    as paddle does (None: the default group; not a member: return None); static mode keeps ``original``."""
    signature = inspect.signature(original)

    def patched(*args, **kwargs):
        if not paddle.in_dynamic_mode():
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        params = bound.arguments
        if params["group"] is None:
            params["group"] = dist.collective._get_default_group()
        elif not params["group"].is_member():
            return None
        return impl(**params)

    return patched


def _identity(tensor, group, skip_c_identity_dynamic):
    return _Identity.apply(tensor, group, skip_c_identity_dynamic)


def _mp_allreduce(tensor, op, group, use_calc_stream, use_model_parallel, skip_c_identity_dynamic):
    assert op == dist.ReduceOp.SUM, f"Unknown parameter: {op}."
    return _AllReduce.apply(tensor, group)


def _softmax_with_cross_entropy(logits, label, group, return_softmax, ignore_index):
    if label.ndim == logits.ndim - 1:
        label = label.unsqueeze(-1)
    loss, softmax = _VocabParallelCrossEntropy.apply(logits, label, group, ignore_index)
    return (loss, softmax) if return_softmax else loss


_MP_OPS = {
    "_c_identity": _identity,
    "_mp_allreduce": _mp_allreduce,
    "_c_concat": lambda tensor, group: _Concat.apply(tensor, group),
    "_c_split": lambda tensor, group: _Split.apply(tensor, group),
    "_c_softmax_with_cross_entropy": _softmax_with_cross_entropy,
}


def _patch_mp_ops():
    # Callers reach these as mp_ops.X (fleet layers) or paddle.distributed.collective.X (paddlenlp).
    from paddle.distributed import collective
    from paddle.distributed.fleet.layers.mpu import mp_ops

    for name, impl in _MP_OPS.items():
        patched = _dygraph_or(getattr(mp_ops, name), impl)
        setattr(mp_ops, name, patched)
        setattr(collective, name, patched)


# 5. ProcessGroupGloo's constructor also rendezvouses through the shared store under keys without
#    a group prefix, so with 4+ ranks a rank can read another group's stale address ("connect ...:
#    Connection refused").  Each new gloo group gets a private store; its leader publishes the
#    address under a key unique to the group id.
_GROUP_STORES = []  # keep each group's store (and the leader's server) alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _patch_new_group():
    from paddle.distributed import collective

    original = collective._new_process_group_impl

    def new_process_group(backend, store, rank, world_size, *args, group_id=0, **kwargs):
        if backend == "gloo":
            key = f"ppo.distributed.cpu_fleet/gloo_group_store/{group_id}"
            if rank == 0:
                host = os.environ.get("PADDLE_CURRENT_ENDPOINT", "127.0.0.1:0").rsplit(":", 1)[0]
                store.set(key, f"{host}:{_free_port()}".encode())
            store.wait(key)
            host, port = bytes(store.get(key)).decode().rsplit(":", 1)
            store = paddle.base.core.TCPStore(host, int(port), rank == 0, world_size)
            _GROUP_STORES.append(store)
        return original(backend, store, rank, world_size, *args, group_id=group_id, **kwargs)

    collective._new_process_group_impl = new_process_group


# 6. Group-sharded stage 2 on CPU.
def _group_sharded_parallel_cpu(model, optimizer, level, scaler=None, group=None, offload=False,
                                sync_buffers=False, buffer_max_size=2**23, segment_size=2**20, sync_comm=False,
                                dp_group=None, exclude_layer=None):
    """paddle's ``group_sharded_parallel`` for levels 'os' / 'os_g' with device 'cpu' (its own
    device check admits accelerators only)."""
    from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_optimizer_stage2 import (
        GroupShardedOptimizerStage2,
    )
    from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_stage2 import GroupShardedStage2

    if level not in ("os", "os_g"):
        raise UserError(f"group-sharded level {level!r} runs on GPU builds only; on CPU use stage 1 or 2")
    optimizer = GroupShardedOptimizerStage2(params=optimizer._parameter_list, optim=optimizer, group=group,
                                            offload=offload, dp_group=dp_group, device="cpu")
    model = GroupShardedStage2(model, optimizer, group=group, sync_buffers=sync_buffers,
                               buffer_max_size=buffer_max_size, dp_group=dp_group, device="cpu")
    return model, optimizer, scaler


class _DeviceName:
    """Within the block ``paddle.get_device()`` names the CPU "cpu:0" (and, with ``cuda``, the
    build claims CUDA for the optimizer's entry assert only)."""

    def __init__(self, module, attr="get_device", cuda=False):
        self.module, self.attr, self.cuda = module, attr, cuda

    def __enter__(self):
        from paddle.base import core

        self.saved = getattr(self.module, self.attr), core.is_compiled_with_cuda
        setattr(self.module, self.attr, lambda: "cpu:0")
        if self.cuda:
            core.is_compiled_with_cuda = lambda: True

    def __exit__(self, *exc):
        from paddle.base import core

        setattr(self.module, self.attr, self.saved[0])
        core.is_compiled_with_cuda = self.saved[1]


def _patch_group_sharded_stage2():
    import paddle.distributed.sharding as sharding
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_optimizer_stage2 as stage2_opt
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_storage as storage
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_utils as utils
    from paddle.distributed.sharding import group_sharded

    sharding.group_sharded_parallel = _group_sharded_parallel_cpu
    group_sharded.group_sharded_parallel = _group_sharded_parallel_cpu

    init = stage2_opt.GroupShardedOptimizerStage2.__init__

    def optimizer_init(self, *args, **kwargs):
        # the device-name parsing happens with paddle.get_device; device_guard restores devices
        # through paddle.device.get_device, which stays truthful
        with _DeviceName(paddle, cuda=True):
            init(self, *args, **kwargs)

    stage2_opt.GroupShardedOptimizerStage2.__init__ = optimizer_init

    clip = utils.GroupShardedClipGrad._dygraph_clip

    def dygraph_clip(self, params_grads):
        # "cpu" would send the norm to a CUDA device; "cpu:0" keeps it here
        with _DeviceName(paddle.device):
            return clip(self, params_grads)

    utils.GroupShardedClipGrad._dygraph_clip = dygraph_clip

    add = storage.ParamStorage.add_rank_params

    def add_rank_params(self, trainable_params, param2align, convert_gpu=True):
        return add(self, trainable_params, param2align, False)  # CPU: copy in place, nothing to move

    storage.ParamStorage.add_rank_params = add_rank_params
    storage.cvt_to_device = lambda x, dev_id, blocking=True: x  # CPU buffers stay on the CPU
