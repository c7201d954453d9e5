"""2 ranks, mp_degree=2: every op and gloo method ppo.distributed.cpu_fleet adapts, against plain references.

Usage: python -m paddle.distributed.launch --nproc_per_node 2 cpu_fleet_ops.py OUT_DIR
Writes OUT_DIR/rank<k>.json: {"errors": {check: max abs error}, "flags": {check: bool}}.
"""

import sys

import _common  # puts the repo on sys.path; finish() at the end
import numpy as np
import paddle
import paddle.distributed as dist

from ppo.distributed.cpu_fleet import enable_cpu_fleet


def rng(seed):
    return np.random.default_rng(seed)


def t(a, grad=False):
    x = paddle.to_tensor(np.asarray(a, dtype="float32"))
    x.stop_gradient = not grad
    return x


def err(a, b):
    return float(np.max(np.abs(np.asarray(a, dtype="float64") - np.asarray(b, dtype="float64"))))


def check_mp_ops(group, r, errors):
    coll = paddle.distributed.collective
    n = group.nranks

    # identity: forward x, backward sum over ranks of the grads
    x_np, w = rng(0).normal(size=(3, 4)), [rng(10 + k).normal(size=(3, 4)) for k in range(n)]
    x = t(x_np, grad=True)
    y = coll._c_identity(x, group=group)
    (y * t(w[r])).sum().backward()
    errors["identity_fwd"] = err(y.numpy(), x_np)
    errors["identity_bwd"] = err(x.grad.numpy(), sum(w))

    # mp allreduce: forward sum over ranks, backward identity; out of place, so an input
    # autograd saved (tanh keeps its output) stays intact
    xs = [rng(20 + k).normal(size=(3, 4)) for k in range(n)]
    x = t(xs[r], grad=True)
    h = paddle.tanh(x)
    y = coll._mp_allreduce(h, group=group)
    (y * t(w[r])).sum().backward()
    errors["allreduce_fwd"] = err(y.numpy(), sum(np.tanh(a) for a in xs))
    errors["allreduce_input_kept"] = err(h.numpy(), np.tanh(xs[r]))
    errors["allreduce_bwd"] = err(x.grad.numpy(), w[r] * (1 - np.tanh(xs[r]) ** 2))

    # concat: forward all-gather along the last axis, backward this rank's slice
    xs = [rng(30 + k).normal(size=(2, 3, 4)) for k in range(n)]
    g_np = rng(40).normal(size=(2, 3, 4 * n))
    x = t(xs[r], grad=True)
    y = coll._c_concat(x, group=group)
    (y * t(g_np)).sum().backward()
    errors["concat_fwd"] = err(y.numpy(), np.concatenate(xs, axis=-1))
    errors["concat_bwd"] = err(x.grad.numpy(), g_np[..., r * 4:(r + 1) * 4])

    # split: forward this rank's slice, backward all-gather
    x_np = rng(50).normal(size=(2, 3, 4 * n))
    x = t(x_np, grad=True)
    y = coll._c_split(x, group=group)
    (y * t(w[r][0])).sum().backward()
    errors["split_fwd"] = err(y.numpy(), x_np[..., r * 4:(r + 1) * 4])
    errors["split_bwd"] = err(x.grad.numpy(), np.broadcast_to(np.concatenate([a[0] for a in w], -1), x_np.shape))


def check_softmax_ce(group, r, errors):
    n, vocab, rows = group.nranks, 8, 7
    part = vocab // n
    logits_np = rng(60).normal(size=(rows, vocab)) * 3
    label_np = np.array([0, 3, 4, 7, 5, -100, 1])
    gw = rng(61).normal(size=(rows, 1))
    # numpy full-vocab reference
    shifted = logits_np - logits_np.max(-1, keepdims=True)
    softmax = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    keep = (label_np != -100)[:, None]
    safe = np.where(label_np < 0, 0, label_np)
    ref_loss = (np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(rows), safe])[:, None] * keep
    ref_grad = (softmax - np.eye(vocab)[safe]) * gw * keep

    logits = t(logits_np[:, r * part:(r + 1) * part], grad=True)
    label = paddle.to_tensor(label_np[:, None].astype("int64"))
    loss, soft = paddle.distributed.collective._c_softmax_with_cross_entropy(
        logits, label, group=group, return_softmax=True, ignore_index=-100)
    (loss * t(gw)).sum().backward()
    errors["softmax_ce_loss"] = err(loss.numpy(), ref_loss)
    errors["softmax_ce_softmax"] = err(soft.numpy(), softmax[:, r * part:(r + 1) * part])
    errors["softmax_ce_grad"] = err(logits.grad.numpy(), ref_grad[:, r * part:(r + 1) * part])
    # 3-D logits with a label lacking the trailing 1, through fleet's ParallelCrossEntropy
    from paddle.distributed.fleet.meta_parallel import ParallelCrossEntropy

    loss3 = ParallelCrossEntropy(mp_group=group)(
        t(logits_np.reshape(1, rows, vocab)[..., r * part:(r + 1) * part]),
        paddle.to_tensor(label_np.reshape(1, rows).astype("int64")))
    errors["softmax_ce_loss_3d"] = err(loss3.numpy().reshape(rows, 1), ref_loss)


