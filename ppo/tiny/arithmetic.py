"""The arithmetic task: small sums and differences with a verifiable answer, generated offline.

A prompt is ``What is 4 + 5?`` and its reference ``9``.  Problems are every ``a + b`` and every
``a - b`` with ``a >= b`` for operands in ``0..max_operand`` (57 problems for 0..5).  Training
prompts ask in three phrasings; the held-out prompts ask every problem in a FOURTH phrasing never
seen in training (``How much is 4 + 5?``), so the held-out split tests a new wording of known
problems, not unseen operand pairs (the tiny model does not learn addition that generalises to
unseen pairs, so an operand split measures nothing RL can sharpen).  Each SFT answer is WRONG with
probability ``wrong_share`` (seeded; the correct result plus an offset in ``+-1..3``, never
negative): the SFT policy is right about ``1 - wrong_share`` of the time, and a reward on the exact
answer can sharpen it toward the correct mode.  Same seed, same files: ``python -m
ppo.tiny.arithmetic`` rewrites the shipped ``ppo/tiny/data/arithmetic/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Iterator

from ppo.data.arithmetic import DATA_DIR
from ppo.data.template import DEFAULT_TEMPLATE

SEED = 20260515
FILES = ("sft", "prompts_train", "prompts_eval")
TRAIN_TEMPLATES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Tell me {a} {op} {b}."]
EVAL_TEMPLATES = ["How much is {a} {op} {b}?"]  # held out: a phrasing never seen in training


def prompt_of(a: int, op: str, b: int, template: str = TRAIN_TEMPLATES[0]) -> str:
    return template.format(a=a, op=op, b=b)


def problems(max_operand: int = 5) -> list[tuple[int, str, int, int]]:
    """``(a, op, b, result)`` of every problem of the task, in a fixed order."""
    out = [(a, "+", b, a + b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    out += [(a, "-", b, a - b) for a in range(max_operand + 1) for b in range(a + 1)]
    return out


def wrong_answer(rng: random.Random, result: int) -> int:
    """``result`` moved by +-1..3, staying >= 0 (so it is never the right answer)."""
    while True:
        wrong = result + rng.choice([-3, -2, -1, 1, 2, 3])
        if wrong >= 0:
            return wrong


def generate(seed: int = SEED, max_operand: int = 5, n_sft: int = 4000,
             wrong_share: float = 0.5) -> dict[str, list[dict]]:
    """The task's files as lists of records (deterministic for given arguments).

    ``sft``: ``{"prompt", "answer", "reference", "correct"}`` drawn uniformly from the training
    prompts, each answer wrong with probability ``wrong_share``; ``prompts_train`` /
    ``prompts_eval``: ``{"prompt", "reference"}`` of every problem in the training / held-out
    phrasings.
    """
    if not 0 <= wrong_share <= 1:
        raise ValueError(f"wrong_share={wrong_share} must be in [0, 1]")
    if not 1 <= max_operand <= 40:
        raise ValueError(f"max_operand={max_operand} must be between 1 and 40")
    rng = random.Random(seed)
    every = problems(max_operand)
    train = [(prompt_of(a, op, b, t), r) for t in TRAIN_TEMPLATES for a, op, b, r in every]
    evaluation = [(prompt_of(a, op, b, t), r) for t in EVAL_TEMPLATES for a, op, b, r in every]
    sft = []
    for _ in range(n_sft):
        prompt, result = rng.choice(train)
        answer = wrong_answer(rng, result) if rng.random() < wrong_share else result
        sft.append({"prompt": prompt, "answer": str(answer), "reference": str(result),
                    "correct": answer == result})
    return {
        "sft": sft,
        "prompts_train": [{"prompt": p, "reference": str(r)} for p, r in train],
        "prompts_eval": [{"prompt": p, "reference": str(r)} for p, r in evaluation],
    }


def corpus(**kwargs) -> Iterator[str]:
    """Every text of the task, for training a tokenizer (``ppo.tiny.build.build_tokenizer(texts=...)``)."""
    data = generate(**kwargs)
    for rec in data["sft"]:
        yield DEFAULT_TEMPLATE.format(input=rec["prompt"]) + " " + rec["answer"]
    for rec in data["prompts_eval"]:
        yield DEFAULT_TEMPLATE.format(input=rec["prompt"]) + " " + rec["reference"]


def write_files(out_dir: str = DATA_DIR, **kwargs) -> dict[str, str]:
    """Writes ``{out_dir}/{sft,prompts_train,prompts_eval}.jsonl``; returns their paths by name."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, records in generate(**kwargs).items():
        path = os.path.join(out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
        paths[name] = path
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=DATA_DIR, help="folder to write the three .jsonl files into")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the split and of the SFT samples")
    parser.add_argument("--max_operand", type=int, default=5, help="operands are 0..max_operand")
    parser.add_argument("--n_sft", type=int, default=4000, help="SFT samples")
    parser.add_argument("--wrong_share", type=float, default=0.5,
                        help="probability that an SFT answer is wrong")
    args = parser.parse_args(argv)
    for name, path in write_files(args.output_dir, seed=args.seed, max_operand=args.max_operand,
                                  n_sft=args.n_sft, wrong_share=args.wrong_share).items():
        print(name, path)


if __name__ == "__main__":
    main()
