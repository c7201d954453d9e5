"""Online (iterative) DPO: rounds of sampling from the current policy, ranking, and a DPO round.

Round r (``online_rounds`` of them):

1. ``online_prompts_per_round`` prompts (of ``online_prompts``, default the training data's
   prompts; a new seeded draw each round) get ``online_samples`` responses each from the current
   policy (the PPO stage's generation: ``ppo.rollout.collect.generate``);
2. each response is scored by ``online_reward_model_name_or_path`` (times
   ``online_reward_model_weight``) plus ``online_reward_functions`` (the reward functions PPO uses);
3. per prompt the best and the worst response become a pair (prompts whose responses all score
   the same, or read the same, are skipped), written to ``round-<r>/pairs.jsonl``;
4. a DPO round (``DPOTrainer``: ``num_train_epochs`` or ``max_steps`` over those pairs) trains the
   policy into ``round-<r>/``, against the fixed reference (``ref_model_name_or_path``, default the
   starting policy).

The last round's model is published in ``output_dir`` itself (hard links to its files), and
``online.json`` lists every finished round with its ranking statistics.  A stopped run continues
with ``resume_from_checkpoint auto``: finished rounds are skipped, the interrupted one resumes from
its own latest checkpoint.  Every rank samples every prompt with the same seed (identical rows;
generation is not split over ranks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import numpy as np
import paddle

from ppo.args.dpo import DPOArgs
from ppo.core.errors import UserError
from ppo.data import RawDataset, build_template, encode_prompt, import_user_modules, pad_sequences, parse_dataset_spec
from ppo.data.tokenizer_utils import decode_without_special
from ppo.distributed import parallel
from ppo.models import load_causal_lm, load_score_model, load_tokenizer
from ppo.rewards import build_reward_functions, combine
from ppo.rollout.collect import GenerationConfig, generate
from ppo.stages.dpo.trainer import DPOTrainer
from ppo.storage.files import read_json
from ppo.storage.manifest import list_checkpoints

logger = logging.getLogger("ppo")
STATE = "online.json"


def prompt_pool(spec: str) -> list:
    """Every distinct prompt (``input``) of the raw datasets named by ``spec``, in spec order."""
    seen, pool = set(), []
    for entry in parse_dataset_spec(spec):
        for sample in RawDataset.load(entry.name, entry.path):
            prompt = sample.get("input") if isinstance(sample, dict) else None
            if prompt is None:
                continue
            key = prompt if isinstance(prompt, str) else tuple(prompt)
            if key not in seen:
                seen.add(key)
                pool.append(prompt)
    if not pool:
        raise UserError(f"'online_prompts' = '{spec}' holds no prompts")
    return pool


def best_and_worst(prompts: list, responses: list[str], scores: np.ndarray, n: int) -> tuple[list[dict], int]:
    """Pairs ``{"prompt", "chosen", "rejected"}``: per prompt its highest- and lowest-scored response
    (``responses``/``scores`` prompt-major, ``n`` per prompt); the number of prompts skipped because
    their best and worst response score the same or read the same."""
    pairs, skipped = [], 0
    for i, prompt in enumerate(prompts):
        s = scores[i * n:(i + 1) * n]
        best, worst = int(np.argmax(s)), int(np.argmin(s))
        chosen, rejected = responses[i * n + best], responses[i * n + worst]
        if s[best] - s[worst] < 1e-6 or chosen.strip() == rejected.strip() or not chosen.strip() \
                or not rejected.strip():
            skipped += 1
            continue
        pairs.append({"prompt": prompt if isinstance(prompt, str) else _messages(prompt),
                      "chosen": chosen, "rejected": rejected})
    return pairs, skipped


def _messages(turns: list[str]) -> list[dict]:
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]


class Ranker:
    """Scores responses: the reward model's end score (weighted) plus the reward functions."""

    def __init__(self, args: DPOArgs, tokenizer):
        self.args, self.tokenizer = args, tokenizer
        self.functions = build_reward_functions(args.online_reward_functions, vars(args))
        self.model = None
        if args.online_reward_model_name_or_path:
            self.model = load_score_model(args.online_reward_model_name_or_path, what="online_reward_model_name_or_path",
                                          trained_head=True)
            self.model.eval()
            rm_tokenizer = load_tokenizer(args.online_reward_model_name_or_path, "online_reward_model_name_or_path")
            if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise UserError(f"'online_reward_model_name_or_path' = '{args.online_reward_model_name_or_path}' "
                                "must share the policy's vocabulary")

    @paddle.no_grad()
    def __call__(self, sequences, mask, prompt_texts, responses, response_ids) -> tuple[np.ndarray, dict]:
        total = np.zeros(len(responses))
        stats = {}
        if self.model is not None:
            rm = self.model(sequences, mask).end_scores.squeeze(-1).astype("float32").numpy().astype(np.float64)
            total += self.args.online_reward_model_weight * rm
            stats["reward_model"] = float(rm.mean())
        if self.functions:
            scores = combine(self.functions, prompt_texts, responses, response_ids, [None] * len(responses),
                             max_new_tokens=self.args.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id)
            total += scores.total
            stats.update({name: float(v.mean()) for name, v in scores.per_function.items()})
        return total, stats


