"""2 ranks, tensor_parallel_degree=2: the rollout inference model over tensor-parallel shards.

Usage: python -m paddle.distributed.launch --nproc_per_node 2 tp_inference.py MODEL_DIR OUT_DIR
Loads MODEL_DIR split over the two ranks (causal LM and a score model started from it), then on a
fixed left-padded prompt batch: prefill logits, one decode step's logits, greedy generation, and
on fixed full sequences: log-probs and scores; a sampled generation (temperature, top-k, top-p,
repetition penalty) with the log-probs kept from its decode steps and the recomputed ones; then the training path's vocabulary-parallel
entropy, detached and with its backward (the summed entropy's gradient on this rank's LM-head
columns and on the final norm).  Rank 0 writes OUT_DIR/tp.npz; every rank writes
OUT_DIR/grad<k>.npz and OUT_DIR/rank<k>.json.
"""

import sys
from types import SimpleNamespace

import _common  # puts the repo on sys.path; finish() at the end
import numpy as np
import paddle
import paddle.distributed as dist


def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 320, size=(4, 9))
    mask = np.ones_like(ids)
    for b in range(4):
        mask[b, : b % 3] = 0
        ids[b, : b % 3] = 3
    seqs = rng.integers(4, 320, size=(4, 14))
    smask = np.ones_like(seqs)
    for b in range(4):
        smask[b, : b % 2] = 0
        smask[b, 14 - (b % 3):] = 0
    seqs[smask == 0] = 3
    return [paddle.to_tensor(x, dtype="int64") for x in (ids, mask, seqs, smask)]


def main():
    from _common import write_result

    from ppo.distributed import parallel
    from ppo.rollout.inference import InferenceModel
    from ppo.models import load_causal_lm, load_score_model, position_ids_from_mask
    from ppo.rollout.collect import GenerationConfig, forward_log_probs, generate

    model_dir, out_dir = sys.argv[1], sys.argv[2]
    ctx = parallel.init_parallel(SimpleNamespace(tensor_parallel_degree=2, pipeline_parallel_degree=1,
                                                 sharding_parallel_degree=1, sharding=""))
    actor = load_causal_lm(model_dir, **parallel.tp_kwargs(), tensor_parallel_output=True)
    scorer = load_score_model(model_dir, **parallel.tp_kwargs())
    actor.eval()
    scorer.eval()
    ids, mask, seqs, smask = inputs()
    view = InferenceModel.of(actor)
    with paddle.no_grad():
        pos = position_ids_from_mask(mask)
        first = view.start(ids, mask, pos, max_new_tokens=2)
        token = paddle.argmax(first, axis=-1)
        second = view.step(token, paddle.ones_like(token), pos[:, -1:] + 1)
        view.release()
        greedy, greedy_mask = generate(view, ids, mask, GenerationConfig(max_new_tokens=6, do_sample=False), 2, 3)
        log_probs = view.log_probs(seqs, smask, temperature=0.7)
        scores, end = InferenceModel.of(scorer).scores(seqs, smask)
        paddle.seed(5)
        sampling = GenerationConfig(max_new_tokens=8, temperature=0.7, top_k=12, top_p=0.9, repetition_penalty=1.4)
        sampled, sampled_mask, kept = generate(view, ids, mask, sampling, 2, 3, return_log_probs=True)
        recomputed = view.log_probs(sampled, sampled_mask, temperature=0.7)  # vocabulary-parallel
    real = (smask[:, 1:] * smask[:, :-1]).astype("float32")
    _, detached = forward_log_probs(actor, seqs, smask, temperature=0.7, with_entropy=True, entropy_grad=False)
    _, entropy = forward_log_probs(actor, seqs, smask, temperature=0.7, with_entropy=True, entropy_grad=True)
    (entropy * real).sum().backward()
    np.savez(f"{out_dir}/grad{dist.get_rank()}.npz", lm_head=actor.lm_head.weight.grad.numpy(),
             norm=actor.llama.norm.weight.grad.numpy())
    if dist.get_rank() == 0:
        np.savez(f"{out_dir}/tp.npz", first=first.numpy(), second=second.numpy(), greedy=greedy.numpy(),
                 greedy_mask=greedy_mask.numpy(), log_probs=log_probs.numpy(), scores=scores.numpy(),
                 end=end.numpy(), entropy=entropy.detach().numpy(), entropy_detached=detached.numpy(),
                 entropy_has_grad=not entropy.stop_gradient, detached_has_grad=not detached.stop_gradient,
                 sampled=sampled.numpy(), sampled_mask=sampled_mask.numpy(), kept=kept.numpy(),
                 recomputed=recomputed.numpy())
    write_result(out_dir, dist.get_rank(), {
        "mp_rank": ctx.tp_rank, "local_heads": view.n_heads,
        "local_embedding_rows": int(actor.llama.embed_tokens.weight.shape[0]),
        "vocab_split": bool(view._vocab_split())})


if __name__ == "__main__":
    main()
    _common.finish()
