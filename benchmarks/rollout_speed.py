"""Rollout throughput: the inference model vs paddlenlp's stock ``generate`` on the same weights.

Four paths are timed in one run: ``inference`` (``ppo.rollout.inference.InferenceModel``, the default
rollout path), ``inference_static`` (the same with its decode step compiled as a static graph,
``rollout_static_graph``), ``forward_loop`` (the same sampling loop over paddlenlp's forward and
cache) and ``stock`` (paddlenlp's ``generate``).

    python benchmarks/rollout_speed.py [--config 33m|tiny] [--batch 16] [--prompt 64] [--new 64] [--repeats 5]

Prints one JSON object: tokens/s of each path (median of the repeats), their ratio, and the
fraction of the compute floor at the fp32 matmul rate measured in this run, counted two ways:
``floor_generated`` = 2 x params x generated tokens (the decode steps only) and ``floor_all`` =
2 x params x (prompt + generated) tokens (the prompt's prefill is work every path must do too).

``--compare REF_CHECKOUT [...]`` times the inference model of each reference checkout (e.g.
``git worktree add --detach /tmp/ref <commit>``) beside this one's: a fresh process per side and
round, sides alternating for ``--rounds`` rounds, each process the median of ``--repeats`` timed
rollouts after a warm-up on the same random model and prompts; reports per side the median over
rounds, the speed-ups, whether greedy tokens agree, the load average, and the prefill and decode
step alone with the step's operator profile (calls per step, the matmuls' share).

    python benchmarks/rollout_speed.py --config 33m --compare /tmp/ref --rounds 5 --output FILE
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

from _common import matmul_gflops, mkl_threads, worker_env  # noqa: E402  (benchmarks/_common.py, before ppo)


def random_model(args):
    """The random model (paddle seed 0) and prompts every path and checkout decodes."""
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from ppo.tiny.build import BENCH_33M, TINY

    dims = dict(BENCH_33M) if args.config == "33m" else dict(TINY, vocab_size=320)
    paddle.seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dims, use_flash_attention=False, tie_word_embeddings=False))
    model.eval()
    ids = paddle.randint(4, dims["vocab_size"], [args.batch, args.prompt])
    return model, dims, ids, paddle.ones_like(ids)


def timed(fn, repeats: int, cpu: list | None = None) -> list:
    """Wall seconds of ``repeats`` calls after a warm-up (their CPU seconds appended to ``cpu``)."""
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        runs.append(time.perf_counter() - t)
        if cpu is not None:
            cpu.append(time.process_time() - c)
    return runs


def _matmul_path() -> str:
    """Switch on the checkout's default CPU matmul path, as its trainers do (``cpu_gemm`` auto), and
    name it; a checkout without one runs paddle's matmul."""
    try:
        from ppo.models import cpu_gemm
    except ImportError:
        return "paddle"
    notice = cpu_gemm.select("auto")
    return "paddle" if notice and not cpu_gemm.STATE.active else "onednn"


def inference_worker(args) -> dict:
    """``--compare`` worker: this process's ``ppo`` (the checkout on its path) decodes the random
    model with its inference model: sampled rollouts timed, greedy tokens saved for the parent."""
    import numpy as np

    from ppo.rollout.inference import InferenceModel
    from ppo.rollout.collect import GenerationConfig, generate
    try:
        from ppo.stages.entry import quiet_libraries
    except ImportError:  # a reference checkout from before the layering
        from ppo.training import quiet_libraries

    quiet_libraries()
    gemm = _matmul_path()
    model, dims, ids, mask = random_model(args)
    eos = dims["vocab_size"] + 1  # outside the vocabulary: every row decodes all steps
    inference = InferenceModel(model)
    sampled = GenerationConfig(max_new_tokens=args.new, do_sample=True, temperature=1.0)
    cpu = []
    runs = timed(lambda: generate(inference, ids, mask, sampled, eos_token_id=eos, pad_token_id=0), args.repeats, cpu)
    greedy = generate(inference, ids, mask, GenerationConfig(max_new_tokens=args.new, do_sample=False),
                      eos_token_id=eos, pad_token_id=0)[0]
    np.save(args.greedy_file, greedy.numpy())
    return {"matmul_path": gemm, "seconds": statistics.median(runs), "runs": runs, "cpu_seconds": statistics.median(cpu),
            "mkl_num_threads": mkl_threads(), **step_profile(inference, ids, mask, args.new)}


