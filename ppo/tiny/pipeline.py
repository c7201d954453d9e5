"""The main job on the built-in example: build -> SFT -> reward model -> PPO -> gold-rule report.

    python -m ppo.tiny.pipeline [--output_dir output/tiny] [--nproc 1] [--quick] [--family llama|qwen2]

``--family qwen2`` builds a tiny Qwen2 base with tied embeddings (LLaMA: untied, as before).

Each stage runs its real entry point (``paddle.distributed.launch`` when ``--nproc`` > 1) with
the presets in ``config/tiny``.  The report prints the gold score (share of positive adjectives,
see ``ppo/tiny/task.py``) of the SFT and the PPO policy on held-out prompts, the reward model's
held-out accuracy, and writes ``report.json`` and ``ppo_curves.png`` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import ppo  # noqa: F401  (sets the MKL environment before paddle loads)
from ppo.entry import quiet_libraries
from ppo.models.families import DEMO_FAMILY, supported
from ppo.tiny.build import build_causal_lm, build_tokenizer
from ppo.tiny.evaluate import gold_curve, gold_eval

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --quick: a shortened run for the test suite (same stages, fewer steps)
QUICK = {
    "sft": ["--num_train_epochs", "1"],
    "rm": ["--num_train_epochs", "1"],
    "ppo": ["--max_steps", "20", "--eval_steps", "10"],
}


def run_stage(script: str, config: str, overrides: list[str], nproc: int, log_dir: str) -> float:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir", log_dir]
    cmd += [os.path.join(ROOT, script), os.path.join(ROOT, config), *overrides, "--disable_tqdm", "true"]
    print(f"\n$ {' '.join(cmd[1:] if nproc > 1 else cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - start


def plot(ppo_dir: str, curve: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [json.loads(l) for l in open(os.path.join(ppo_dir, "metrics.jsonl")) if '"split": "train"' in l]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["reward"] for r in train])
    axes[0].set_title("reward (reward model)")
    axes[1].plot([r["step"] for r in train], [r["kl"] for r in train], color="tab:orange")
    axes[1].set_title("KL(actor || reference) per response")
    axes[2].plot([s for s, _ in curve], [g for _, g in curve], marker="o", color="tab:green")
    axes[2].set_title("gold score, held-out prompts")
    axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="output/tiny", help="where models, logs and the report go")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per stage (data parallel over gloo on CPU)")
    parser.add_argument("--quick", action="store_true", help="shortened run (used by the test suite)")
    parser.add_argument("--family", default=DEMO_FAMILY, choices=supported(),
                        help="model family of the base model (qwen2: tied embeddings)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output_dir)
    quiet_libraries()
    start = time.time()
    times = {}
    if not os.path.isfile(os.path.join(out, "base", "config.json")):
        tokenizer = build_tokenizer(os.path.join(out, "tokenizer"))
        build_causal_lm(os.path.join(out, "base"), tokenizer, family=args.family, seed=0,
                        tie_word_embeddings=args.family == "qwen2")
    quick = QUICK if args.quick else {"sft": [], "rm": [], "ppo": []}
    paths = {k: os.path.join(out, k) for k in ("base", "sft", "rm", "ppo")}
    times["sft"] = run_stage("ppo/run_sft.py", "config/tiny/sft_argument.json",
                             ["--model_name_or_path", paths["base"], "--output_dir", paths["sft"], *quick["sft"]],
                             args.nproc, os.path.join(out, "logs", "sft"))
    times["reward_model"] = run_stage("rm/run_reward.py", "config/tiny/rm_argument.json",
                                      ["--model_name_or_path", paths["sft"], "--output_dir", paths["rm"],
                                       *quick["rm"]], args.nproc, os.path.join(out, "logs", "rm"))
    times["ppo"] = run_stage("ppo/run_ppo.py", "config/tiny/ppo_argument.json",
                             ["--actor_model_name_or_path", paths["sft"], "--reward_model_name_or_path", paths["rm"],
                              "--output_dir", paths["ppo"], *quick["ppo"]], args.nproc,
                             os.path.join(out, "logs", "ppo"))
    rm_eval = [json.loads(l) for l in open(os.path.join(paths["rm"], "metrics.jsonl")) if '"split": "eval"' in l]
    sft_gold = gold_eval(paths["sft"])
    ppo_gold = gold_eval(os.path.join(paths["ppo"], "policy"))
    curve = gold_curve(paths["ppo"])
    plot(paths["ppo"], curve, os.path.join(out, "ppo_curves.png"))
    report = {
        "reward_model_heldout_accuracy": rm_eval[-1]["accuracy"],
        "sft_gold_sampled": sft_gold["gold_sampled"], "ppo_gold_sampled": ppo_gold["gold_sampled"],
        "sft_gold_greedy": sft_gold["gold_greedy"], "ppo_gold_greedy": ppo_gold["gold_greedy"],
        "gold_curve": curve, "seconds": {k: round(v, 1) for k, v in times.items()},
        "total_seconds": round(time.time() - start, 1),
        "examples": {"sft": sft_gold["examples_sampled"], "ppo": ppo_gold["examples_sampled"]},
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\n=== built-in example: gold-rule score on held-out prompts (share of positive adjectives) ===")
    print(f"reward model held-out pair accuracy: {report['reward_model_heldout_accuracy']:.3f}")
    print(f"SFT policy  gold score: sampled {report['sft_gold_sampled']:.3f}   greedy {report['sft_gold_greedy']:.3f}")
    print(f"PPO policy  gold score: sampled {report['ppo_gold_sampled']:.3f}   greedy {report['ppo_gold_greedy']:.3f}")
    print(f"time: {report['seconds']}  total {report['total_seconds']} s")
    print(f"report: {os.path.join(out, 'report.json')}   plot: {os.path.join(out, 'ppo_curves.png')}")
    return report


if __name__ == "__main__":
    main()
