"""2 ranks, sharding stage 2 (paddle's group-sharded stage 2 through ``ppo.distributed.cpu_fleet``'s CPU build).

Usage: python -m paddle.distributed.launch --nproc_per_node 2 cpu_fleet_stage2.py OUT_DIR
A small MLP trains 3 AdamW steps with global-norm clipping under ``group_sharded_parallel`` (level
os_g); each rank sees its own half of every batch.  Every rank writes OUT_DIR/rank<k>.json with its
final parameters and which parameters' optimizer moments it holds; the test replays the same steps
in one process on the whole batches.
"""

import sys

import _common  # puts the repo on sys.path; finish() at the end
import numpy as np
import paddle
import paddle.distributed as dist


def batches(steps=3):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((8, 8)).astype("float32") for _ in range(steps)]


def build():
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(8, 16), paddle.nn.Tanh(), paddle.nn.Linear(16, 4))
    optimizer = paddle.optimizer.AdamW(1e-2, parameters=model.parameters(),
                                       grad_clip=paddle.nn.ClipGradByGlobalNorm(0.05))
    return model, optimizer


def loss_of(model, x):
    return model(x).square().mean()


def main():
    from _common import write_result
    from paddle.distributed import fleet

    from ppo.distributed.parallel import inner_optimizer
    from ppo.distributed.cpu_fleet import enable_cpu_fleet

    out_dir = sys.argv[1]
    patched = enable_cpu_fleet()
    paddle.set_device("cpu")
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": 2}
    fleet.init(is_collective=True, strategy=strategy)
    group = fleet.get_hybrid_communicate_group().get_sharding_parallel_group()
    model, optimizer = build()
    names = [p.name for p in model.parameters()]
    from paddle.distributed.sharding import group_sharded_parallel  # after enable_cpu_fleet: its CPU build
    model, optimizer, _ = group_sharded_parallel(model, optimizer, level="os_g", group=group)
    rank = dist.get_rank()
    for x in batches():
        loss = loss_of(model, paddle.to_tensor(x[rank * 4:(rank + 1) * 4]))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    moments = {k for k in inner_optimizer(optimizer).state_dict() if "moment1" in k}
    write_result(out_dir, rank, {
        "patched": patched,
        "params": [p.numpy().tolist() for p in model.parameters()],
        "moments_of": [i for i, n in enumerate(names) if any(k.startswith(n + "_") for k in moments)]})


if __name__ == "__main__":
    main()
    _common.finish()
