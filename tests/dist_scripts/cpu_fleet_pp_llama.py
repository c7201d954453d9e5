"""2 ranks, pp_degree=2: paddlenlp LlamaForCausalLMPipe, ``train_batch`` steps with 2 micro-batches.

Usage: python -m paddle.distributed.launch --nproc_per_node 2 cpu_fleet_pp_llama.py MODEL_DIR OUT_DIR LR STEPS [MP]
With MP=2 (and 4 ranks) every stage is also split by tensor parallel.
Rank 0 writes OUT_DIR/pp.npz (the batch and the loss of every step); every rank writes OUT_DIR/rank<k>.json.
"""

import sys

import _common  # puts the repo on sys.path; finish() at the end
import numpy as np
import paddle
import paddle.distributed as dist
from paddle.distributed import fleet


def batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(4, vocab, size=(2, 12))
    labels = rng.integers(4, vocab, size=(2, 12))
    return input_ids, np.ones_like(input_ids), labels


def exchange_both_ways(hcg):
    """Both stages send, then receive, in one batched p2p call, as paddle's combined send/recv helpers do."""
    from paddle.distributed.fleet.meta_parallel.pp_utils import p2p_communication as p2p

    stage = hcg.get_stage_id()
    mine, got = paddle.full([2, 4096], float(stage)), paddle.zeros([2, 4096])
    if stage == 0:
        p2p._batched_p2p_ops(None, None, mine, got, hcg)  # send next, receive from next
    else:
        p2p._batched_p2p_ops(mine, got, None, None, hcg)  # send prev, receive from prev
    return bool((got.numpy() == 1 - stage).all())


def main():
    from _common import start_fleet, write_result
    from paddlenlp.transformers import LlamaForCausalLMPipe

    model_dir, out_dir, lr, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    mp = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    # batch of 2 as 2 micro-batches of 1, so the 1F1B schedule has a steady phase
    patched, hcg = start_fleet(mp_degree=mp, pp_degree=2, accumulate_steps=2, micro_batch_size=1)
    model = LlamaForCausalLMPipe.from_pretrained(model_dir, tensor_parallel_degree=mp, dtype="float32",
                                                 tensor_parallel_rank=hcg.get_model_parallel_rank())
    optimizer = paddle.optimizer.SGD(learning_rate=lr, parameters=model.parameters())
    model = fleet.distributed_model(model)
    optimizer = fleet.distributed_optimizer(optimizer)

    input_ids, attention_mask, labels = batch(model._layers.config.vocab_size)
    data = [(paddle.to_tensor(input_ids), paddle.to_tensor(attention_mask)), paddle.to_tensor(labels)]
    losses = [float(model.train_batch(data, optimizer)) for _ in range(steps)]
    exchanged = exchange_both_ways(hcg)

    if dist.get_rank() == 0:
        np.savez(f"{out_dir}/pp.npz", input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                 losses=np.array(losses))
    write_result(out_dir, dist.get_rank(), {
        "patched": patched, "stage": hcg.get_stage_id(), "mp_rank": hcg.get_model_parallel_rank(),
        "losses": losses, "exchanged": exchanged,
        "local_numel": int(sum(p.numel() for p in model.parameters()))})


if __name__ == "__main__":
    main()
    _common.finish()