def step_profile(decoder, ids, mask, new: int, steps: int = 32) -> dict:
    """Where a decode step's time goes: prefill and decode-step seconds (median of 3 rollouts of
    ``steps`` steps on random tokens), and paddle's profiler over ``steps`` steps: operators per
    step, the matmuls' share of the wall time, the top operators by self time per step."""
    import paddle
    import paddle.profiler as profiler

    from profile_phases import op_totals, summarize  # benchmarks/profile_phases.py

    B, P = ids.shape
    tokens = paddle.randint(4, 100, [steps + 4, B])
    ones = paddle.ones([B], "int64")
    positions = paddle.arange(P, dtype="int64").unsqueeze(0).expand([B, P])  # (prompts without padding)

    def rollout(measure=None):
        with paddle.no_grad():
            t = time.perf_counter()
            decoder.start(ids, mask, positions, new)
            prefill = time.perf_counter() - t
            for i in range(2):  # warm
                decoder.step(tokens[i], ones, positions[:, -1:] + 1 + i)
            if measure is not None:
                measure.start()
            t = time.perf_counter()
            for i in range(2, steps + 2):
                decoder.step(tokens[i], ones, positions[:, -1:] + 1 + i)
            step = (time.perf_counter() - t) / steps
            if measure is not None:
                measure.stop()
            decoder.release()
        return prefill, step

    times = [rollout() for _ in range(3)]
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda p: None)
    _, profiled = rollout(prof)
    summary = summarize(op_totals(prof.profiler_result), profiled * steps, 12)
    return {"prefill_seconds": round(statistics.median(t[0] for t in times), 4),
            "decode_step_ms": round(statistics.median(t[1] for t in times) * 1e3, 3),
            "decode_step_profile": {
                "ms_per_step_profiled": round(profiled * 1e3, 3),
                "operators_per_step": round(summary["operator_calls"] / steps, 1),
                "gemm_share_of_wall": summary["gemm_share_of_wall"],
                "non_gemm_operator_share_of_wall": summary["non_gemm_operator_share_of_wall"],
                "outside_operators_share_of_wall": summary["outside_operators_share_of_wall"],
                "top_ops_per_step": [{"op": o["op"], "calls": round(o["calls"] / steps, 1),
                                      "self_ms": round(o["self_ms"] / steps, 3)}
                                     for o in summary["top_ops_by_self_time"]]}}


def compare_checkouts(args, argv) -> dict:
    """Reference checkouts' inference models beside this one's, fresh processes alternating."""
    import numpy as np

    sides = [("reference" if len(args.compare) == 1 else f"reference{i}", os.path.abspath(p))
             for i, p in enumerate(args.compare)] + [("current", ROOT)]
    for _, root in sides[:-1]:
        if not os.path.isdir(os.path.join(root, "ppo")):
            raise SystemExit(f"--compare: '{root}' is not a checkout of this project (no ppo/ folder)")
    runs = {name: [] for name, _ in sides}
    greedy = {}
    loads = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="rollout-compare-") as tmp:
        for k in range(args.rounds):
            for name, root in sides:
                result, tokens = os.path.join(tmp, f"{name}{k}.json"), os.path.join(tmp, f"{name}.npy")
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--config", args.config,
                       "--batch", str(args.batch), "--prompt", str(args.prompt), "--new", str(args.new),
                       "--repeats", str(args.repeats), "--result", result, "--greedy_file", tokens]
                proc = subprocess.run(cmd, env=worker_env(root), cwd=root, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"worker for {root} failed:\n{proc.stderr[-3000:]}")
                with open(result) as f:
                    runs[name].append(json.load(f))
                greedy[name] = np.load(tokens)
                print(f"[rollout_speed] round {k} {name}: {runs[name][-1]['seconds']:.3f} s", file=sys.stderr,
                      flush=True)
            loads.append(os.getloadavg())
    tokens = args.batch * args.new
    out = {"benchmark": "rollout_speed --compare",
           "command": "python " + " ".join(["benchmarks/rollout_speed.py"]
                                           + (argv if argv is not None else sys.argv[1:])),
           "note": args.note, "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                                          "platform": platform.platform()},
           "load_average_1_5_15_min_per_round": [[round(x, 2) for x in load] for load in loads],
           "settings": {"config": args.config, "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new,
                        "sampling": "temperature 1, no top-k / top-p, no EOS (every row decodes every step)",
                        "rounds": args.rounds, "repeats_per_round": args.repeats},
           "sides": {}}
    for name, root in sides:
        rounds = [r["seconds"] for r in runs[name]]
        fastest = min(x for r in runs[name] for x in r["runs"])
        out["sides"][name] = {"path": root, "commit": _git_head(root),
                              "mkl_num_threads": runs[name][0]["mkl_num_threads"],
                              "seconds_median_over_rounds": round(statistics.median(rounds), 4),
                              "tokens_per_s": round(tokens / statistics.median(rounds), 1),
                              "seconds_fastest_run": round(fastest, 4),
                              # CPU seconds of the process (both cores' threads), less sensitive to
                              # other jobs on a shared machine than wall time
                              "cpu_seconds_median_over_rounds": round(statistics.median(
                                  r["cpu_seconds"] for r in runs[name]), 4),
                              "seconds_per_round": [round(x, 4) for x in rounds],
                              # prefill and one decode step: medians over rounds; the step's profile
                              # from the first round
                              "prefill_seconds": round(statistics.median(r["prefill_seconds"] for r in runs[name]), 4),
                              "decode_step_ms": round(statistics.median(r["decode_step_ms"] for r in runs[name]), 3),
                              "decode_step_profile": runs[name][0]["decode_step_profile"]}
    cur = out["sides"]["current"]["seconds_median_over_rounds"]
    out["speedup_current_over"] = {name: round(out["sides"][name]["seconds_median_over_rounds"] / cur, 3)
                                   for name, _ in sides[:-1]}
    fastest, cpu = (out["sides"]["current"][k] for k in ("seconds_fastest_run", "cpu_seconds_median_over_rounds"))
    out["speedup_current_over_fastest_runs"] = {name: round(out["sides"][name]["seconds_fastest_run"] / fastest, 3)
                                                for name, _ in sides[:-1]}
    out["speedup_current_over_cpu_seconds"] = {
        name: round(out["sides"][name]["cpu_seconds_median_over_rounds"] / cpu, 3) for name, _ in sides[:-1]}
    out["greedy_tokens_equal_to_current"] = {name: bool(np.array_equal(greedy[name], greedy["current"]))
                                             for name, _ in sides[:-1]}
    return out


