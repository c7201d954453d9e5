"""Time and peak memory of a transformers folder in and out: conversion into the cache, loading,
and export of the converted folder back to a transformers folder.

    python benchmarks/hf_memory.py                       # a Qwen2-1.5B-shaped bf16 folder (3.1 GB)
    python benchmarks/hf_memory.py --shape small         # the same layout at 1/16 the width

The folder (random bf16 weights, sharded like a hub checkpoint with an index) is written first.
Each phase runs in its own process, which reports its peak resident memory (``VmHWM``) and its
resident memory after the imports; the target is that a phase's growth stays within the model's
in-memory size plus one shard (never a float32 copy of the bf16 model).  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (also when loaded by path, as a test does)
from _common import cpu_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # Qwen2-1.5B's config, and a narrow version of it
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=6, num_key_value_heads=2),
}


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak resident memory (``VmHWM``: counted from its exec, unlike ``ru_maxrss``,
    which starts from the parent's resident memory at the fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def write_folder(path: str, shape: dict, shard_size: str) -> int:
    """A transformers Qwen2 folder of random bf16 weights; its weights' bytes."""
    import paddle

    from ppo.storage.tensors import ShardWriter

    h, kv = shape["hidden_size"], shape["num_key_value_heads"] * shape["hidden_size"] // shape["num_attention_heads"]
    writer, total = ShardWriter(path, "model", shard_size, {"format": "pt"}), 0

    def add(name, *dims):
        nonlocal total
        t = (paddle.randn(list(dims)) * 0.02).astype("bfloat16")
        total += t.numel().item() * 2
        writer.add(name, t)

    add("model.embed_tokens.weight", shape["vocab_size"], h)
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        add(p + "self_attn.q_proj.weight", h, h), add(p + "self_attn.q_proj.bias", h)
        add(p + "self_attn.k_proj.weight", kv, h), add(p + "self_attn.k_proj.bias", kv)
        add(p + "self_attn.v_proj.weight", kv, h), add(p + "self_attn.v_proj.bias", kv)
        add(p + "self_attn.o_proj.weight", h, h)
        add(p + "mlp.gate_proj.weight", shape["intermediate_size"], h)
        add(p + "mlp.up_proj.weight", shape["intermediate_size"], h)
        add(p + "mlp.down_proj.weight", h, shape["intermediate_size"])
        add(p + "input_layernorm.weight", h), add(p + "post_attention_layernorm.weight", h)
    add("model.norm.weight", h)
    writer.close()
    config = dict(shape, model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True,
                  torch_dtype="bfloat16", rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
                  max_position_embeddings=32768, bos_token_id=0, eos_token_id=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return total


def phase(name: str, src: str, work: str, shard_size: str) -> None:
    """One phase in this process; prints {seconds, peak_rss, start_rss}."""
    import paddle  # noqa: F401  (imported before the baseline is taken)

    from ppo.models import hf, load_causal_lm
    from ppo.storage.tensors import set_max_shard_size

    set_max_shard_size(shard_size)
    start, t0 = rss_now(), time.perf_counter()
    if name == "convert":
        hf.resolve(src)
    elif name == "load":
        load_causal_lm(src)
    elif name == "export":
        hf.export_folder(hf.resolve(src), os.path.join(work, "exported"))
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss": peak, "start_rss": start}))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-1.5b")
    parser.add_argument("--shard_size", default="", help="default: 1/4 of the model")
    parser.add_argument("--work", default="", help="folder for the files (default: a temporary one)")
    parser.add_argument("--phase", default="", help=argparse.SUPPRESS)
    parser.add_argument("--src", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        phase(args.phase, args.src, args.work, args.shard_size)
        return {}
    work = args.work or tempfile.mkdtemp(prefix="hf-memory-")
    src = os.path.join(work, "hf")
    shape = SHAPES[args.shape]
    h = shape["hidden_size"]
    layer = 2 * h * h + 2 * h * h * shape["num_key_value_heads"] // shape["num_attention_heads"] \
        + 3 * h * shape["intermediate_size"]
    approx = 2 * (shape["vocab_size"] * h + shape["num_hidden_layers"] * layer)
    shard_size = args.shard_size or str(approx // 4)
    sys.path.insert(0, ROOT)
    model_bytes = write_folder(src, shape, shard_size)
    env = dict(os.environ, PPO_CACHE=os.path.join(work, "cache"), PYTHONPATH=ROOT)
    result = {"shape": args.shape, "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "model_bytes": model_bytes, "shard_bytes": int(shard_size),
              "input_shards": len([n for n in os.listdir(src) if n.endswith(".safetensors")]), "phases": {}}
    for name in ("convert", "load", "export"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--phase", name, "--src", src,
                               "--work", work, "--shard_size", shard_size], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        measured["growth"] = measured["peak_rss"] - measured["start_rss"]
        measured["growth_over_model"] = round(measured["growth"] / model_bytes, 3)
        result["phases"][name] = measured
    bound = model_bytes + int(shard_size)
    result["bound"] = bound
    result["within_bound"] = {n: p["growth"] <= bound for n, p in result["phases"].items() if n != "load"}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
