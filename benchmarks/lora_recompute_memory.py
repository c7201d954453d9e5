"""Memory and time of LoRA vs full fine-tuning (one PPO iteration) and of recompute vs not (the
actor's update step at a long sequence), on the 33.5M config (``ppo.tiny.build.BENCH_33M``).

Every measurement runs in a fresh worker process of this script (peak RSS is per process):

* ``ppo_full`` / ``ppo_lora``: a ``PPOTrainer`` (gae, with critic; ``lora`` + ``critic_lora``
  for the second) over random models, one warm-up iteration and one timed iteration through the
  trainer's own phases (``experience`` -> ``advantages`` -> ``update_kl_controller`` ->
  ``update``), 16 prompts x 64 tokens, 64 new tokens.  Reported: the process peak (model
  loading included: where the reference copy shows), the timed iteration's peak and seconds, the
  parameters the run holds, the trainable ones and the optimizer-state elements.
* ``update_plain`` / ``update_recompute``: the actor alone, one warm-up and one timed training
  step (forward, next-token loss, backward, AdamW step) on ``--batch`` x ``--seq`` tokens; the
  peak of the timed step (``VmHWM`` reset before it) and its seconds.

    python benchmarks/lora_recompute_memory.py [--seq 1024] [--batch 2]

Prints one JSON object on stdout (progress on stderr).  The machine is shared: times carry the
other jobs' contention (the load average is recorded).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from ppo_iteration import PeakMeter, build_models, rss_mb  # noqa: E402  (benchmarks/ppo_iteration.py)


def _optimizer_elements(optimizer) -> int:
    inner = getattr(optimizer, "_inner_opt", optimizer)
    total = 0
    for per_param in getattr(inner, "_accumulators", {}).values():
        total += sum(int(t.size) for t in per_param.values())
    return total


def ppo_worker(opts) -> dict:
    import ppo  # noqa: F401  (MKL environment before paddle)
    import numpy as np
    import paddle

    from ppo.args import PPOArgs, validate
    from ppo.stages.entry import quiet_libraries
    from ppo.stages.ppo.trainer import PPOTrainer

    quiet_libraries()
    meter = PeakMeter()
    args = PPOArgs(actor_model_name_or_path=opts.actor, reward_model_name_or_path=opts.rm,
                   train_datasets="tiny-prompts/train", output_dir=os.path.join(opts.workdir, "out"),
                   max_length=128, max_new_tokens=64, per_device_prompt_batch_size=16,
                   per_device_train_batch_size=8, max_steps=2, disable_tqdm=True, seed=1,
                   lora=opts.lora, critic_lora=opts.lora)
    validate(args)
    trainer = PPOTrainer(args)
    rss_built = rss_mb()
    rng = np.random.default_rng(0)
    vocab = int(trainer.actor.config.vocab_size)

    def iteration(step):
        ids = paddle.to_tensor(rng.integers(4, vocab, size=(16, 64)), dtype="int64")
        t = time.perf_counter()
        exp = trainer.experience(ids, paddle.ones_like(ids))
        exp = trainer.advantages(exp)
        trainer.update_kl_controller(exp)
        trainer.update(exp, step)
        return time.perf_counter() - t

    iteration(1)
    meter.open("iteration")
    seconds = iteration(2)
    peak = meter.close("iteration")
    held = {id(p): int(p.size) for m in (trainer.actor, trainer.critic, trainer.models.reference,
                                         trainer.models.reward) for p in m.parameters()}
    trainable = sum(int(p.size) for m in (trainer.actor, trainer.critic) for p in m.parameters()
                    if not p.stop_gradient)
    return {"lora": opts.lora, "iteration_seconds": round(seconds, 2), "iteration_peak_rss_mb": round(peak, 1),
            "process_peak_rss_mb": round(meter.lifetime, 1), "rss_after_build_mb": round(rss_built, 1),
            "parameters_held": sum(held.values()), "reference_parameters": sum(
                int(p.size) for p in trainer.models.reference.parameters()),
            "trainable_parameters": trainable,
            "optimizer_state_elements": _optimizer_elements(trainer.actor_opt) + _optimizer_elements(trainer.critic_opt)}


def update_worker(opts) -> dict:
    import ppo  # noqa: F401
    import numpy as np
    import paddle

    from ppo.stages.entry import quiet_libraries
    from ppo.models import load_causal_lm
    from ppo.models.recompute import enable_recompute
    from ppo.stages.optim import build_optimizer

    quiet_libraries()
    paddle.seed(0)
    model = load_causal_lm(opts.actor, max_position_embeddings=max(opts.seq, 2048))
    if opts.recompute:
        enable_recompute(model, "full")
    model.train()
    optimizer, _ = build_optimizer(model, 1e-5, 0.0, 10)
    rng = np.random.default_rng(0)
    ids = paddle.to_tensor(rng.integers(4, int(model.config.vocab_size), size=(opts.batch, opts.seq)), dtype="int64")

    def step():
        t = time.perf_counter()
        logits = model(input_ids=ids, return_dict=True).logits
        loss = paddle.nn.functional.cross_entropy(logits[:, :-1], ids[:, 1:].unsqueeze(-1)).mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)
        return time.perf_counter() - t

    step()
    meter = PeakMeter()
    meter.open("step")
    seconds = step()
    return {"recompute": opts.recompute, "tokens": opts.batch * opts.seq, "step_seconds": round(seconds, 2),
            "step_peak_rss_mb": round(meter.close("step"), 1), "process_peak_rss_mb": round(meter.lifetime, 1)}


def spawn(name, extra, models, workdir, opts) -> dict:
    result = os.path.join(workdir, name + ".json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--actor", models["actor"], "--rm",
           models["rm"], "--workdir", os.path.join(workdir, name), "--result", result,
           "--seq", str(opts.seq), "--batch", str(opts.batch), *extra]
    env = {**os.environ, "PYTHONPATH": ROOT, "MKL_DEBUG_CPU_TYPE": "5"}
    load = round(os.getloadavg()[0], 2)
    print(f"[{time.strftime('%H:%M:%S')}] {name} (load average {load})", file=sys.stderr)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=sys.stderr, stderr=sys.stderr)
    with open(result) as f:
        return {**json.load(f), "load_average_1min_at_start": load,
                "load_average_1min_at_end": round(os.getloadavg()[0], 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence of the update-step runs")
    parser.add_argument("--batch", type=int, default=2, help="sequences of the update-step runs")
    parser.add_argument("--config", choices=["33m", "tiny"], default="33m", help="tiny: a quick check of the script")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recompute", action="store_true", help=argparse.SUPPRESS)
    for key in ("actor", "rm", "workdir", "result"):
        parser.add_argument("--" + key, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        os.makedirs(opts.workdir, exist_ok=True)
        out = ppo_worker(opts) if opts.worker.startswith("ppo") else update_worker(opts)
        with open(opts.result, "w") as f:
            json.dump(out, f)
        return
    with tempfile.TemporaryDirectory() as workdir:
        models = build_models(opts.config, workdir)
        runs = {"ppo_full": spawn("ppo_full", [], models, workdir, opts),
                "ppo_lora": spawn("ppo_lora", ["--lora"], models, workdir, opts),
                "update_plain": spawn("update_plain", [], models, workdir, opts),
                "update_recompute": spawn("update_recompute", ["--recompute"], models, workdir, opts)}
    import paddle

    print(json.dumps({
        "benchmark": "lora_recompute_memory", "command": " ".join(["python", "benchmarks/lora_recompute_memory.py",
                                                                    *(argv or sys.argv[1:])]),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "paddle": paddle.__version__,
                    "note": "shared machine: other jobs ran at the same time (load averages per run)"},
        "settings": {"config": opts.config, "ppo": "16 prompts x 64 tokens, 64 new tokens, "
                     "gae with critic, train micro-batch 8, lora_rank 8, lora_alpha 16, default targets",
                     "update": f"{opts.batch} x {opts.seq} tokens, forward + backward + AdamW step, recompute 'full'"},
        "results": runs}, indent=1))


if __name__ == "__main__":
    main()
