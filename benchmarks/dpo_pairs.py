"""DPO's policy forward + backward on a batch of pairs: two rows per pair against one packed row.

    python benchmarks/dpo_pairs.py [--config tiny|33m] [--pairs 8] [--prompt 128] [--answer 64] [--repeats 5]

Builds a random model of the size (``ppo.tiny.build``), draws ``--pairs`` pairs whose prompts are
``--prompt`` tokens and whose answers are 0.5-1.5 x ``--answer`` tokens, and times
``ppo.stages.dpo.reference.pair_log_probs`` forward + backward on the two-row batch ``[2B, T]`` and
on the packed batch ``[B, T']`` (``pack_pairs``), alternating, ``--repeats`` times each.  Prints one
JSON object: the medians, their ratio and the tokens each form computes.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ppo  # noqa: E402,F401  (MKL environment)
from _common import mkl_threads  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="33m", choices=("tiny", "33m"))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--answer", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import numpy as np
    import paddle

    from ppo.data.preference import collate_packed_pairs, collate_pairs
    from ppo.models import load_causal_lm
    from ppo.stages.dpo.reference import pair_log_probs
    from ppo.tiny.build import BENCH_33M, TINY, build_causal_lm, build_tokenizer

    size = BENCH_33M if args.config == "33m" else TINY
    folder = tempfile.mkdtemp(prefix="dpo-bench-")
    tokenizer = build_tokenizer(os.path.join(folder, "tokenizer"))
    build_causal_lm(os.path.join(folder, "model"), tokenizer, seed=0,
                    **{**size, "vocab_size": len(tokenizer), "max_position_embeddings": 1024})
    model = load_causal_lm(os.path.join(folder, "model"))
    rng = np.random.default_rng(0)
    V = len(tokenizer)
    items = []
    for _ in range(args.pairs):
        prompt = rng.integers(5, V, args.prompt).tolist()
        a, b = (rng.integers(5, V, int(args.answer * rng.uniform(0.5, 1.5))).tolist() for _ in range(2))
        items.append({"better_input_ids": prompt + a, "worse_input_ids": prompt + b, "prompt_length": args.prompt})
    forms = {"two_rows": collate_pairs(items, 0), "packed": collate_packed_pairs(items, 0)}

    def step(batch):
        chosen, rejected, _, _ = pair_log_probs(model, batch)
        (chosen.sum() - rejected.sum()).backward()
        model.clear_gradients()

    times = {name: [] for name in forms}
    for name, batch in forms.items():
        step(batch)  # warm-up
    for _ in range(args.repeats):
        for name, batch in forms.items():
            start = time.perf_counter()
            step(batch)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    tokens = {"two_rows": int(np.prod(forms["two_rows"]["better_input_ids"].shape)) * 2,
              "packed": int(np.prod(forms["packed"]["packed_input_ids"].shape))}
    print(json.dumps({"config": args.config, "pairs": args.pairs, "prompt_tokens": args.prompt,
                      "answer_tokens": args.answer, "repeats": args.repeats, "mkl_threads": mkl_threads(),
                      "seconds_median": {k: round(v, 4) for k, v in medians.items()},
                      "packed_over_two_rows": round(medians["packed"] / medians["two_rows"], 3),
                      "tokens_computed": tokens}, indent=1))


if __name__ == "__main__":
    main()
