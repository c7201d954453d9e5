"""The built-in tiny example: a synthetic task with a known gold preference rule.

A prompt asks for a description of a topic; an answer describes it with 2-4 adjectives, e.g.
``The river is calm, rude and warm.``  Two gold rules score an answer:

* ``gold_score`` (the original, lenient rule): ``#positive / (#positive + #negative)`` over the
  adjectives in the text, every occurrence counted (0 when it has none);
* ``strict_gold_score`` (reported beside it): 0 unless the answer names the PROMPT's topic; else
  ``#distinct positive / #adjectives``: a repeated adjective counts once, its repeats count
  against the answer.

A policy that games the lenient rule (``The garden is brave, brave, brave and gentle.`` scores 1;
``The dog is kind and calm.`` for a prompt about the train scores 1) loses under the strict one
(0.5 and 0).  SFT answers draw each adjective positive with probability 1/2 (always on topic), so
an SFT model scores about 0.5 under both rules; a reward model trained on pairs labelled by the
lenient rule learns which words are positive, and PPO pushes the lenient score towards 1.  It
keeps its gain under the strict rule only with the ``tiny_guard`` rule reward beside the reward
model (docs/main-job.md: reward hacking, made visible).  Everything is generated from a
seed, so the shipped files can be regenerated bit for bit with ``python -m ppo.tiny.task``.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Iterator

from ppo.data.template import DEFAULT_TEMPLATE
from ppo.data.tiny import DATA_DIR
from ppo.rewards import RewardFunction

TOPICS = [
    "cat", "dog", "river", "city", "garden", "forest", "train", "house", "song", "book",
    "teacher", "market", "bridge", "lake", "village", "road", "storm", "party", "kitchen", "school",
    "mountain", "ocean", "bakery", "library",
]
POSITIVE = ["kind", "bright", "calm", "warm", "gentle", "happy", "brave", "clean", "sweet",
            "friendly", "honest", "lovely"]
NEGATIVE = ["rude", "dark", "noisy", "cold", "harsh", "sad", "dirty", "bitter", "lazy", "angry",
            "ugly", "boring"]
TRAIN_TEMPLATES = [
    "Describe the {topic} in a few words.",
    "What do you think of the {topic}?",
    "Tell me about the {topic}.",
]
# Held-out prompts use a phrasing never seen in training.
EVAL_TEMPLATES = ["Give me your view of the {topic}."]

_POS = set(POSITIVE)
_NEG = set(NEGATIVE)
_WORD = re.compile(r"[a-z]+")

SEED = 20261121


def gold_score(response: str) -> float:
    """Gold rule: share of positive adjectives among the adjectives of ``response`` (0 if none)."""
    words = _WORD.findall(response.lower())
    pos = sum(w in _POS for w in words)
    neg = sum(w in _NEG for w in words)
    return pos / (pos + neg) if pos + neg else 0.0


def strict_gold_score(prompt: str, response: str) -> float:
    """Strict gold rule: 0 unless ``response`` names ``prompt``'s topic; else the number of DISTINCT
    positive adjectives over the number of adjectives (a repeated adjective counts once, its
    repeats count against the answer; 0 if there is none)."""
    words = _WORD.findall(response.lower())
    if _topic_of(prompt) not in words:
        return 0.0
    adjectives = [w for w in words if w in _POS or w in _NEG]
    return len(set(adjectives) & _POS) / len(adjectives) if adjectives else 0.0


class TopicGuard(RewardFunction):
    """Rule check beside the learned reward (``reward_functions: tiny_guard:W``): 0 when the
    response names the prompt's topic and repeats no adjective, else -1: the two parts of the
    strict rule that the reward model does not learn (even from strict-labelled pairs)."""

    NAME = "tiny_guard"

    def __call__(self, prompts, responses, response_ids, references, **context):
        out = []
        for prompt, response in zip(prompts, responses):
            words = _WORD.findall(response.lower())
            adjectives = [w for w in words if w in _POS or w in _NEG]
            out.append(0.0 if _topic_of(prompt) in words and len(set(adjectives)) == len(adjectives) else -1.0)
        return out


def make_answer(rng: random.Random, topic: str, p_positive: float = 0.5) -> str:
    k = rng.randint(2, 4)
    adjectives = [rng.choice(POSITIVE if rng.random() < p_positive else NEGATIVE) for _ in range(k)]
    if k == 2:
        listed = f"{adjectives[0]} and {adjectives[1]}"
    else:
        listed = ", ".join(adjectives[:-1]) + f" and {adjectives[-1]}"
    return f"The {topic} is {listed}."


def prompts(templates: list[str]) -> list[str]:
    return [t.format(topic=topic) for t in templates for topic in TOPICS]


def generate(seed: int = SEED, n_sft: int = 2000, n_pref: int = 2000, n_pref_test: int = 200) -> dict:
    """All files of the example as lists of records (deterministic for a given seed).

    Preference pairs are labelled by the lenient ``gold_score``; ``gold`` / ``other_gold`` hold it.
    """
    rng = random.Random(seed)
    train_prompts = prompts(TRAIN_TEMPLATES)
    sft = []
    for _ in range(n_sft):
        prompt = rng.choice(train_prompts)
        topic = _topic_of(prompt)
        sft.append({"prompt": prompt, "answer": make_answer(rng, topic)})

    def pairs(n: int, prompt_pool: list[str]) -> list[dict]:
        out = []
        while len(out) < n:
            prompt = rng.choice(prompt_pool)
            topic = _topic_of(prompt)
            a, b = make_answer(rng, topic), make_answer(rng, topic)
            ga, gb = gold_score(a), gold_score(b)
            if ga == gb:
                continue  # the rule gives no preference: not a training signal
            out.append({"prompt": prompt, "answer": a, "other_answer": b, "better": ga > gb,
                        "gold": ga, "other_gold": gb})
        return out

    return {
        "sft": sft,
        "preference_train": pairs(n_pref, train_prompts),
        "preference_test": pairs(n_pref_test, prompts(EVAL_TEMPLATES)),
        "prompts_train": [{"prompt": p} for p in train_prompts],
        "prompts_eval": [{"prompt": p} for p in prompts(EVAL_TEMPLATES)],
    }


def _topic_of(prompt: str) -> str:
    """The topic named in ``prompt`` (the last one, so a chat template's words come first)."""
    found = [(m.start(), t) for t in TOPICS for m in re.finditer(rf"\b{t}\b", prompt.lower())]
    if not found:
        raise ValueError(f"prompt names no topic of the example: {prompt!r}")
    return max(found)[1]


def corpus() -> Iterator[str]:
    """Every text of the example, for training the tokenizer."""
    data = generate()
    for rec in data["sft"]:
        yield DEFAULT_TEMPLATE.format(input=rec["prompt"]) + " " + rec["answer"]
    for rec in data["preference_train"] + data["preference_test"]:
        yield rec["other_answer"]
    for rec in data["prompts_eval"]:
        yield DEFAULT_TEMPLATE.format(input=rec["prompt"])


def write_files(out_dir: str = DATA_DIR) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, records in generate().items():
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
        paths[name] = path
    return paths


if __name__ == "__main__":
    for name, path in write_files().items():
        print(name, path)
