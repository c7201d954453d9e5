"""PPO under each parallel layout: time per iteration and memory per rank, through the real launcher.

For each model size (``tiny``, ``33m``: ``ppo.tiny.build.TINY`` / ``BENCH_33M``) and each layout
(one process; 2 ranks of data parallel, sharding stage1 and stage2, tensor parallel, pipeline
parallel; 4 ranks of tensor x pipeline parallel) this runs ``--steps``
PPO iterations of the real trainer with ``paddle.distributed.launch`` on random models and the
built-in prompts, and reports per rank:

* ``iteration_seconds``: median wall time of the iterations after the first (rollout + advantages
  + update, from the trainer's own phase timers in ``metrics.jsonl``; every rank does the same
  work, rank 0 reports);
* ``peak_rss_mb``: the rank's resident-set high-water mark (``VmHWM``) at the end;
* ``parameter_mb``: bytes of the actor's and critic's parameters held by the rank (a
  tensor-parallel rank holds its shard); ``frozen_parameter_mb``: the reference's and the reward
  model's (a resource pool of its own holds them whole, and the actor's ranks none);
* ``optimizer_state_mb``: bytes of the optimizer moments held by the rank (sharding stage1 keeps
  the moments of the parameters the rank owns only, and so does stage2);
* ``rollout_copy_mb``: bytes of the separate rollout copies of actor and critic (pipeline layouts
  roll out on non-pipeline copies; 0 when the training models roll out themselves).

Ratios to the single process use the largest figure over the ranks (pipeline stages differ: the
embedding sits on the first, the output head on the last).

With resource pools (``tp2_pools_*``) each iteration also reports when each pool scored
(``scoring_pools``: start and end in seconds after the sequences were sent, medians), the
critical path (the latest end) and the sum of the pools' scoring times (what scoring one after
another would take).

The global batch is the same in every layout (``--prompts`` prompts per iteration), so the figures
compare like with like.  On this 2-core machine two ranks share two cores: the times show the
parallel overhead, not a speed-up.

    python benchmarks/parallel_layouts.py [--config tiny|33m|both] [--steps 3] [--quick]

Prints one JSON object on stdout.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _common import status_kb  # noqa: E402  (benchmarks/_common.py)

LAYOUTS = {
    # name: (ranks, arguments, per-device prompt divisor)
    "single": (1, [], 1),
    "data_parallel_2": (2, [], 2),
    "sharding_stage1_2": (2, ["--sharding_parallel_degree", "2", "--sharding", "stage1"], 2),
    "sharding_stage2_2": (2, ["--sharding_parallel_degree", "2", "--sharding", "stage2"], 2),
    "tensor_parallel_2": (2, ["--tensor_parallel_degree", "2"], 1),
    # pipeline: 2 micro-batches per optimizer step (fleet's 1F1B schedule); rollout on
    # tensor-parallel copies exported from the pipeline, the batch split over its stages
    "pipeline_parallel_2": (2, ["--pipeline_parallel_degree", "2", "--gradient_accumulation_steps", "2"], 1),
    "tensor_x_pipeline_2x2": (4, ["--tensor_parallel_degree", "2", "--pipeline_parallel_degree", "2",
                                  "--gradient_accumulation_steps", "2"], 1),
    # resource pools: the frozen roles on ranks of their own beside a tensor-parallel actor
    "tp2_pools_reference_reward": (4, ["--tensor_parallel_degree", "2", "--resource_pools",
                                       "actor:2,reference:1,reward:1"], 1),
    "tp2_pool_reference_and_reward": (3, ["--tensor_parallel_degree", "2", "--resource_pools",
                                          "actor:2,reference+reward:1"], 1),
    # every role on ranks of its own: the critic scores and trains on its rank
    "tp2_pools_critic_reference_reward": (5, ["--tensor_parallel_degree", "2", "--resource_pools",
                                              "actor:2,critic:1,reference:1,reward:1"], 1),
    # generation on a rank of its own too (the actor's weights sent there after every update)
    "tp2_pools_rollout_critic_reference_reward": (6, ["--tensor_parallel_degree", "2", "--resource_pools",
                                                      "actor:2,rollout:1,critic:1,reference:1,reward:1"], 1),
}


def tensor_mb(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if id(t) in seen or not hasattr(t, "_numel"):
            continue
        seen.add(id(t))
        total += t._numel() * t.element_size()
    return total / 2**20


def optimizer_state(optimizer):
    from ppo.distributed.parallel import inner_optimizer

    inner = inner_optimizer(optimizer)
    while hasattr(inner, "_inner_opt"):
        inner = inner._inner_opt
    accumulators = getattr(inner, "_accumulators", {})
    return [t for per_param in accumulators.values() for t in per_param.values()]


def worker(argv):
    """One rank: train, then write this rank's figures next to the run's output."""
    import ppo  # noqa: F401
    import paddle.distributed as dist

    from ppo.args import PPOArgs, parse_args
    from ppo.distributed import parallel
    from ppo.stages.ppo.serving import serve
    from ppo.stages.ppo.trainer import PPOTrainer
    from ppo.stages.entry import quiet_libraries

    quiet_libraries()
    args = parse_args(PPOArgs, argv)
    ctx = parallel.init_parallel(args, pipeline=True)
    if ctx.serves:  # a rank of another role's pool: its models only (and the critic's optimizer)
        held = serve(args, ctx)
        frozen = [p for m in (held.models.reference, held.models.reward) if m is not None for p in m.parameters()]
        critic, copy = held.critic, held.rollout
        figures = {"rank": ctx.rank, "pool": ctx.pool.name, "peak_rss_mb": round(status_kb("VmHWM") / 1024, 1),
                   "parameter_mb": round(tensor_mb(list(critic.model.parameters())), 2) if critic else 0.0,
                   "frozen_parameter_mb": round(tensor_mb(frozen), 2),
                   "optimizer_state_mb": round(tensor_mb(optimizer_state(critic.optimizer)), 2) if critic else 0.0,
                   "rollout_copy_mb": round(tensor_mb(list(copy.model.parameters())), 2) if copy else 0.0}
        with open(os.path.join(args.output_dir, f"figures.rank{ctx.rank}.json"), "w") as f:
            json.dump(figures, f)
        return
    trainer = PPOTrainer(args)
    trainer.train()
    rank = dist.get_rank() if trainer.ctx.distributed else 0
    params = list(trainer.actor.parameters()) + (list(trainer.critic.parameters()) if trainer.critic else [])
    states = optimizer_state(trainer.actor_opt) + (optimizer_state(trainer.critic_opt) if trainer.critic else [])
    copies = []
    if trainer.layout.separate_rollout:
        copies = list(trainer.models.actor.parameters()) + (list(trainer.models.critic.parameters())
                                                             if trainer.models.critic else [])
    frozen = [p for m in (trainer.models.reference, trainer.models.reward) if m is not None for p in m.parameters()]
    figures = {"rank": rank, "peak_rss_mb": round(status_kb("VmHWM") / 1024, 1),
               "parameter_mb": round(tensor_mb(params), 2), "frozen_parameter_mb": round(tensor_mb(frozen), 2),
               "optimizer_state_mb": round(tensor_mb(states), 2),
               "rollout_copy_mb": round(tensor_mb(copies), 2)}
    with open(os.path.join(args.output_dir, f"figures.rank{rank}.json"), "w") as f:
        json.dump(figures, f)


def build_models(config: str, folder: str) -> dict:
    import ppo  # noqa: F401
    from ppo.models import load_score_model
    from ppo.tiny.build import BENCH_33M, TINY, build_llama, build_tokenizer
    from ppo.stages.entry import quiet_libraries

    quiet_libraries()
    tokenizer = build_tokenizer(os.path.join(folder, "tokenizer"))
    actor, rm = os.path.join(folder, "actor"), os.path.join(folder, "rm")
    build_llama(actor, tokenizer, seed=0, **(dict(BENCH_33M) if config == "33m" else dict(TINY)))
    reward = load_score_model(actor)
    reward.save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    return {"actor": actor, "rm": rm}


def run_layout(name: str, models: dict, opts, workdir: str) -> dict:
    ranks, extra, divisor = LAYOUTS[name]
    accumulation = int(extra[extra.index("--gradient_accumulation_steps") + 1]) \
        if "--gradient_accumulation_steps" in extra else 1
    out = os.path.join(workdir, name)
    argv = [os.path.join(ROOT, "config", "tiny", "ppo_argument.json"), "--actor_model_name_or_path", models["actor"],
            "--reward_model_name_or_path", models["rm"], "--output_dir", out, "--max_steps", str(opts.steps),
            "--per_device_prompt_batch_size", str(opts.prompts // divisor),
            "--per_device_train_batch_size", str(opts.prompts // divisor // accumulation), "--update_iters", "1",
            "--max_length", str(opts.max_length), "--max_new_tokens", str(opts.new_tokens), "--eval_datasets", "",
            "--eval_steps", "0", "--save_steps", "0", "--logging_steps", "1", "--disable_tqdm", "true", *extra]
    cmd = [sys.executable]
    if ranks > 1:
        cmd += ["-m", "paddle.distributed.launch", "--nproc_per_node", str(ranks), "--log_dir", out + "-logs"]
    cmd += [os.path.abspath(__file__), "--worker", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        logs = ""
        for rank in range(ranks if ranks > 1 else 0):
            path = os.path.join(out + "-logs", f"workerlog.{rank}")
            if os.path.exists(path):
                with open(path) as f:
                    logs += f"\n--- rank {rank} ---\n" + f.read()[-2000:]
        raise SystemExit(f"layout {name} failed:\n{proc.stderr[-3000:]}{logs}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    phases = ("time/rollout", "time/advantages", "time/update")
    per_step = [sum(r.get(k, 0.0) for k in phases) for r in rows[1:]] or [sum(rows[0].get(k, 0.0) for k in phases)]
    timed = rows[1:] or rows
    pools = {}  # each pool's scoring interval (seconds after the sequences were sent), median over iterations
    for key in sorted(k for k in timed[0] if k.startswith("time/pool_") and k.endswith("_start")):
        name = key[len("time/pool_"):-len("_start")]
        start = statistics.median(r[key] for r in timed)
        end = statistics.median(r[f"time/pool_{name}_end"] for r in timed)
        pools[name] = {"start": round(start, 3), "end": round(end, 3), "seconds": round(end - start, 3)}
    ranks_figures = []
    for rank in range(ranks):
        with open(os.path.join(out, f"figures.rank{rank}.json")) as f:
            ranks_figures.append(json.load(f))
    return {"ranks": ranks, "arguments": " ".join(extra) or "(none)",
            "iteration_seconds": round(statistics.median(per_step), 3),
            "phase_seconds": {k.split("/")[1]: round(statistics.median(r.get(k, 0.0) for r in rows[1:] or rows), 3)
                              for k in phases},
            "per_rank": ranks_figures,
            **({"scoring_pools": pools, "scoring_critical_path_seconds": max(p["end"] for p in pools.values()),
                "scoring_sum_of_pools_seconds": round(sum(p["seconds"] for p in pools.values()), 3)}
               if pools else {})}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "33m", "both"], default=None)
    parser.add_argument("--steps", type=int, default=3, help="PPO iterations per layout (the first is warm-up)")
    parser.add_argument("--prompts", type=int, default=16, help="global prompts per iteration")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 iterations, 8 prompts, 8 new tokens")
    parser.add_argument("--layouts", default="", help="comma-separated layouts to run (default: all; 'single' is "
                                                     "always run, the ratios are to it)")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.config, opts.steps, opts.prompts, opts.new_tokens = opts.config or "tiny", 2, 8, 8
    opts.config = opts.config or "both"
    if opts.steps < 2:
        parser.error("--steps must be >= 2 (the first iteration is warm-up)")
    out = {"benchmark": "parallel_layouts",
           "command": "python benchmarks/parallel_layouts.py " + " ".join(argv),
           "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
           "settings": {"global_prompts_per_iteration": opts.prompts, "max_new_tokens": opts.new_tokens,
                        "iterations": opts.steps, "timed": "median of iterations 2..N"},
           "results": {}}
    with tempfile.TemporaryDirectory(prefix="ppo-layouts-") as tmp:
        for config in (("tiny", "33m") if opts.config == "both" else (opts.config,)):
            models = build_models(config, os.path.join(tmp, config, "models"))
            results = {}
            chosen = [n for n in opts.layouts.split(",") if n] or list(LAYOUTS)
            unknown = [n for n in chosen if n not in LAYOUTS]
            if unknown:
                parser.error(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
            for name in ["single", *[n for n in chosen if n != "single"]]:
                print(f"[parallel_layouts] {config} {name}", file=sys.stderr, flush=True)
                results[name] = run_layout(name, models, opts, os.path.join(tmp, config))
            single = results["single"]["per_rank"][0]
            for name, r in results.items():
                largest = {k: max(f[k] for f in r["per_rank"]) for k in ("parameter_mb", "optimizer_state_mb",
                                                                          "peak_rss_mb")}
                r["ratios_to_single"] = {
                    "iteration_seconds": round(r["iteration_seconds"] / results["single"]["iteration_seconds"], 3),
                    "parameter_mb_per_rank": round(largest["parameter_mb"] / single["parameter_mb"], 3),
                    "optimizer_state_mb_per_rank": round(largest["optimizer_state_mb"] / single["optimizer_state_mb"], 3)
                    if single["optimizer_state_mb"] else None,
                    "peak_rss_mb_per_rank": round(largest["peak_rss_mb"] / single["peak_rss_mb"], 3)}
            out["results"][config] = results
    import paddle

    out["machine"]["paddle"] = paddle.__version__
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