@paddle.no_grad()
def sample_round(args: DPOArgs, policy_path: str, pool: list, round_index: int) -> tuple[list[dict], dict]:
    """This round's pairs and its statistics (sampled score mean, best / worst means, skipped)."""
    tokenizer = load_tokenizer(policy_path)
    template = build_template(args)
    rng = np.random.default_rng(args.seed + round_index)
    take = min(args.online_prompts_per_round, len(pool))
    prompts = [pool[i] for i in sorted(rng.choice(len(pool), size=take, replace=False))]
    limit = args.max_length - args.max_new_tokens
    encoded = [encode_prompt(tokenizer, template, p)[0][-limit:] for p in prompts]
    n = args.online_samples
    ids, mask = pad_sequences([e for e in encoded for _ in range(n)], tokenizer.pad_token_id, left=True)
    ids, mask = paddle.to_tensor(ids), paddle.to_tensor(mask)
    policy = load_causal_lm(policy_path)
    policy.eval()
    paddle.seed(args.seed + 1000 * (round_index + 1))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                              top_p=args.top_p, micro_batch_size=0)
    sequences, full_mask = generate(policy, ids, mask, config, tokenizer.eos_token_id, tokenizer.pad_token_id)
    del policy
    P = ids.shape[1]
    response_ids = [[int(t) for t, m in zip(s[P:], k[P:]) if m] for s, k in
                    zip(sequences.numpy(), full_mask.numpy())]
    responses = decode_without_special(tokenizer, response_ids)
    prompt_texts = decode_without_special(tokenizer, [[int(t) for t, m in zip(s[:P], k[:P]) if m] for s, k in
                                                      zip(sequences.numpy(), full_mask.numpy())])
    scores, parts = Ranker(args, tokenizer)(sequences, full_mask, prompt_texts, responses, response_ids)
    pairs, skipped = best_and_worst(prompts, responses, scores, n)
    grouped = scores.reshape(-1, n)
    stats = {"round": round_index, "prompts": take, "pairs": len(pairs), "skipped_prompts": skipped,
             "score_mean": float(scores.mean()), "best_mean": float(grouped.max(1).mean()),
             "worst_mean": float(grouped.min(1).mean()), **{f"score/{k}": v for k, v in parts.items()}}
    return pairs, stats


def _read_state(output_dir: str) -> dict:
    path = os.path.join(output_dir, STATE)
    if not os.path.isfile(path):
        return {"rounds": []}
    return read_json(path, "online DPO state")


