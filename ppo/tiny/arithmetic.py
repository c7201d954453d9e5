"""The arithmetic task: small sums and differences with a verifiable answer, generated offline.

A prompt is ``What is 17 + 25?`` and its reference ``42``.  Problems are every ``a + b`` and every
``a - b`` with ``a >= b`` for operands in ``0..max_operand``; a seeded ``n_eval`` of them are held
out (never in SFT data or training prompts).  SFT answers are WRONG for a seeded share
``wrong_share`` of the samples (the correct result plus an offset in ``+-1..3``, never negative), so
an SFT model is only partly right and a reward on the exact answer has something to fix.  Same seed,
same files: ``python -m ppo.tiny.arithmetic`` rewrites the shipped ``ppo/tiny/data/arithmetic/``.
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


def prompt_of(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def problems(max_operand: int = 40) -> list[tuple[int, str, int, int]]:
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


def generate(seed: int = SEED, max_operand: int = 40, n_eval: int = 200, n_sft: int = 2000,
             wrong_share: float = 0.3) -> dict[str, list[dict]]:
    """The task's files as lists of records (deterministic for given arguments).

    ``sft``: ``{"prompt", "answer", "reference", "correct"}`` drawn from training problems, wrong
    in ``round(wrong_share * n_sft)`` samples; ``prompts_train`` / ``prompts_eval``:
    ``{"prompt", "reference"}`` of the training / held-out problems.
    """
    if not 0 <= wrong_share <= 1:
        raise ValueError(f"wrong_share={wrong_share} must be in [0, 1]")
    rng = random.Random(seed)
    every = problems(max_operand)
    if not 0 < n_eval < len(every):
        raise ValueError(f"n_eval={n_eval} must be between 1 and {len(every) - 1} (the task has {len(every)} problems)")
    order = list(range(len(every)))
    rng.shuffle(order)
    held_out = set(order[:n_eval])
    train = [p for i, p in enumerate(every) if i not in held_out]
    evaluation = [p for i, p in enumerate(every) if i in held_out]
    n_wrong = round(wrong_share * n_sft)
    wrong = set(rng.sample(range(n_sft), n_wrong))
    sft = []
    for k in range(n_sft):
        a, op, b, result = rng.choice(train)
        answer = wrong_answer(rng, result) if k in wrong else result
        sft.append({"prompt": prompt_of(a, op, b), "answer": str(answer), "reference": str(result),
                    "correct": answer == result})
    return {
        "sft": sft,
        "prompts_train": [{"prompt": prompt_of(a, op, b), "reference": str(r)} for a, op, b, r in train],
        "prompts_eval": [{"prompt": prompt_of(a, op, b), "reference": str(r)} for a, op, b, r in evaluation],
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
    parser.add_argument("--max_operand", type=int, default=40, help="operands are 0..max_operand")
    parser.add_argument("--n_eval", type=int, default=200, help="problems held out for evaluation")
    parser.add_argument("--n_sft", type=int, default=2000, help="SFT samples")
    parser.add_argument("--wrong_share", type=float, default=0.3, help="share of SFT samples with a wrong answer")
    args = parser.parse_args(argv)
    for name, path in write_files(args.output_dir, seed=args.seed, max_operand=args.max_operand,
                                  n_eval=args.n_eval, n_sft=args.n_sft, wrong_share=args.wrong_share).items():
        print(name, path)


if __name__ == "__main__":
    main()
