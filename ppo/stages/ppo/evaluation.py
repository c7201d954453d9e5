"""PPO evaluation: the current policy's responses to the eval prompts, their reward, KL and length;
every generation written to ``eval_samples/step-N.rank-R.jsonl`` and a few echoed to the console.

The eval prompts are split over the data ranks, and within a data rank over the ranks that split
its rollout (one pipeline); the per-prompt figures are gathered back so every rank reports the
same metrics.  Sampling is seeded apart from training, so the samples do not depend on history.
"""

from __future__ import annotations

import json
import os

import numpy as np
import paddle

from ppo.core import algorithms as algo
from ppo.distributed import parallel, transfer
from ppo.stages.ppo.scoring import decode_rows, score_metrics
from ppo.rollout.collect import GenerationConfig, collect


def prompt_batch(dataset, indices):
    """(input_ids, attention_mask) of the prompts ``indices`` of ``dataset`` (left-padded)."""
    batch = dataset.get_collator()([dataset[i] for i in indices])
    return batch["input_ids"], batch["attention_mask"]


def eval_indices(n: int, ctx, split_ranks: int, part: int) -> tuple[list[int], int]:
    """This rank's eval prompts and the padded per-part count (equal sizes for the gathers)."""
    per_rank = -(-n // ctx.data_world)
    mine = list(range(ctx.data_rank * per_rank, min(n, (ctx.data_rank + 1) * per_rank)))
    per_part = -(-per_rank // split_ranks)
    return mine[part * per_part:(part + 1) * per_part], per_part


@paddle.no_grad()
def evaluate_policy(step: int, echo, *, args, ctx, prompts, layout, models, gen: GenerationConfig, offload,
                    metrics, scorer=None) -> dict:
    """Reward, KL and length of one response per eval prompt (``models``: what rolls out); with a
    ``ppo_rewards.RewardScorer``, the reward includes the reward functions, and each function's
    mean (``reward_<name>``, ``math_exact_accuracy``) is reported and its scores written per sample."""
    rng_state = paddle.get_rng_state()
    paddle.seed(args.seed + 7919)  # the same eval samples whatever the training history of the RNG
    rollout_pool = models.rollout_pool
    if rollout_pool is not None:  # (resource_pools: the rollout's pool samples, and seeds the same way)
        rollout_pool.seed_next(args.seed + 7919)
    mine, per_part = eval_indices(len(prompts), ctx, layout.split_ranks, layout.part)
    gen = GenerationConfig(**{**gen.__dict__, "num_return_sequences": 1})
    tokenizer = models.actor_tokenizer
    rows, scores, kls, lengths = [], [], [], []
    function_scores: dict[str, list] = {name: [] for name in (scorer.names if scorer is not None else [])}
    for start in range(0, len(mine), args.per_device_eval_batch_size):
        batch = mine[start:start + args.per_device_eval_batch_size]
        ids, mask = prompt_batch(prompts, batch)
        offload.before_generation()
        exp = collect(models, ids, mask, gen, args.max_length, args.normalize_reward,
                      before_scoring=offload.before_scoring)
        offload.after_scoring()
        per_function = {}
        if scorer is not None:
            # the tensor-parallel ranks of a rollout model hold the same rows (their first scores them);
            # merged single copies and pipeline stages each hold their own
            exp, per_function = scorer.apply(exp, prompts.references(batch), tokenizer,
                                             share=not layout.merge_for_rollout, with_pipeline=False)
            for name, values in per_function.items():
                function_scores[name].append(values)
        kl = algo.masked_sum(algo.compute_kl(exp.old_log_probs, exp.ref_log_probs, "k1") * exp.action_mask,
                             exp.action_mask, axis=1)
        scores.append(exp.end_scores.numpy())
        kls.append(kl.numpy())
        lengths.append(exp.response_lengths.numpy().astype("float64"))
        new_rows = sample_rows(exp, tokenizer, kl)
        for i, row in enumerate(new_rows):
            if per_function:
                row["rewards"] = {name: float(values[i]) for name, values in per_function.items()}
        rows += new_rows
    paddle.set_rng_state(rng_state)
    if rollout_pool is not None:
        rollout_pool.restore_rng()
    pad = np.full(per_part - len(mine), np.nan)  # NaN marks a slot without a prompt
    values = {"score": np.concatenate(scores + [pad]), "kl": np.concatenate(kls + [pad]),
              "length": np.concatenate(lengths + [pad])}
    for name, parts in function_scores.items():
        values[f"function_{name}"] = np.concatenate(parts + [pad])
    if layout.split is not None:
        values = transfer.gather_rows(values, layout.split)
    values = {k: parallel.all_gather_data(v) for k, v in values.items()}
    score, kl_all, length = values["score"], values["kl"], values["length"]
    keep = ~np.isnan(score)
    result = {"reward": float(score[keep].mean()), "reward_std": float(score[keep].std()),
              "kl": float(kl_all[keep].mean()), "response_length": float(length[keep].mean())}
    result.update(score_metrics({name: values[f"function_{name}"][keep] for name in function_scores}))
    # the ranks of a tensor-parallel rollout model generate the same rows: its first rank writes them
    if ctx.tp_rank == 0 or layout.merge_for_rollout:
        write_samples(args.output_dir, step, ctx.rank, rows)
    metrics.log(step, result, split="eval", echo=echo)
    if ctx.is_main:
        for row in rows[:args.eval_samples_to_write]:
            (echo or print)(f"  reward {row['reward']:+.3f}  kl {row['kl']:+.3f}  "
                            f"{row['prompt']!r} -> {row['response']!r}")
    return result


def sample_rows(exp, tokenizer, kl) -> list[dict]:
    """One JSON-ready row per sequence: decoded prompt and response, reward, KL."""
    prompts, responses, _ = decode_rows(exp, tokenizer)
    return [{"prompt": p, "response": r, "reward": float(exp.end_scores[b]), "kl": float(kl[b])}
            for b, (p, r) in enumerate(zip(prompts, responses))]


def write_samples(output_dir: str, step: int, rank: int, rows: list[dict]) -> None:
    folder = os.path.join(output_dir, "eval_samples")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"step-{step}.rank-{rank}.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
