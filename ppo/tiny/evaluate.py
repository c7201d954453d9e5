"""Evaluation of a policy on held-out prompts: the tiny example's gold rule, the arithmetic task's exact answer."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import paddle

from ppo.data import PromptOnlyDataset
from ppo.data.tokenizer_utils import decode_without_special
from ppo.models import load_causal_lm, load_tokenizer
from ppo.rewards import RewardFunction
from ppo.rollout.collect import GenerationConfig, generate
from ppo.tiny.task import gold_score, strict_gold_score


def sample_responses(model_path: str, dataset: str, samples_per_prompt: int, max_new_tokens: int, seed: int,
                     max_length: int) -> dict:
    """Responses to every prompt of ``dataset``: ``{"sampled", "greedy", "prompts", "references"}``,
    the sampled list prompt-major (``samples_per_prompt`` per prompt), prompts (decoded) and
    references one per prompt."""
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    model.eval()
    prompts = PromptOnlyDataset(dataset, tokenizer, max_length)
    batch = prompts.get_collator()([prompts[i] for i in range(len(prompts))])
    paddle.seed(seed)
    result = {"references": prompts.references(range(len(prompts))),
              "prompts": decode_without_special(tokenizer, [[t for t, m in zip(s, k) if m] for s, k in
                                                            zip(batch["input_ids"].numpy(), batch["attention_mask"].numpy())])}
    for name, config in (("sampled", GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True,
                                                       num_return_sequences=samples_per_prompt)),
                         ("greedy", GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False))):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n = config.num_return_sequences
        if n > 1:
            ids, mask = paddle.repeat_interleave(ids, n, axis=0), paddle.repeat_interleave(mask, n, axis=0)
        seqs, full_mask = generate(model, ids, mask, config, tokenizer.eos_token_id, tokenizer.pad_token_id)
        P = ids.shape[1]
        result[name] = decode_without_special(tokenizer, [[t for t, m in zip(s[P:], k[P:]) if m]
                                                          for s, k in zip(seqs.numpy(), full_mask.numpy())])
    return result


def gold_eval(model_path: str, samples_per_prompt: int = 4, max_new_tokens: int = 24, seed: int = 1234,
              max_length: int = 64) -> dict:
    """Mean gold score, lenient (``gold_*``) and strict (``strict_gold_*``), of sampled
    (temperature 1) and greedy responses to ``tiny-prompts/eval``."""
    out = sample_responses(model_path, "tiny-prompts/eval", samples_per_prompt, max_new_tokens, seed, max_length)
    result = {}
    for name in ("sampled", "greedy"):
        texts = out[name]
        n = len(texts) // len(out["prompts"])
        prompts = [p for p in out["prompts"] for _ in range(n)]
        result[f"gold_{name}"] = float(np.mean([gold_score(t) for t in texts]))
        result[f"strict_gold_{name}"] = float(np.mean([strict_gold_score(p, t) for p, t in zip(prompts, texts)]))
        result[f"examples_{name}"] = [f"{p} -> {t}" for p, t in zip(prompts[:3 * n:n], texts[:3 * n:n])]
    return result


def accuracy_eval(model_path: str, dataset: str = "arithmetic-prompts/eval", samples_per_prompt: int = 8,
                  max_new_tokens: int = 6, seed: int = 1234, max_length: int = 32) -> dict:
    """Exact-match accuracy (``math_exact``) of sampled (temperature 1, ``samples_per_prompt`` per
    prompt) and greedy responses to ``dataset``'s prompts."""
    out = sample_responses(model_path, dataset, samples_per_prompt, max_new_tokens, seed, max_length)
    exact = RewardFunction.load("math_exact")
    result = {}
    for name in ("sampled", "greedy"):
        texts = out[name]
        n = len(texts) // len(out["references"])
        refs = [r for r in out["references"] for _ in range(n)]
        scores = exact([""] * len(texts), texts, [[0]] * len(texts), refs)
        result[f"accuracy_{name}"] = float(np.mean(scores))
        result[f"examples_{name}"] = [(ref, t) for ref, t in zip(refs[:3 * n:n], texts[:3 * n:n])]
    return result


def gold_curve(ppo_output_dir: str, strict: bool = False) -> list[tuple[int, float]]:
    """(step, mean gold score) of the PPO run's evaluation samples, in step order; the strict rule
    with ``strict``."""
    points = {}
    for path in glob.glob(os.path.join(ppo_output_dir, "eval_samples", "step-*.jsonl")):
        step = int(os.path.basename(path).split(".")[0].split("-")[1])
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        points.setdefault(step, []).extend(
            strict_gold_score(r["prompt"], r["response"]) if strict else gold_score(r["response"]) for r in rows)
    return sorted((s, float(np.mean(v))) for s, v in points.items())
