"""2 ranks, mp_degree=2: paddlenlp LlamaForCausalLM split by tensor parallel, forward and one SGD step.

Usage: python -m paddle.distributed.launch --nproc_per_node 2 cpu_fleet_tp_llama.py MODEL_DIR OUT_DIR LR
Rank 0 writes OUT_DIR/tp.npz (inputs, full-vocab logits, loss, every parameter after the step merged
back with paddlenlp's own tensor-parallel mappings); every rank writes OUT_DIR/rank<k>.json.
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
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, :3] = 0  # a left-padded row
    labels = rng.integers(4, vocab, size=(2, 12))
    labels[1, :3] = -100
    return input_ids, attention_mask, labels


def merged_params(model, config, group):
    """name -> full numpy array, merging the per-rank slices the way paddlenlp splits a checkpoint."""
    from paddlenlp.transformers import LlamaForCausalLM

    merge = LlamaForCausalLM._get_tensor_parallel_mappings(config, is_split=False)
    out = {}
    for name, param in model.state_dict().items():
        parts = []
        dist.all_gather(parts, param.detach(), group=group)
        key = name[len("llama."):] if name.startswith("llama.") else name
        arrays = [p.numpy() for p in parts]
        out[name] = merge[key](arrays) if key in merge else arrays[0]
    return out


def main():
    from _common import start_fleet, write_result
    from paddlenlp.transformers import LlamaForCausalLM

    model_dir, out_dir, lr = sys.argv[1], sys.argv[2], float(sys.argv[3])
    patched, hcg = start_fleet(mp_degree=2)
    group, mp_rank = hcg.get_model_parallel_group(), hcg.get_model_parallel_rank()
    model = LlamaForCausalLM.from_pretrained(model_dir, tensor_parallel_degree=2, tensor_parallel_rank=mp_rank,
                                             dtype="float32")
    config = model.config
    optimizer = paddle.optimizer.SGD(learning_rate=lr, parameters=model.parameters())
    model = fleet.distributed_model(model)  # TensorParallel: broadcasts the inputs over the mp group
    optimizer = fleet.distributed_optimizer(optimizer)

    input_ids, attention_mask, labels = batch(config.vocab_size)
    ids, mask = paddle.to_tensor(input_ids), paddle.to_tensor(attention_mask)

    # full-vocab logits: lm head output gathered with c_concat
    config.tensor_parallel_output = False
    with paddle.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, return_dict=True).logits
    # training step: vocab-parallel logits into the vocab-parallel cross entropy
    config.tensor_parallel_output = True
    loss = model(input_ids=ids, attention_mask=mask, labels=paddle.to_tensor(labels), return_dict=True).loss
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()

    params = merged_params(model._layers, config, group)
    if dist.get_rank() == 0:
        np.savez(f"{out_dir}/tp.npz", input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                 logits=logits.numpy(), loss=float(loss), **{f"param/{k}": v for k, v in params.items()})
    write_result(out_dir, dist.get_rank(), {
        "patched": patched, "mp_rank": mp_rank, "logits_shape": list(logits.shape), "loss": float(loss),
        "local_lm_head_shape": list(model._layers.lm_head.weight.shape), "params": len(params)})


if __name__ == "__main__":
    main()
    _common.finish()
