"""What the checkpoint checksums cost: a resumable checkpoint of the 33.5M model (``BENCH_33M``:
weights, AdamW moments after one step, random states) is written with ``ppo.storage.checkpoint`` and its
files are hashed by CRC-32C (what the manifest records), zlib's CRC-32 and BLAKE2b, each streaming
8 MiB pieces, against the time the save took.

    python benchmarks/checksum_cost.py [--repeats 3]

Prints one JSON object: checkpoint bytes, save seconds, and per hash the seconds (median; the
files are in the page cache, as right after a save) and GB/s.
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402,F401  (MKL environment before paddle)


def stream(path, update, value):
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            value = update(chunk, value)
    return value


def blake2b_update(chunk, h):
    h.update(chunk)
    return h


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import crc32c
    import paddle

    from ppo.distributed import parallel

    from ppo.storage import checkpoint
    from ppo.models import load_causal_lm
    from ppo.stages.optim import build_optimizer
    from ppo.tiny.build import BENCH_33M, build_llama, build_tokenizer

    root = tempfile.mkdtemp(prefix="checksum-cost-")
    tokenizer = build_tokenizer(os.path.join(root, "tok"))
    build_llama(os.path.join(root, "model"), tokenizer, **BENCH_33M)
    model = load_causal_lm(os.path.join(root, "model"))
    optimizer, _ = build_optimizer(model, 1e-4, 0.0, 10)
    ids = paddle.randint(0, BENCH_33M["vocab_size"], [2, 32])
    model(input_ids=ids, labels=ids)[0].backward()
    optimizer.step()
    ctx = parallel.context()
    target = os.path.join(root, "checkpoint-1")
    start = time.perf_counter()
    checkpoint.save_checkpoint(target, ctx, {"": model}, tokenizer, {"": optimizer}, {"global_step": 1})
    save_s = time.perf_counter() - start
    files = [os.path.join(d, n) for d, _, names in os.walk(target) for n in names]
    total = sum(os.path.getsize(f) for f in files)

    hashes = {
        "crc32c": lambda p: stream(p, crc32c.crc32c, 0),
        "zlib_crc32": lambda p: stream(p, zlib.crc32, 0),
        "blake2b": lambda p: stream(p, blake2b_update, hashlib.blake2b()),
        "read_only": lambda p: stream(p, lambda c, v: v, 0),
    }
    out = {"checkpoint_bytes": total, "save_seconds_with_crc32c": round(save_s, 3), "hashes": {}}
    for name, fn in hashes.items():
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for f in files:
                fn(f)
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        out["hashes"][name] = {"seconds": round(s, 4), "GB_per_s": round(total / s / 1e9, 2)}
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