def _git_head(folder: str) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["33m", "tiny"], default="33m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_stock", action="store_true", help="do not time paddlenlp's generate")
    parser.add_argument("--compare", nargs="+", metavar="REF_CHECKOUT", default=None,
                        help="time these checkouts' inference models beside this one's (alternating processes)")
    parser.add_argument("--rounds", type=int, default=5, help="--compare: alternating rounds (default 5)")
    parser.add_argument("--note", default="", help="--compare: free text stored in the JSON")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--greedy_file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # the checkout to time is first on PYTHONPATH
        import ppo  # noqa: F401  (MKL environment before paddle)

        with open(args.result, "w") as f:
            json.dump(inference_worker(args), f)
        return
    if args.compare:
        report(compare_checkouts(args, argv), args.output)
        return

    sys.path.insert(0, ROOT)
    import ppo  # noqa: F401  (MKL environment before paddle)
    from ppo.stages.entry import quiet_libraries
    from ppo.rollout.inference import InferenceModel
    from ppo.rollout.collect import GenerationConfig, generate

    quiet_libraries()
    _matmul_path()
    model, dims, ids, mask = random_model(args)
    params = sum(p.size for p in model.parameters())
    # never stop early: our loop gets an EOS id outside the vocabulary; stock generate gets
    # min_new_tokens = max_new_tokens (its EOS must be a valid id)
    config = GenerationConfig(max_new_tokens=args.new, do_sample=True, temperature=1.0)
    eos = dims["vocab_size"] + 1

    inference = InferenceModel(model)
    inference_static = InferenceModel(model, static_decode=True)

    def run_inference():
        seqs, _ = generate(inference, ids, mask, config, eos_token_id=eos, pad_token_id=0)
        assert seqs.shape[1] == args.prompt + args.new

    def run_inference_static():
        seqs, _ = generate(inference_static, ids, mask, config, eos_token_id=eos, pad_token_id=0)
        assert seqs.shape[1] == args.prompt + args.new

    def run_forward_loop():
        seqs, _ = generate(model, ids, mask, config, eos_token_id=eos, pad_token_id=0)
        assert seqs.shape[1] == args.prompt + args.new

    def stock():
        out, _ = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                                min_new_tokens=args.new, decode_strategy="sampling", top_k=0, top_p=1.0,
                                eos_token_id=dims["vocab_size"] - 1, pad_token_id=0, use_cache=True)
        assert out.shape[1] == args.new

    gflops = matmul_gflops(repeats=5)
    tokens = args.batch * args.new
    floor_s = 2 * params * tokens / (gflops * 1e9)
    floor_all = 2 * params * args.batch * (args.prompt + args.new) / (gflops * 1e9)
    result = {"config": args.config, "mkl_num_threads": mkl_threads(), "params": int(params), "batch": args.batch,
              "prompt": args.prompt,
              "new_tokens": args.new, "matmul_gflops": round(gflops, 1),
              "floor_generated_seconds": round(floor_s, 4), "floor_all_seconds": round(floor_all, 4)}
    for name, fn in (("inference", run_inference), ("inference_static", run_inference_static),
                     ("forward_loop", run_forward_loop)) + \
            ((("stock", stock),) if not args.skip_stock else ()):
        seconds = statistics.median(timed(fn, args.repeats))
        result[f"{name}_seconds"] = round(seconds, 3)
        result[f"{name}_tokens_per_s"] = round(tokens / seconds, 1)
        result[f"{name}_fraction_of_floor_generated"] = round(floor_s / seconds, 3)
        result[f"{name}_fraction_of_floor_all"] = round(floor_all / seconds, 3)
    if not args.skip_stock:
        result["inference_speedup_vs_stock"] = round(result["stock_seconds"] / result["inference_seconds"], 2)
    report(result, args.output)


def report(result: dict, output: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
