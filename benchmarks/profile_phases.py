"""Where the time of a training and a scoring phase goes: paddle's profiler over one actor update
and one scoring forward, per-operator totals.

A fresh worker process per checkout (this one, and ``--reference PATH [PATH ...]`` for reference
checkouts such as ``git worktree add --detach /tmp/ref 5a67775``) builds a ``PPOTrainer`` over the same random
models (``ppo_iteration.build_models``), makes one experience batch on the fixed workload (random
prompts of ``--prompt_length`` tokens, ``--new_tokens`` sampled tokens, no padding), warms up, times
each region without the profiler (median of ``--repeats``) and then runs it once under
``paddle.profiler`` (CPU target):

* ``actor_update``: ``trainer.actor_step`` over every row of the batch, ``--accumulation``
  micro-batches of ``--train_batch`` rows (forward, log-probs, loss, backward, clip, AdamW);
* ``scoring_forward``: the reference model's log-probs of the whole batch on its inference view
  (``InferenceModel.log_probs``, what a scoring phase runs per model).

Per region: wall seconds, the operators' summed self time (an operator's time minus the
operators nested inside it) and the rest (Python, dispatch, autograd bookkeeping), the GEMM share
(matmul and its gradient), and the top operators by self time with their call counts and shares of
the region's wall time under the profiler.

    python benchmarks/profile_phases.py [--reference /tmp/ref ...] [--config 33m] [--top 25]
        [--variants cpu_gemm=paddle bf16=true]

Each worker runs with the MKL thread setting its checkout gives it (``MKL_NUM_THREADS`` from the
environment wins: set it to 1 to compare the operators of two checkouts at equal matmul speed).

Prints one JSON object and writes it to ``--output`` (default
``benchmarks/results/profile_phases_<config>.json``).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _common import mkl_threads, worker_env  # noqa: E402  (benchmarks/_common.py, before ppo is imported)


def is_gemm(name: str) -> bool:
    """Matrix products (forward and gradient), the work the compute floor counts."""
    lowered = name.lower()
    return "matmul" in lowered or lowered in ("linear", "linear_grad", "lineargradnode")


def op_totals(profiler_result) -> dict:
    """Per operator name: calls, total and self nanoseconds; and the summed time of the outermost
    operators (what the region spent inside any operator)."""
    from paddle.profiler.profiler_statistic import wrap_tree
    from paddle.profiler.utils import TracerEventType

    trees, _ = wrap_tree(profiler_result.get_data())
    ops: dict[str, dict] = {}
    outermost = 0

    def nested_ops(node):
        """Duration of the outermost operators below ``node`` (through non-operator events)."""
        total = 0
        for child in node.children_node:
            if child.type == TracerEventType.Operator:
                total += child.end_ns - child.start_ns
            else:
                total += nested_ops(child)
        return total

    def walk(node, inside_op: bool):
        nonlocal outermost
        here = node.type == TracerEventType.Operator
        if here:
            duration = node.end_ns - node.start_ns
            # "matmul dygraph" (forward) / "Global_MatmulGradNode" (backward) -> "matmul" / "MatmulGradNode"
            name = node.name.replace(" dygraph", "").replace("Global_", "")
            item = ops.setdefault(name, {"calls": 0, "total_ns": 0, "self_ns": 0})
            item["calls"] += 1
            item["total_ns"] += duration
            item["self_ns"] += duration - nested_ops(node)
            if not inside_op:
                outermost += duration
        for child in node.children_node:
            walk(child, inside_op or here)

    for root in trees.values():
        walk(root, False)
    return {"ops": ops, "outermost_ns": outermost}


def summarize(totals: dict, wall_s: float, top: int) -> dict:
    ops = totals["ops"]
    wall_ns = wall_s * 1e9
    self_total = sum(o["self_ns"] for o in ops.values())
    gemm = sum(o["self_ns"] for name, o in ops.items() if is_gemm(name))
    ranked = sorted(ops.items(), key=lambda kv: -kv[1]["self_ns"])
    calls = sum(o["calls"] for o in ops.values())
    return {
        "wall_seconds_profiled": round(wall_s, 4),
        "operator_calls": calls,
        "operator_self_seconds": round(self_total / 1e9, 4),
        "gemm_self_seconds": round(gemm / 1e9, 4),
        "gemm_share_of_wall": round(gemm / wall_ns, 4),
        "non_gemm_operator_share_of_wall": round((self_total - gemm) / wall_ns, 4),
        "outside_operators_share_of_wall": round(1 - totals["outermost_ns"] / wall_ns, 4),
        "top_ops_by_self_time": [
            {"op": name, "calls": o["calls"], "self_ms": round(o["self_ns"] / 1e6, 2),
             "share_of_wall": round(o["self_ns"] / wall_ns, 4),
             "mean_self_us": round(o["self_ns"] / o["calls"] / 1e3, 1)}
            for name, o in ranked[:top]],
    }


# ---------------------------------------------------------------------------------------------
# Worker (one checkout, fresh process)


def run_worker(opts) -> dict:
    import ppo  # noqa: F401  (MKL environment before paddle)
    import numpy as np
    import paddle
    import paddle.profiler as profiler

    from ppo.args import PPOArgs, validate
    from ppo.rollout.inference import InferenceModel
    from ppo.stages.ppo.trainer import PPOTrainer
    try:
        from ppo.stages.entry import quiet_libraries
    except ImportError:  # a reference checkout from before the layering
        from ppo.training import quiet_libraries

    quiet_libraries()
    rows = opts.train_batch * opts.accumulation
    args = PPOArgs(
        actor_model_name_or_path=opts.actor, reward_model_name_or_path=opts.rm,
        train_datasets="tiny-prompts/train", output_dir=os.path.join(opts.workdir, "output"),
        max_length=opts.prompt_length + opts.new_tokens, max_new_tokens=opts.new_tokens,
        per_device_prompt_batch_size=rows, per_device_train_batch_size=opts.train_batch,
        gradient_accumulation_steps=opts.accumulation, max_steps=4, disable_tqdm=True, seed=1,
        **json.loads(opts.overrides or "{}"))
    validate(args)
    trainer = PPOTrainer(args)
    vocab = int(trainer.actor.config.vocab_size)
    rng = np.random.default_rng(0)
    ids = paddle.to_tensor(rng.integers(4, vocab, size=(rows, opts.prompt_length)), dtype="int64")
    mask = paddle.ones_like(ids)
    paddle.seed(1000)
    if hasattr(trainer, "experience"):
        exp = trainer.experience(ids, mask)
        exp = trainer.advantages(exp)
    else:  # a reference checkout from before the trainer phases
        from ppo.rollout.collect import collect

        exp = collect(trainer.models, ids, mask, trainer.gen, args.max_length, args.normalize_reward)
        trainer.compute_advantages(exp)
    trainer.offload.before_update()
    micro = [exp.select(np.arange(i * opts.train_batch, (i + 1) * opts.train_batch)) for i in range(opts.accumulation)]
    tokens = [float(m.action_mask.sum()) for m in micro]
    weights = [t / sum(tokens) for t in tokens]  # the token-mean weights of one data rank
    view = InferenceModel.of(trainer.models.reference)

    regions = {
        "actor_update": lambda: trainer.actor_step(micro, weights, 1),
        "scoring_forward": lambda: view.log_probs(exp.sequences, exp.attention_mask, args.temperature).numpy(),
    }
    out = {"commit": opts.commit, "mkl_num_threads": mkl_threads(), "rows": rows,
           "sequence_length": int(exp.sequences.shape[1]),
           "train_micro_batch": opts.train_batch, "accumulation": opts.accumulation}
    for name, fn in regions.items():
        fn()  # warm-up
        runs = []
        for _ in range(opts.repeats):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda p: None)
        prof.start()
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        prof.stop()
        out[name] = {"wall_seconds_median": round(statistics.median(runs), 4),
                     "wall_seconds_runs": [round(r, 4) for r in runs],
                     **summarize(op_totals(prof.profiler_result), wall, opts.top)}
        del prof  # paddle allows one profiler at a time: the next region makes its own
    return out


def launch(code_root: str, dirs: dict, opts, workdir: str, overrides: dict | None = None) -> dict:
    result = os.path.join(workdir, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--actor", dirs["actor"], "--rm", dirs["rm"],
           "--workdir", workdir, "--result", result, "--commit", _git_head(code_root),
           "--prompt_length", str(opts.prompt_length), "--new_tokens", str(opts.new_tokens),
           "--train_batch", str(opts.train_batch), "--accumulation", str(opts.accumulation),
           "--repeats", str(opts.repeats), "--top", str(opts.top), "--code_root", code_root,
           "--overrides", json.dumps(overrides or {})]
    env = worker_env(code_root)
    log = os.path.join(workdir, "stderr.txt")
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=code_root)
    if proc.returncode != 0 or not os.path.exists(result):
        with open(log) as f:
            raise SystemExit(f"profile worker for {code_root} failed (exit {proc.returncode}):\n{f.read()[-4000:]}")
    with open(result) as f:
        return json.load(f)


def _git_head(folder: str) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["33m", "tiny"], default="33m")
    parser.add_argument("--reference", nargs="+", metavar="REF_CHECKOUT", default=[],
                        help="also profile these checkouts' trainers (same models and batch), reported as "
                             "'before_<commit>'")
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--train_batch", type=int, default=4, help="rows per micro-batch (default 4)")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs without the profiler (median)")
    parser.add_argument("--top", type=int, default=25, help="operators listed per region")
    parser.add_argument("--variants", nargs="+", metavar="KEY=VALUE[,KEY=VALUE]", default=[],
                        help="also profile this checkout with these PPO arguments, e.g. cpu_gemm=paddle bf16=true "
                             "(reported as 'after[<variant>]')")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine shared)")
    parser.add_argument("--output", default=None,
                        help="JSON file (default benchmarks/results/profile_phases_<config>.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code_root", default=ROOT, help=argparse.SUPPRESS)
    for hidden in ("--actor", "--rm", "--workdir", "--result", "--commit", "--overrides"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    if opts.worker:
        if opts.code_root != ROOT:
            sys.path.insert(0, opts.code_root)
        result = run_worker(opts)
        with open(opts.result, "w") as f:
            json.dump(result, f)
        return

    from ppo_iteration import build_models  # benchmarks/ppo_iteration.py (this script's folder)

    out = {"benchmark": "profile_phases",
           "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)]
                                           + (argv if argv is not None else sys.argv[1:])),
           "note": opts.note, "load_average_at_start": os.getloadavg(),
           "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform()},
           "settings": {"config": opts.config, "rows": opts.train_batch * opts.accumulation,
                        "prompt_length": opts.prompt_length, "new_tokens": opts.new_tokens,
                        "train_micro_batch": opts.train_batch, "accumulation": opts.accumulation,
                        "repeats": opts.repeats},
           "results": {}}
    with tempfile.TemporaryDirectory(prefix="ppo-profile-") as tmp:
        dirs = build_models(opts.config, os.path.join(tmp, "models"))
        sides = [(f"before_{_git_head(p)[:7]}", os.path.abspath(p), {}) for p in opts.reference] + [("after", ROOT, {})]
        for variant in opts.variants:
            pairs = dict(item.split("=", 1) for item in variant.split(","))
            values = {k: {"true": True, "false": False}.get(v.lower(), v) for k, v in pairs.items()}
            sides.append((f"after[{variant}]", ROOT, values))
        for i, (side, root, overrides) in enumerate(sides):
            workdir = os.path.join(tmp, f"side{i}")
            os.makedirs(workdir)
            print(f"[profile_phases] {side}: {root}", file=sys.stderr, flush=True)
            out["results"][side] = launch(root, dirs, opts, workdir, overrides)
    out["load_average_at_end"] = os.getloadavg()
    text = json.dumps(out, indent=1)
    print(text)
    path = opts.output or os.path.join(ROOT, "benchmarks", "results", f"profile_phases_{opts.config}.json")
    with open(path, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
