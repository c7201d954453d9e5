"""The PPO trainer's rollout copies after a pipeline / tensor-parallel update (weight export).

Usage: python -m paddle.distributed.launch --nproc_per_node N export_weights.py MODEL_DIR OUT_DIR [ARGS...]
ARGS are PPO arguments (the layout: --tensor_parallel_degree 2 --eval_mode single, or
--tensor_parallel_degree 2 --pipeline_parallel_degree 2).  The trainer rolls out, updates actor and
critic once (so the weights have moved from the checkpoint), and refreshes its rollout copies.

Every rank writes OUT_DIR/rank<k>.json (its coordinates) and OUT_DIR/arrays<k>.npz with its pipeline stage / tensor-parallel coordinates, its
training shards (``t/<name>``), its rollout copies' parameters (``r/<name>``), and the rollout
copies' full-vocabulary logits and scores on a fixed batch.  The test reassembles the training
shards with numpy and compares.
"""

import os
import sys

import _common  # puts the repo on sys.path; finish() at the end
import numpy as np
import paddle


def fixed_batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(4, 320, size=(3, 10))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, 8:] = 0
    ids[mask == 0] = 0
    return paddle.to_tensor(ids, dtype="int64"), paddle.to_tensor(mask, dtype="int64")


def main():
    from _common import write_result

    from ppo.distributed import parallel, vocab
    from ppo.args import PPOArgs, parse_args
    from ppo.models import position_ids_from_mask
    from ppo.stages.ppo.trainer import PPOTrainer
    from ppo.distributed.parallel import unwrap

    model_dir, out_dir, *layout = sys.argv[1:]
    args = parse_args(PPOArgs, [
        "config/tiny/ppo_argument.json", "--actor_model_name_or_path", model_dir, "--reward_model_name_or_path",
        os.path.join(os.path.dirname(model_dir), "score"),  # tiny_dir/score: the base with a fresh score head
        "--output_dir", out_dir, "--max_steps", "1", "--do_sample", "false", "--max_new_tokens", "6",
        "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--learning_rate", "0.01", "--critic_learning_rate", "0.01",
        "--eval_datasets", "", "--disable_tqdm", "true", *layout])
    trainer = PPOTrainer(args)
    exp = trainer.rollout(0)
    exp = trainer.advantages(exp)
    trainer.update(exp, 1)
    assert trainer.weights.copies_stale, "an update must mark the rollout copies stale"
    trainer.weights.refresh()

    ctx = parallel.context()
    out = {"pp_rank": ctx.pp_rank, "mp_rank": ctx.tp_rank, "mp_degree": ctx.tp_degree}
    for prefix, model in (("actor", trainer.actor), ("critic", trainer.critic)):
        for name, value in unwrap(model).state_dict().items():
            out[f"t/{prefix}/{name}"] = value.numpy()
    for prefix, model in (("actor", trainer.models.actor), ("critic", trainer.models.critic)):
        for name, value in model.state_dict().items():
            out[f"r/{prefix}/{name}"] = value.numpy()
    ids, mask = fixed_batch()
    with paddle.no_grad(), vocab.full_vocab_logits(trainer.models.actor):
        out["logits"] = trainer.models.actor(input_ids=ids, attention_mask=mask,
                                              position_ids=position_ids_from_mask(mask), return_dict=True).logits.numpy()
        out["scores"] = trainer.models.critic(ids, mask).scores.numpy()
    np.savez(f"{out_dir}/arrays{ctx.rank}.npz", **out)
    write_result(out_dir, ctx.rank, {k: out[k] for k in ("pp_rank", "mp_rank", "mp_degree")})
    parallel.barrier()


if __name__ == "__main__":
    main()
    _common.finish()
