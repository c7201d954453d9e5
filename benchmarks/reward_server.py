"""Throughput of the reward server (``rm/serve_reward.py``'s service) against clients on 127.0.0.1.

    python benchmarks/reward_server.py [--config tiny|33m] [--clients 1,4,8] [--rows 8] [--rounds 5]

A reward model of the chosen size (random weights, the arithmetic task's tokenizer) is served with
batching (``max_batch_size`` 32, ``max_wait_ms`` 5) and without (``max_batch_size`` 1), side by side
in one process.  For each client count, every client posts ``--requests`` requests of ``--rows``
rows (a PPO rollout's scoring batch per request) at once; a round's rows per second is the total
rows over the wall time of the round.  Reports the median over ``--rounds`` rounds, the mean batch
size reached (rows / forwards), and the in-process forward of the same rows as the floor.  Prints
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ppo  # noqa: E402,F401
from _common import cpu_name, mkl_threads  # noqa: E402


def build(folder: str, config: str) -> str:
    from ppo.models import load_score_model
    from ppo.tiny.arithmetic import corpus
    from ppo.tiny.build import BENCH_33M, TINY, build_llama, build_tokenizer

    tok = build_tokenizer(os.path.join(folder, "tokenizer"), texts=list(corpus()))
    sizes = dict(BENCH_33M if config == "33m" else TINY)
    sizes.pop("vocab_size", None)
    build_llama(os.path.join(folder, "base"), tok, seed=0, **sizes)
    model = load_score_model(os.path.join(folder, "base"))
    model.save_pretrained(os.path.join(folder, "rm"))
    tok.save_pretrained(os.path.join(folder, "rm"))
    return os.path.join(folder, "rm")


def rows_of(i: int, n: int) -> tuple[list[str], list[str]]:
    prompts = [f"BEGINNING OF CONVERSATION: USER: What is {(i + j) % 10} + {(i * j) % 10}? ASSISTANT:"
               for j in range(n)]
    responses = [str((i + 2 * j) % 19) for j in range(n)]
    return prompts, responses


def measure(url: str, service, clients: int, requests: int, rows: int) -> dict:
    from ppo.rewards.remote import post_batch

    before = service.health()
    errors = []

    def client(c):
        try:
            for r in range(requests):
                prompts, responses = rows_of(c * requests + r, rows)
                post_batch(url, prompts, responses, [None] * rows, ended=[True] * rows, retries=0)
        except Exception as e:  # reported, not hidden
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = service.health()
    if errors:
        raise SystemExit(f"client failed: {errors[0]}")
    total = after["rows"] - before["rows"]
    return {"rows_per_s": total / wall, "mean_batch": total / max(after["forwards"] - before["forwards"], 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "33m"], default="tiny")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args(argv)

    import paddle

    from ppo.args import ServeRewardArgs
    from rm.server import RewardService, make_server

    with tempfile.TemporaryDirectory() as folder:
        rm = build(folder, opts.config)
        servers = {}
        for name, size in (("batched", 32), ("unbatched", 1)):
            args = ServeRewardArgs(model_name_or_path=rm, port=0, max_length=64, max_batch_size=size, max_wait_ms=5.0)
            args.validate()
            service = RewardService(args)
            httpd = make_server(service, "127.0.0.1", 0, args.max_request_bytes)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            servers[name] = (service, httpd, f"http://127.0.0.1:{httpd.server_address[1]}/score")
        # the floor: the same rows through the model in process, one forward per request
        service = servers["batched"][0]
        floor = []
        for _ in range(opts.rounds):
            start = time.perf_counter()
            for r in range(opts.requests):
                prompts, responses = rows_of(r, opts.rows)
                service.forward([service.encode(p, x, True) for p, x in zip(prompts, responses)])
            floor.append(opts.requests * opts.rows / (time.perf_counter() - start))
        results = {}
        for clients in [int(c) for c in opts.clients.split(",")]:
            for name, (service, _, url) in servers.items():
                rounds = [measure(url, service, clients, opts.requests, opts.rows) for _ in range(opts.rounds)]
                results[f"{name}_clients{clients}"] = {
                    "rows_per_s_median": round(statistics.median(r["rows_per_s"] for r in rounds), 1),
                    "rows_per_s_rounds": [round(r["rows_per_s"], 1) for r in rounds],
                    "mean_batch_rows": round(statistics.median(r["mean_batch"] for r in rounds), 2)}
        for service, httpd, _ in servers.values():
            httpd.shutdown()
            httpd.server_close()
            service.close()
    print(json.dumps({"benchmark": "reward_server", "config": opts.config, "rows_per_request": opts.rows,
                      "requests_per_client": opts.requests, "rounds": opts.rounds, "cpu": cpu_name(),
                      "cores": os.cpu_count(), "load_average": os.getloadavg(), "mkl_threads": mkl_threads(),
                      "paddle": paddle.__version__,
                      "in_process_rows_per_s_median": round(statistics.median(floor), 1),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
