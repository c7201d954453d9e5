"""Gold-rule evaluation of a policy on the tiny example's held-out prompts."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import paddle

from ppo.data import PromptOnlyDataset
from ppo.models import load_causal_lm, load_tokenizer
from ppo.rollout import GenerationConfig, generate
from ppo.tiny.task import gold_score


def gold_eval(model_path: str, samples_per_prompt: int = 4, max_new_tokens: int = 24, seed: int = 1234,
              max_length: int = 64) -> dict:
    """Mean gold score of sampled (temperature 1) and greedy responses to ``tiny-prompts/eval``."""
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    model.eval()
    prompts = PromptOnlyDataset("tiny-prompts/eval", tokenizer, max_length)
    batch = prompts.get_collator()([prompts[i] for i in range(len(prompts))])
    paddle.seed(seed)
    result = {}
    for name, config in (("sampled", GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True,
                                                       num_return_sequences=samples_per_prompt)),
                         ("greedy", GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False))):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n = config.num_return_sequences
        if n > 1:
            ids, mask = paddle.repeat_interleave(ids, n, axis=0), paddle.repeat_interleave(mask, n, axis=0)
        seqs, full_mask = generate(model, ids, mask, config, tokenizer.eos_token_id, tokenizer.pad_token_id)
        P = ids.shape[1]
        texts = [tokenizer.decode([int(t) for t, m in zip(s[P:], k[P:]) if m], skip_special_tokens=True)
                 for s, k in zip(seqs.numpy(), full_mask.numpy())]
        scores = [gold_score(t) for t in texts]
        result[f"gold_{name}"] = float(np.mean(scores))
        result[f"examples_{name}"] = texts[:3]
    return result


def gold_curve(ppo_output_dir: str) -> list[tuple[int, float]]:
    """(step, mean gold score) of the PPO run's evaluation samples, in step order."""
    points = {}
    for path in glob.glob(os.path.join(ppo_output_dir, "eval_samples", "step-*.jsonl")):
        step = int(os.path.basename(path).split(".")[0].split("-")[1])
        with open(path, encoding="utf-8") as f:
            scores = [gold_score(json.loads(line)["response"]) for line in f if line.strip()]
        points.setdefault(step, []).extend(scores)
    return sorted((s, float(np.mean(v))) for s, v in points.items())
