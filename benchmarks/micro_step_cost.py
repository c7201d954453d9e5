"""What one more micro-batch costs in the PPO update, in tokens: the actor's and the critic's
micro-step (forward + backward of one micro-batch, no optimizer step) timed over a grid of rows x
width on the 33.5M model, and ``time = a + b x tokens`` fitted by least squares; ``a / b`` is the
overhead in tokens that ``ppo.core.batching.MICRO_BATCH_OVERHEAD_TOKENS`` stands for.  Prints JSON.

    python benchmarks/micro_step_cost.py [--config 33m] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["33m", "tiny"], default="33m")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per shape (median; default 5)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--out", default=None, help="also write the JSON here")
    opts = parser.parse_args(argv)

    import ppo  # noqa: F401  (MKL environment before paddle)
    import numpy as np
    import paddle

    from _common import matmul_gflops, mkl_threads
    from ppo.stages.ppo import steps as ppo_steps
    from ppo.args import PPOArgs, validate
    from ppo.stages.entry import quiet_libraries
    from ppo.stages.ppo.trainer import PPOTrainer
    from ppo_iteration import build_models

    quiet_libraries()
    width = max(opts.widths)
    rows = max(opts.rows)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build_models(opts.config, tmp)
        args = PPOArgs(actor_model_name_or_path=dirs["actor"], reward_model_name_or_path=dirs["rm"],
                       train_datasets="tiny-prompts/train", output_dir=os.path.join(tmp, "output"),
                       max_length=width, max_new_tokens=width // 2, per_device_prompt_batch_size=rows,
                       per_device_train_batch_size=rows, gradient_accumulation_steps=1, max_steps=4,
                       disable_tqdm=True, seed=1)
        validate(args)
        trainer = PPOTrainer(args)
        vocab = int(trainer.actor.config.vocab_size)
        ids = paddle.to_tensor(np.random.default_rng(0).integers(4, vocab, size=(rows, width - width // 2)),
                               dtype="int64")
        paddle.seed(1000)
        exp = trainer.advantages(trainer.experience(ids, paddle.ones_like(ids)))
        kl = trainer.kl_ctl.value
        steps = {
            "actor": lambda m: ppo_steps.actor_gradients(trainer.actor_train, [m], [1.0], args, kl,
                                                         trainer.precision, None),
            "critic": lambda m: ppo_steps.critic_gradients(trainer.critic_train, [m], [1.0], args,
                                                           trainer.precision),
        }
        out = {"benchmark": "micro_step_cost", "config": opts.config, "mkl_num_threads": mkl_threads(),
               "matmul_gflops": round(matmul_gflops(), 1), "repeats": opts.repeats, "shapes": [], "fit": {}}
        for name, step in steps.items():
            points = []
            for r in opts.rows:
                for w in opts.widths:
                    sub = exp.select(np.arange(r))
                    mask = sub.attention_mask.numpy().copy()
                    mask[:, w:] = 0  # every row w real tokens: packed to [r, w]
                    sub.attention_mask = paddle.to_tensor(mask)
                    m = sub.packed()
                    step(m)  # warm-up
                    times = []
                    for _ in range(opts.repeats):
                        t = time.perf_counter()
                        step(m)
                        times.append(time.perf_counter() - t)
                    for p in (trainer.actor_train if name == "actor" else trainer.critic_train).parameters():
                        p.clear_gradient()
                    points.append((r * w, statistics.median(times)))
                    out["shapes"].append({"model": name, "rows": r, "width": w, "tokens": r * w,
                                          "seconds_median": round(statistics.median(times), 5)})
            x = np.array([p[0] for p in points], float)
            y = np.array([p[1] for p in points], float)
            b, a = np.polyfit(x, y, 1)
            out["fit"][name] = {"seconds_per_micro_batch": round(float(a), 5), "seconds_per_token": round(float(b), 7),
                                "overhead_tokens": round(float(a / b), 1),
                                "max_relative_residual": round(float(np.max(np.abs(y - (a + b * x)) / y)), 3)}
    text = json.dumps(out, indent=1)
    print(text)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
