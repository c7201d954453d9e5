"""Rollout throughput: the inference model vs paddlenlp's stock ``generate`` on the same weights.

Four paths are timed in one run: ``inference`` (``ppo.inference.InferenceModel``, the default
rollout path), ``inference_static`` (the same with its decode step compiled as a static graph,
``rollout_static_graph``), ``forward_loop`` (the same sampling loop over paddlenlp's forward and
cache) and ``stock`` (paddlenlp's ``generate``).

    python benchmarks/rollout_speed.py [--config 33m|tiny] [--batch 16] [--prompt 64] [--new 64] [--repeats 5]

Prints one JSON object: tokens/s of each path (median of the repeats), their ratio, and the
fraction of the compute floor at the fp32 matmul rate measured in this run, counted two ways:
``floor_generated`` = 2 x params x generated tokens (the decode steps only) and ``floor_all`` =
2 x params x (prompt + generated) tokens (the prompt's prefill is work every path must do too).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402,F401  (MKL environment before paddle)
from _common import matmul_gflops  # noqa: E402  (benchmarks/_common.py)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["33m", "tiny"], default="33m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_stock", action="store_true", help="do not time paddlenlp's generate")
    args = parser.parse_args(argv)

    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from ppo.inference import InferenceModel
    from ppo.rollout import GenerationConfig, generate
    from ppo.tiny.build import BENCH_33M, TINY
    from ppo.entry import quiet_libraries

    quiet_libraries()
    dims = dict(BENCH_33M) if args.config == "33m" else dict(TINY, vocab_size=320)
    paddle.seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dims, use_flash_attention=False, tie_word_embeddings=False))
    model.eval()
    params = sum(p.size for p in model.parameters())
    ids = paddle.randint(4, dims["vocab_size"], [args.batch, args.prompt])
    mask = paddle.ones_like(ids)
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

    def timed(fn):
        fn()  # warm-up
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        return statistics.median(runs)

    gflops = matmul_gflops(repeats=5)
    tokens = args.batch * args.new
    floor_s = 2 * params * tokens / (gflops * 1e9)
    floor_all = 2 * params * args.batch * (args.prompt + args.new) / (gflops * 1e9)
    result = {"config": args.config, "params": int(params), "batch": args.batch, "prompt": args.prompt,
              "new_tokens": args.new, "matmul_gflops": round(gflops, 1),
              "floor_generated_seconds": round(floor_s, 4), "floor_all_seconds": round(floor_all, 4)}
    for name, fn in (("inference", run_inference), ("inference_static", run_inference_static),
                     ("forward_loop", run_forward_loop)) + \
            ((("stock", stock),) if not args.skip_stock else ()):
        seconds = timed(fn)
        result[f"{name}_seconds"] = round(seconds, 3)
        result[f"{name}_tokens_per_s"] = round(tokens / seconds, 1)
        result[f"{name}_fraction_of_floor_generated"] = round(floor_s / seconds, 3)
        result[f"{name}_fraction_of_floor_all"] = round(floor_all / seconds, 3)
    if not args.skip_stock:
        result["inference_speedup_vs_stock"] = round(result["stock_seconds"] / result["inference_seconds"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