def check_gloo_methods(group, r, errors, flags):
    pg, n = group.process_group, group.nranks
    op = paddle.base.core.ReduceOp
    xs = [rng(70 + k).normal(size=(2, 3)) for k in range(n)]

    def both(calc, plain, make):
        """The calc-stream call and the plain one, each on a fresh input from make()."""
        a, b = make(), make()
        task = calc(a)
        flags.setdefault("tasks_have_wait", True)
        flags["tasks_have_wait"] &= hasattr(task, "wait")
        task.wait()
        plain(b).wait()
        return a, b

    for name, (reduce_op, ref) in {"sum": (op.SUM, sum(xs)), "max": (op.MAX, np.maximum(*xs))}.items():
        a, b = both(lambda x: pg.all_reduce_on_calc_stream(x, reduce_op),
                    lambda x: pg.all_reduce(x, reduce_op, True), lambda: t(xs[r]))
        errors[f"all_reduce_on_calc_stream_{name}"] = err(a.numpy(), ref) + err(a.numpy(), b.numpy())
    a = t(xs[r])
    pg.all_reduce_on_calc_stream(a).wait()  # default op is SUM
    errors["all_reduce_on_calc_stream_default"] = err(a.numpy(), sum(xs))

    a, b = both(lambda x: pg.broadcast_on_calc_stream(x, 1), lambda x: pg.broadcast(x, 1, True), lambda: t(xs[r]))
    errors["broadcast_on_calc_stream"] = err(a.numpy(), xs[1]) + err(a.numpy(), b.numpy())

    a, b = both(lambda x: pg.reduce_on_calc_stream(x, 0, op.SUM), lambda x: pg.reduce(x, 0, op.SUM, True),
                lambda: t(xs[r]))
    if r == 0:  # only the destination's buffer is defined after a reduce
        errors["reduce_on_calc_stream"] = err(a.numpy(), sum(xs)) + err(a.numpy(), b.numpy())

    outs = [[paddle.zeros([2, 3]) for _ in range(n)] for _ in range(2)]
    pg.all_gather_on_calc_stream(outs[0], t(xs[r])).wait()
    pg.all_gather(outs[1], t(xs[r]), True).wait()
    errors["all_gather_on_calc_stream"] = max(err(o.numpy(), x) + err(o.numpy(), p.numpy())
                                              for o, p, x in zip(outs[0], outs[1], xs))

    a, b = paddle.zeros([2 * n, 3]), paddle.zeros([2 * n, 3])
    pg.all_gather_into_tensor_on_calc_stream(a, t(xs[r])).wait()
    pg.all_gather_into_tensor(b, t(xs[r]), True).wait()
    errors["all_gather_into_tensor_on_calc_stream"] = err(a.numpy(), np.concatenate(xs)) + err(a.numpy(), b.numpy())

    # send/recv: 0 -> 1 on the calc-stream methods, then 1 -> 0 on the plain ones
    got = paddle.zeros([2, 3])
    if r == 0:
        pg.send_on_calc_stream(t(xs[0]), 1).wait()
        pg.recv(got, 1, True).wait()
        errors["send_recv_on_calc_stream"] = err(got.numpy(), xs[1])
    else:
        pg.recv_on_calc_stream(got, 0).wait()
        pg.send(t(xs[1]), 0, True).wait()
        errors["send_recv_on_calc_stream"] = err(got.numpy(), xs[0])


def check_small_patches(hcg, r, errors, flags):
    from paddle.distributed.fleet.meta_parallel import tensor_parallel

    # the TP input broadcast: rank 0's inputs reach every rank, positional and keyword
    x, y = t(np.full((2, 3), float(r))), paddle.to_tensor(np.full((2,), 10 + r, dtype="int64"))
    tensor_parallel.broadcast_input_data(hcg, x, key=y)
    errors["broadcast_input_data"] = err(x.numpy(), 0.0) + err(y.numpy(), 10)
    flags["device_id_is_0"] = dist.ParallelEnv().device_id == 0


def main():
    from _common import start_fleet, write_result

    out_dir = sys.argv[1]
    patched, hcg = start_fleet(mp_degree=2)
    group, r = hcg.get_model_parallel_group(), hcg.get_model_parallel_rank()
    errors, flags = {}, {"first_call_patched": patched, "second_call_noop": enable_cpu_fleet() is False}
    check_mp_ops(group, r, errors)
    check_softmax_ce(group, r, errors)
    check_gloo_methods(group, r, errors, flags)
    check_small_patches(hcg, r, errors, flags)
    write_result(out_dir, dist.get_rank(), {"errors": errors, "flags": flags})


if __name__ == "__main__":
    main()
    _common.finish()