def _write_state(output_dir: str, state: dict) -> None:
    tmp = os.path.join(output_dir, STATE + ".part")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, os.path.join(output_dir, STATE))


def publish_final(round_dir: str, output_dir: str) -> None:
    """The last round's model files linked (or copied) into ``output_dir``."""
    for name in os.listdir(round_dir):
        src = os.path.join(round_dir, name)
        if not os.path.isfile(src) or name in ("metrics.jsonl", "pairs.jsonl", "sampling.json") or name.startswith("."):
            continue
        dst = os.path.join(output_dir, name)
        tmp = dst + ".part"
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def run_online(args: DPOArgs) -> dict:
    """Every round of online DPO (see the module docstring); the last round's eval metrics."""
    ctx = parallel.init_parallel(args)
    if args.extra_modules:
        import_user_modules([m for m in args.extra_modules.split(",") if m])
    os.makedirs(args.output_dir, exist_ok=True)
    earlier = sorted(n for n in os.listdir(args.output_dir) if n == STATE or n.startswith("round-"))
    if earlier and not args.resume_from_checkpoint:
        if not args.overwrite_output_dir:
            raise UserError(f"output_dir '{args.output_dir}' already holds an online DPO run ({', '.join(earlier[:3])}"
                            f"{', ...' if len(earlier) > 3 else ''}); continue it with --resume_from_checkpoint auto, "
                            "start afresh over it with --overwrite_output_dir true, or choose another output_dir")
        parallel.barrier()
        if ctx.is_main:
            for name in earlier:
                path = os.path.join(args.output_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                logger.warning("overwrite_output_dir: removed the earlier online DPO run's %s", path)
        parallel.barrier()
    state = _read_state(args.output_dir) if args.resume_from_checkpoint else {"rounds": []}
    pool = prompt_pool(args.online_prompts or args.train_datasets)
    reference = args.ref_model_name_or_path or args.model_name_or_path
    policy, final = args.model_name_or_path, {}
    for r in range(args.online_rounds):
        round_dir = os.path.join(args.output_dir, f"round-{r}")
        done = {d["round"]: d for d in state["rounds"]}
        if r in done:
            policy = round_dir
            continue
        pairs_file = os.path.join(round_dir, "pairs.jsonl")
        if not os.path.isfile(pairs_file):
            pairs, stats = sample_round(args, policy, pool, r)
            if not pairs:
                raise UserError(f"online DPO round {r}: every prompt's {args.online_samples} responses scored the "
                                "same, so no pair could be built; raise online_samples or temperature")
            if ctx.is_main:
                os.makedirs(round_dir, exist_ok=True)
                with open(pairs_file + ".part", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(p) + "\n" for p in pairs)
                os.replace(pairs_file + ".part", pairs_file)
                with open(os.path.join(round_dir, "sampling.json"), "w") as f:
                    json.dump(stats, f, indent=1)
            parallel.barrier()
            logger.info("online DPO round %d: %d pairs from %d prompts (best %.3f, worst %.3f, mean %.3f)", r,
                        stats["pairs"], stats["prompts"], stats["best_mean"], stats["worst_mean"], stats["score_mean"])
        stats = read_json(os.path.join(round_dir, "sampling.json"), "online DPO round statistics")
        resume = "auto" if list_checkpoints(round_dir) else ""
        round_args = dataclasses.replace(
            args, model_name_or_path=policy, ref_model_name_or_path=reference, output_dir=round_dir,
            train_datasets=f"prompt-chosen-rejected:1:{pairs_file}", online_rounds=0, resume_from_checkpoint=resume,
            overwrite_output_dir=True)
        final = DPOTrainer(round_args).train()
        stats = {**stats, "eval": final}
        state["rounds"].append(stats)
        if ctx.is_main:
            _write_state(args.output_dir, state)
        policy = round_dir
    if ctx.is_main:
        publish_final(policy, args.output_dir)
    parallel.barrier()
    return final
