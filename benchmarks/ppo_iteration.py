"""One PPO iteration end to end: time per phase, peak memory, compute floor and start-up cost.

For each model size (``tiny``: ``ppo.tiny.build.TINY``; ``33m``: ``ppo.tiny.build.BENCH_33M``,
33.5M parameters) and each offload setting (off, and ``offload_level "freeze_model optimizer
train_model"``) a fresh worker process of this script builds a ``PPOTrainer`` over random models
written to a temporary folder, runs one warm-up iteration and ``--iterations`` timed ones on
random prompts, and reports medians:

* seconds per phase: ``generation`` (the rollout decode, prefill included), ``scoring`` (actor
  old log-probs, reference log-probs, reward score, critic values; also split per model),
  ``actor_update``, ``critic_update``, and the smaller parts (offload transfers, advantages,
  other) so the phases add up to the iteration;
* tokens/s: response tokens per second of the whole iteration, and of generation alone;
* memory: ``ru_maxrss`` of the worker (a high-water mark over its whole life, model loading
  included; one process per configuration for that reason) and the peak of the timed
  iterations and of each phase (``VmHWM``, reset through ``/proc/self/clear_refs`` at each phase
  boundary), with the offload on / off ratio;
* the compute floor of each phase at the fp32 matmul rate measured in the same worker (median of
  several 2048 x 2048 ``paddle.matmul``): 2 x params x tokens for every forward-only pass,
  6 x params x tokens for the two update phases, and time / floor per phase and for the
  iteration.  "params" here are the parameters used in matmuls: all of a model's parameters but
  its input embedding table, which is a lookup.  The generation floor counts the prompt tokens of
  the prefill and the generated tokens of the decode; every scoring and update pass counts the
  real tokens of the full sequences;
* start-up: from the parent launching the worker (interpreter start included) to the first
  rollout, split into interpreter start, imports, trainer construction (model loading) and
  prompt preparation.

The phases are driven through the trainer itself
(``trainer.experience`` -> ``trainer.advantages`` -> ``trainer.update_kl_controller`` ->
``trainer.update``: the same methods ``PPOTrainer.train`` calls), with random prompt ids instead
of the dataset.

Workloads (``--workload``): ``fixed``, every prompt ``--prompt_length`` random tokens and every
response ``max_new_tokens`` long (no padding anywhere); ``realistic``, prompt lengths from
``--min_prompt`` to ``--max_prompt`` skewed short (left padded) and an actor made to end sampled
responses at EOS (``bias_eos``: EOS follows a seeded set of marked tokens, so a response's length
is 1 + geometric with mean about ``--eos_mean_length``, truncated at the new-token limit): seeded,
so the same lengths every run.  Each phase reports the share of the tokens it computed that were
padding, and real tokens per second; the result reports the response lengths (mean, quantiles,
share ended by EOS) and the load average around each worker.

``--compare REF_CHECKOUT`` (e.g. ``git worktree add /tmp/ref 5a67775``) runs the reference
checkout's trainer under this same driver, models and prompts (its ``ppo`` on the worker's path;
a trainer from before the phase methods is driven through its ``collect`` / ``compute_advantages``
/ ``update``), alternating reference and current workers for ``--rounds`` rounds, and reports
per-phase medians and reference / current speed-ups.

    python benchmarks/ppo_iteration.py [--config tiny|33m|both] [--iterations 2] [--quick]
    python benchmarks/ppo_iteration.py --config 33m --workload both --compare /tmp/ref

Prints one JSON object on stdout (progress goes to stderr).
"""

import time

_PROCESS_T0 = time.time()  # first thing a worker does: before any heavy import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _common import (  # noqa: E402  (benchmarks/_common.py)
    matmul_gflops, mkl_threads, status_kb as _status_kb, worker_env)

OFFLOAD_ON = "freeze_model optimizer train_model"
CONFIGS = ("tiny", "33m")


# ---------------------------------------------------------------------------------------------
# Memory of this process (Linux)


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def hwm_mb() -> float:
    """The resident-set high-water mark since the process started or since the last reset."""
    return _status_kb("VmHWM") / 1024


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class PeakMeter:
    """Peak RSS of named, possibly nested windows of time, from the kernel's high-water mark.

    Every ``open``/``close`` folds the current ``VmHWM`` into all open windows and then resets it
    (``/proc/self/clear_refs``), so each window sees the peak of its own span.  Resetting also
    lowers what ``ru_maxrss`` reports while no thread exits, so the process-lifetime peak is kept
    here: the largest value seen before the first reset and at every fold since.
    """

    def __init__(self):
        self.windows: dict[str, float] = {}
        self.lifetime = max(maxrss_mb(), hwm_mb())
        self.can_reset = True

    def _fold(self) -> None:
        peak = hwm_mb() if self.can_reset else maxrss_mb()
        self.lifetime = max(self.lifetime, peak, maxrss_mb())
        for name in self.windows:
            self.windows[name] = max(self.windows[name], peak)
        if self.can_reset:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:  # no reset: every window reports the process peak so far
                self.can_reset = False

    def open(self, name: str) -> None:
        self._fold()
        self.windows[name] = 0.0

    def close(self, name: str) -> float:
        self._fold()
        return self.windows.pop(name)


# ---------------------------------------------------------------------------------------------
# Models on disk (parent)


def bias_eos(actor_dir: str, eos: int, mean_length: float, seed: int = 0, strength: float = 2.0) -> dict:
    """Make the saved actor end sampled responses at EOS after about ``mean_length`` tokens, with a
    controlled, reproducible length distribution.

    A random model samples almost uniformly (the log-sum-exp of its logits varies by ~0.005 from
    token to token), so the EOS logit cannot be a linear function of the hidden state that is
    constant; instead it is made to fire after a marked token: a seeded set S of V / (mean_length
    - 1) ordinary tokens gets ``strength`` times a seeded unit direction d added to its embeddings,
    and the LM head's EOS column becomes gamma * d, gamma placing the EOS logit's threshold (the
    other logits' log-sum-exp) midway between the hidden states h . d after tokens of S and after
    other tokens (measured on random sequences).  So the step after the model samples a token of S
    it samples EOS (p about 1), and otherwise almost never: a response's length is 1 + a geometric
    number of steps with success probability |S| / V, mean about ``mean_length``, truncated at
    ``max_new_tokens``.  Returns the calibration (set size, gamma, EOS probabilities after S and
    otherwise)."""
    import numpy as np
    import paddle

    from ppo.rollout.inference import InferenceModel
    from ppo.models import load_causal_lm

    model = load_causal_lm(actor_dir)
    model.eval()
    V = int(model.config.vocab_size)
    rng = np.random.default_rng(seed)
    ordinary = np.arange(4, V)  # ids 0-3: <unk>, <s>, </s>, <pad>
    marked = rng.choice(ordinary, size=max(1, round(len(ordinary) / max(mean_length - 1.0, 1.0))), replace=False)
    embed = model.get_input_embeddings().weight
    direction = rng.normal(size=embed.shape[1])
    direction /= np.linalg.norm(direction)
    table = embed.numpy()
    table[marked] += (strength * direction).astype(table.dtype)
    embed.set_value(table)
    # where h . d falls after marked and after other tokens: final hidden states of random sequences
    ids = paddle.to_tensor(rng.integers(4, V, size=(8, 128)), dtype="int64")
    hidden = InferenceModel(model).final_hidden(ids, paddle.ones_like(ids)).numpy().reshape(-1, embed.shape[1])
    z = hidden.astype(np.float64) @ direction
    after_marked = np.isin(ids.numpy().reshape(-1), marked)
    head = model.lm_head.weight  # [hidden, V]
    logits = hidden.astype(np.float64) @ head.numpy().astype(np.float64)
    others = np.delete(logits, eos, axis=1)
    top = others.max(1)
    lse = np.log(np.exp(others - top[:, None]).sum(1)) + top
    low, high = np.quantile(z[after_marked], 0.01), np.quantile(z[~after_marked], 0.999)
    gamma = float(np.median(lse) / ((low + high) / 2))
    w = head.numpy()
    w[:, eos] = (gamma * direction).astype(w.dtype)
    head.set_value(w)
    model.save_pretrained(actor_dir)
    p_eos = 1 / (1 + np.exp(lse - gamma * z))
    return {"marked_tokens": int(len(marked)), "vocab_size": V, "embedding_shift": strength, "gamma": round(gamma, 4),
            "p_eos_after_marked_token_min": round(float(p_eos[after_marked].min()), 4),
            "p_eos_after_other_tokens_mean": round(float(p_eos[~after_marked].mean()), 6),
            "expected_mean_length_untruncated": round(1 + len(ordinary) / len(marked), 2)}


def build_models(config: str, folder: str, eos_mean_length: float = 0.0) -> dict:
    """Random actor (causal LM) and reward model (score model started from it) saved in ``folder``;
    with ``eos_mean_length`` the actor's EOS logit is biased (``bias_eos``)."""
    import ppo  # noqa: F401  (MKL environment before paddle)
    from ppo.models import load_score_model
    from ppo.tiny.build import BENCH_33M, TINY, build_llama, build_tokenizer
    from ppo.stages.entry import quiet_libraries

    quiet_libraries()
    tokenizer = build_tokenizer(os.path.join(folder, "tokenizer"))
    actor_dir, rm_dir = os.path.join(folder, "actor"), os.path.join(folder, "rm")
    # 33m: the model's vocabulary (8000) is larger than the tokenizer's; prompts are random ids
    # below the model's vocabulary size and nothing is decoded to text
    sizes = dict(BENCH_33M) if config == "33m" else dict(TINY)
    model = build_llama(actor_dir, tokenizer, seed=0, **sizes)
    del model
    calibration = bias_eos(actor_dir, tokenizer.eos_token_id, eos_mean_length) if eos_mean_length else None
    reward = load_score_model(actor_dir)
    reward.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    del reward
    return {"actor": actor_dir, "rm": rm_dir, "eos_calibration": calibration}


# ---------------------------------------------------------------------------------------------
# Worker: one configuration in a fresh process


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: everything but the input embedding table."""
    return int(sum(p.size for name, p in model.named_parameters() if "embed_tokens" not in name))


def realistic_prompt_lengths(rng, batch: int, shortest: int, longest: int):
    """Prompt lengths skewed short over [shortest, longest] (a Beta(1.3, 4) share of the range: median
    about a quarter of it, as in PKU-SafeRLHF's prompts)."""
    import numpy as np

    return (shortest + np.floor(rng.beta(1.3, 4.0, size=batch) * (longest - shortest + 1))).astype(int)


def run_worker(opts) -> dict:
    import ppo  # noqa: F401  (MKL environment before paddle)
    import numpy as np
    import paddle

    from ppo.args import PPOArgs, validate
    from ppo.rollout.inference import InferenceModel
    from ppo.stages.ppo.trainer import PPOTrainer
    try:
        from ppo.stages.entry import quiet_libraries
    except ImportError:  # a reference checkout from before the layering
        from ppo.training import quiet_libraries

    quiet_libraries()
    t_imported = time.time()

    train_batch = min(opts.train_batch, opts.batch)
    realistic = opts.workload == "realistic"
    longest_prompt = opts.max_prompt if realistic else opts.prompt_length
    args = PPOArgs(
        actor_model_name_or_path=opts.actor, reward_model_name_or_path=opts.rm,
        train_datasets="tiny-prompts/train", output_dir=os.path.join(opts.workdir, "output"),
        max_length=longest_prompt + opts.new_tokens, max_new_tokens=opts.new_tokens,
        per_device_prompt_batch_size=opts.batch, per_device_train_batch_size=train_batch,
        gradient_accumulation_steps=opts.accumulation,
        max_steps=1 + opts.iterations, offload_level=opts.offload_level, offload_dir=opts.workdir,
        disable_tqdm=True, seed=1, **json.loads(opts.trainer_args or "{}"))
    validate(args)
    trainer = PPOTrainer(args)
    t_trainer = time.time()

    models = trainer.models
    vocab = int(trainer.actor.config.vocab_size)
    rng = np.random.default_rng(0)

    def prompts():
        # ids 0-3 are <unk>, <s>, </s>, <pad>
        if not realistic:  # no padding: every prompt has prompt_length tokens
            ids = paddle.to_tensor(rng.integers(4, vocab, size=(opts.batch, opts.prompt_length)), dtype="int64")
            return ids, paddle.ones_like(ids)
        lengths = realistic_prompt_lengths(rng, opts.batch, opts.min_prompt, opts.max_prompt)
        width = int(lengths.max())
        ids = np.full((opts.batch, width), trainer.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((opts.batch, width), dtype=np.int64)
        for b, n in enumerate(lengths):  # left padded, as the prompt collator makes them
            ids[b, width - n:] = rng.integers(4, vocab, size=n)
            mask[b, width - n:] = 1
        return paddle.to_tensor(ids), paddle.to_tensor(mask)

    first_prompts = prompts()
    t_prepared = time.time()

    meter = PeakMeter()
    rss_before_first_rollout = rss_mb()

    # -- timing hooks -------------------------------------------------------------------------
    clock = time.perf_counter
    acc: dict[str, float] = {}
    peaks: dict[str, float] = {}

    def add(key, seconds):
        acc[key] = acc.get(key, 0.0) + seconds

    def count(phase, ids, mask):
        """Tokens computed (rows x columns of a forward's batch) and real ones (the mask's)."""
        add("computed_" + phase, float(ids.shape[0] * ids.shape[1]))
        add("real_" + phase, float(mask.astype("int64").sum()))

    def timed_method(obj, name, key, peak_key=None, counted=None):
        original = getattr(obj, name)

        def wrapper(*a, **kw):
            if counted:
                counted(*a)
            if peak_key:
                meter.open(peak_key)
            t = clock()
            try:
                return original(*a, **kw)
            finally:
                add(key, clock() - t)
                if peak_key:
                    peaks[peak_key] = max(peaks.get(peak_key, 0.0), meter.close(peak_key))

        setattr(obj, name, wrapper)

    # update phases (PPOTrainer.update calls these through self, so instance attributes win)
    def micro_batches(phase):
        def counted(micro, *rest):
            for m in micro:
                count(phase, m.sequences, m.attention_mask)
        return counted

    timed_method(trainer, "actor_step", "actor_update", "actor_update", counted=micro_batches("actor_update"))
    timed_method(trainer, "critic_step", "critic_update", "critic_update", counted=micro_batches("critic_update"))

    # per-model split of scoring: collect scores every model on its inference view (the worker
    # runs one process with the default use_inference_model), called during scoring only
    scored = {"actor_old_log_probs": models.actor, "reference_log_probs": models.reference,
              "reward_score": models.reward, "critic_values": models.critic}
    # the views are hooked when collect first makes them: an offloaded model has no weights to
    # build its view from before the offload brings it back
    keys = {id(model): key for key, model in scored.items() if model is not None}
    make_view = InferenceModel.of.__func__

    def hooked_view(cls, model):
        view = make_view(cls, model)
        if id(model) in keys and not getattr(view, "_benchmark_hooked", False):
            for method in ("log_probs", "scores"):
                timed_method(view, method, "scoring_forward_" + keys[id(model)],
                             counted=lambda ids, mask, *rest: count("scoring", ids, mask))
            view._benchmark_hooked = True
        return view

    InferenceModel.of = classmethod(hooked_view)

    # offload transfers, timed where the trainer's phases call them; the generation and scoring
    # peaks exclude them (generation's meter opens after the offload before it)
    offload = trainer.offload

    def around(name, before=None, after=None):
        original = getattr(offload, name)

        def wrapper(*a, **kw):
            if before:
                before()
            t = clock()
            try:
                return original(*a, **kw)
            finally:
                add("offload_transfers", clock() - t)
                add("offload_" + name, clock() - t)
                if after:
                    after()

        setattr(offload, name, wrapper)

    marks: dict[str, float] = {}
    rss: dict[str, float] = {}

    def generation_starts():
        marks["generation_start"] = clock()
        meter.open("generation")

    def generation_ends():
        marks["generation_end"] = clock()
        peaks["generation"] = meter.close("generation")
        rss["after_generation"] = rss_mb()
        meter.open("scoring")

    around("before_generation", after=generation_starts)
    around("before_scoring", before=generation_ends)
    around("after_scoring")
    around("before_update")

    if hasattr(trainer, "experience"):
        experience = trainer.experience

        def advantages(exp):
            exp = trainer.advantages(exp)
            trainer.update_kl_controller(exp)
            return exp
    else:  # a reference checkout from before the trainer phases: the same steps its rollout takes
        from ppo.rollout.collect import collect

        def experience(ids, mask, before_scoring):
            trainer.export_rollout_weights()
            trainer.offload.before_generation()
            exp = collect(models, ids, mask, trainer.gen, args.max_length, args.normalize_reward,
                          before_scoring=lambda: (trainer.offload.before_scoring(), before_scoring()))
            trainer.offload.after_scoring()
            return exp

        def advantages(exp):
            trainer.compute_advantages(exp)
            return exp

    def iteration(step: int, ids, mask) -> dict:
        """One iteration through the trainer's own phases: experience (generation + scoring),
        advantages, the KL controller, update."""
        acc.clear()
        peaks.clear()
        marks.clear()
        rss.clear()
        rss["iteration_start"] = rss_mb()
        meter.open("iteration")
        paddle.seed(1000 + step)  # the same draws whatever the checkout did to the random state before
        t0 = clock()
        exp = experience(ids, mask, before_scoring=lambda: marks.update(scoring_start=clock()))
        t3 = clock()
        peaks["scoring"] = meter.close("scoring")
        rss["after_scoring"] = rss_mb()
        meter.open("update")
        t4 = clock()
        exp = advantages(exp)
        t5 = clock()
        trainer.update(exp, step)
        t6 = clock()
        peaks["update"] = meter.close("update")
        peaks["iteration"] = meter.close("iteration")
        rss["after_update"] = rss_mb()

        P = exp.prompt_length
        attention = exp.attention_mask.astype("int64")
        B, L = exp.sequences.shape
        # generation computes the padded prompt batch once (prefill) and every row at every step
        add("computed_generation", float(B * L))
        add("real_generation", float(attention.sum()))
        tokens = {
            "prompt": int(attention[:, :P].sum()),
            "response": int(attention[:, P:].sum()),
            "sequence": int(attention.sum()),
            "decode_steps": int(exp.sequences.shape[1] - P),
            "decode_rows_x_steps": int(exp.sequences.shape[0] * (exp.sequences.shape[1] - P)),
            "responses_ended_by_eos": int(exp.ended_with_eos.astype("int64").sum()),
        }
        seconds = {
            "generation": marks["generation_end"] - marks["generation_start"],
            "scoring": t3 - marks["scoring_start"] - acc.get("offload_after_scoring", 0.0),
            "actor_update": acc.get("actor_update", 0.0),
            "critic_update": acc.get("critic_update", 0.0),
            "advantages": t5 - t4,
            "offload_transfers": acc.get("offload_transfers", 0.0),
            "iteration": t6 - t0,
        }
        for key in scored:
            if "scoring_forward_" + key in acc:
                seconds["scoring_forward_" + key] = acc["scoring_forward_" + key]
        seconds["scoring_rest"] = seconds["scoring"] - sum(
            v for k, v in seconds.items() if k.startswith("scoring_forward_"))
        main = ("generation", "scoring", "actor_update", "critic_update", "advantages", "offload_transfers")
        seconds["other"] = seconds["iteration"] - sum(seconds[k] for k in main)
        computed = {k[len("computed_"):]: v for k, v in acc.items() if k.startswith("computed_")}
        padding = {k: round(1 - acc["real_" + k] / v, 4) if v else 0.0 for k, v in computed.items()}
        real = {k: acc["real_" + k] for k in computed}
        return {"seconds": seconds, "tokens": tokens, "peak_rss_mb": dict(peaks), "rss_mb": rss,
                "padding_share": padding, "real_tokens": real,
                "response_lengths": attention[:, P:].sum(axis=1).numpy().tolist(),
                "ended_with_eos": exp.ended_with_eos.numpy().tolist()}

    # -- run -----------------------------------------------------------------------------------
    t_first_rollout = time.time()
    warmup = iteration(1, *first_prompts)
    timed = [iteration(2 + i, *prompts()) for i in range(opts.iterations)]
    trainer.offload.close()
    gflops = matmul_gflops()

    def median_of(part):
        keys = timed[0][part].keys()
        return {k: statistics.median(r[part][k] for r in timed) for k in keys}

    seconds, tokens = median_of("seconds"), median_of("tokens")
    padding, real_tokens = median_of("padding_share"), median_of("real_tokens")
    phase_peaks = {k: max(r["peak_rss_mb"][k] for r in timed) for k in timed[0]["peak_rss_mb"]}
    lengths = np.array([n for r in timed for n in r["response_lengths"]], dtype=np.float64)
    ended = np.array([e for r in timed for e in r["ended_with_eos"]], dtype=bool)
    response_length = {  # over every response of the timed iterations
        "responses": int(len(lengths)), "mean": round(float(lengths.mean()), 2),
        **{f"p{q}": round(float(np.percentile(lengths, q)), 2) for q in (10, 25, 50, 75, 90)},
        "ended_by_eos_share": round(float(ended.mean()), 4),
        "at_max_new_tokens_share": round(float((lengths >= opts.new_tokens).mean()), 4)}

    # -- compute floor -------------------------------------------------------------------------
    actor_params = int(sum(p.size for p in trainer.actor.parameters()))
    pa = matmul_params(trainer.actor)
    ps = matmul_params(models.reward)
    pc = matmul_params(trainer.critic)
    seq, iters = tokens["sequence"], args.update_iters
    flops = {
        "generation_prefill": 2 * pa * tokens["prompt"],
        "generation_decode": 2 * pa * tokens["response"],
        "scoring_actor_old_log_probs": 2 * pa * seq,
        "scoring_reference_log_probs": 2 * pa * seq,
        "scoring_reward_score": 2 * ps * seq,
        "scoring_critic_values": 2 * pc * seq,
        "actor_update": 6 * pa * seq * iters,
        "critic_update": 6 * pc * seq * iters,
    }
    floor = {k: v / (gflops * 1e9) for k, v in flops.items()}
    floor["generation"] = floor["generation_prefill"] + floor["generation_decode"]
    floor["scoring"] = sum(v for k, v in floor.items() if k.startswith("scoring_"))
    floor["iteration"] = floor["generation"] + floor["scoring"] + floor["actor_update"] + floor["critic_update"]
    time_over_floor = {k: seconds[k] / floor[k] for k in ("generation", "scoring", "actor_update", "critic_update",
                                                          "iteration")}

    def r(x, n=4):
        return round(float(x), n)

    return {
        "config": opts.config,
        "offload_level": opts.offload_level or "(off)",
        "mkl_num_threads": mkl_threads(),
        "model": {"actor_params": actor_params, "actor_params_in_matmuls": pa,
                  "reward_model_params_in_matmuls": ps, "critic_params_in_matmuls": pc,
                  "vocab_size": vocab, "hidden_size": int(trainer.actor.config.hidden_size),
                  "num_hidden_layers": int(trainer.actor.config.num_hidden_layers)},
        "workload": opts.workload,
        "shape": {"prompts_per_iteration": opts.batch,
                  "prompt_length": (f"{opts.min_prompt}-{opts.max_prompt} (Beta(1.3, 4) skewed short)" if realistic
                                    else opts.prompt_length),
                  "max_new_tokens": opts.new_tokens, "train_micro_batch": train_batch,
                  "gradient_accumulation_steps": opts.accumulation,
                  "optimizer_steps_per_iteration_per_model": trainer.steps_per_update * iters,
                  "timed_iterations": opts.iterations, "warmup_iterations": 1},
        "seconds_median": {k: r(v) for k, v in seconds.items()},
        "warmup_iteration_seconds": r(warmup["seconds"]["iteration"]),
        "tokens_per_iteration_median": tokens,
        "response_length": response_length,
        "tokens_per_second": {
            "response_tokens_per_iteration_second": r(tokens["response"] / seconds["iteration"], 1),
            "generation_tokens_per_generation_second": r(tokens["response"] / seconds["generation"], 1),
            # real (non-padding) tokens a phase processed per second of that phase
            "real_tokens_per_phase_second": {k: r(v / seconds[k], 1) for k, v in real_tokens.items()
                                             if seconds.get(k)},
        },
        # the share of the tokens a phase computed that were padding (generation: prefill batch +
        # rows x decode steps; scoring: every scoring forward; update: every micro-batch)
        "padding_share_of_computed_tokens": {k: r(v) for k, v in padding.items()},
        "compute_floor": {
            "fp32_matmul_gflops": r(gflops, 1),
            "floor_seconds": {k: r(v, 5) for k, v in floor.items()},
            "measured_over_floor": {k: r(v, 2) for k, v in time_over_floor.items()},
        },
        "memory_mb": {
            "peak_rss_process_lifetime": r(max(meter.lifetime, maxrss_mb()), 1),
            "peak_rss_timed_iterations": r(phase_peaks["iteration"], 1),
            "peak_rss_generation": r(phase_peaks["generation"], 1),
            "peak_rss_scoring": r(phase_peaks["scoring"], 1),
            "peak_rss_update": r(phase_peaks["update"], 1),
            "peak_rss_warmup_iteration": r(warmup["peak_rss_mb"]["iteration"], 1),
            "rss_before_first_rollout": r(rss_before_first_rollout, 1),
            "rss_last_iteration": {k: r(v, 1) for k, v in timed[-1]["rss_mb"].items()},
            "phase_peaks_are_resettable_hwm": meter.can_reset,
        },
        "_timestamps": {"process_start": _PROCESS_T0, "imports_done": t_imported, "trainer_built": t_trainer,
                        "prompts_ready": t_prepared, "first_rollout_start": t_first_rollout},
    }


# ---------------------------------------------------------------------------------------------
# Parent: build, launch one worker per configuration, collect


def launch(config: str, offload_level: str, dirs: dict, opts, workdir: str, code_root: str = ROOT,
           trainer_args: str = "") -> dict:
    """One worker process; ``code_root``: the checkout whose ``ppo`` it imports (this one, or the
    reference of ``--compare``: the same driver, workload and models over that checkout's trainer)."""
    result_file = os.path.join(workdir, "result.json")
    stderr_file = os.path.join(workdir, "stderr.txt")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--config", config, "--code_root", code_root,
           "--workload", opts.workload, "--min_prompt", str(opts.min_prompt), "--max_prompt", str(opts.max_prompt),
           "--offload_level", offload_level, "--actor", dirs["actor"], "--rm", dirs["rm"], "--workdir", workdir,
           "--result", result_file, "--iterations", str(opts.iterations), "--batch", str(opts.batch),
           "--prompt_length", str(opts.prompt_length), "--new_tokens", str(opts.new_tokens),
           "--train_batch", str(opts.train_batch), "--accumulation", str(opts.accumulation),
           "--trainer_args", trainer_args]
    env = worker_env(code_root)
    with open(stderr_file, "w") as err:
        t_launch = time.time()
        proc = subprocess.run(cmd, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=code_root)
        t_end = time.time()
    if proc.returncode != 0 or not os.path.exists(result_file):
        with open(stderr_file) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"worker {config} / offload '{offload_level}' failed (exit {proc.returncode}):\n{tail}")
    with open(result_file) as f:
        result = json.load(f)
    ts = result.pop("_timestamps")
    result["startup_seconds"] = {
        "interpreter_start": round(ts["process_start"] - t_launch, 3),
        "imports": round(ts["imports_done"] - ts["process_start"], 3),
        "trainer_construction": round(ts["trainer_built"] - ts["imports_done"], 3),
        "prompt_preparation": round(ts["prompts_ready"] - ts["trainer_built"], 3),
        "launch_to_first_rollout": round(ts["first_rollout_start"] - t_launch, 3),
    }
    result["worker_wall_seconds"] = round(t_end - t_launch, 2)
    return result


def compare(off: dict, on: dict) -> dict:
    def ratio(a, b):
        return round(a / b, 3) if b else None

    mo, mf = on["memory_mb"], off["memory_mb"]
    so, sf = on["seconds_median"], off["seconds_median"]
    return {
        "peak_rss_process_lifetime_ratio_offload_over_no_offload": ratio(mo["peak_rss_process_lifetime"],
                                                                         mf["peak_rss_process_lifetime"]),
        "peak_rss_timed_iterations_ratio_offload_over_no_offload": ratio(mo["peak_rss_timed_iterations"],
                                                                         mf["peak_rss_timed_iterations"]),
        "peak_rss_timed_iterations_saved_mb": round(mf["peak_rss_timed_iterations"] - mo["peak_rss_timed_iterations"],
                                                    1),
        "iteration_seconds_ratio_offload_over_no_offload": ratio(so["iteration"], sf["iteration"]),
        "offload_transfer_seconds_per_iteration": so["offload_transfers"],
    }


PHASES = ("generation", "scoring", "actor_update", "critic_update", "advantages", "iteration")


def compare_checkouts(opts, configs, argv) -> dict:
    """``--compare``: per configuration and workload, reference and current workers alternating
    (offload off), ``--rounds`` times; per phase the median seconds over rounds (each a median
    over its timed iterations) and current / reference ratios."""
    ref = os.path.abspath(opts.compare)
    if not os.path.isdir(os.path.join(ref, "ppo")):
        raise SystemExit(f"--compare: '{opts.compare}' is not a checkout of this project (no ppo/ folder)")
    workloads = ("fixed", "realistic") if opts.workload == "both" else (opts.workload,)
    out = {"benchmark": "ppo_iteration --compare",
           "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + (argv or sys.argv[1:])),
           "note": opts.note,
           "reference": {"path": ref, "commit": _git_head(ref)}, "current": {"path": ROOT, "commit": _git_head(ROOT)},
           "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform()},
           "settings": {"prompts_per_iteration": opts.batch, "prompt_length": opts.prompt_length,
                        "max_new_tokens": opts.new_tokens, "train_micro_batch": opts.train_batch,
                        "gradient_accumulation_steps": opts.accumulation,
                        "timed_iterations": opts.iterations, "rounds": opts.rounds, "offload": "off",
                        "realistic": {"min_prompt": opts.min_prompt, "max_prompt": opts.max_prompt,
                                      "eos_mean_length": opts.eos_mean_length}},
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
           "results": {}}
    with tempfile.TemporaryDirectory(prefix="ppo-compare-") as tmp:
        for config in configs:
            for workload in workloads:
                opts.workload = workload
                name = f"{config}/{workload}"
                print(f"[ppo_iteration] building random {config} models ({workload})", file=sys.stderr, flush=True)
                dirs = build_models(config, os.path.join(tmp, config, workload, "models"),
                                    opts.eos_mean_length if workload == "realistic" else 0.0)
                runs = {"reference": [], "current": []}
                for k in range(opts.rounds):
                    for side, root in (("reference", ref), ("current", ROOT)):
                        workdir = os.path.join(tmp, config, workload, f"{side}{k}")
                        os.makedirs(workdir)
                        load_before = os.getloadavg()
                        runs[side].append(launch(config, "", dirs, opts, workdir, code_root=root,
                                                 trainer_args=opts.current_args if side == "current" else ""))
                        # other jobs on a shared machine: the 1/5/15-minute load around each worker
                        runs[side][-1]["load_average_before_after"] = [[round(x, 2) for x in load_before],
                                                                       [round(x, 2) for x in os.getloadavg()]]
                        print(f"[ppo_iteration] {name} {side} round {k}: "
                              f"{runs[side][-1]['seconds_median']['iteration']:.2f} s/iteration",
                              file=sys.stderr, flush=True)
                summary = {}
                for side, results in runs.items():
                    summary[side] = {
                        "seconds_median": {p: statistics.median(r["seconds_median"][p] for r in results)
                                           for p in PHASES},
                        "scoring_forward_seconds": {k: v for k, v in results[0]["seconds_median"].items()
                                                    if k.startswith("scoring_forward_")},
                        "measured_over_floor": results[0]["compute_floor"]["measured_over_floor"],
                        "padding_share_of_computed_tokens": results[0]["padding_share_of_computed_tokens"],
                        "real_tokens_per_phase_second": results[0]["tokens_per_second"]["real_tokens_per_phase_second"],
                        "tokens_per_iteration": results[0]["tokens_per_iteration_median"],
                        "response_length": results[0]["response_length"],
                        "peak_rss_timed_iterations_mb": max(r["memory_mb"]["peak_rss_timed_iterations"]
                                                            for r in results),
                        "per_round_iteration_seconds": [r["seconds_median"]["iteration"] for r in results],
                    }
                cur, base = summary["current"]["seconds_median"], summary["reference"]["seconds_median"]
                summary["speedup_reference_over_current"] = {
                    p: round(base[p] / cur[p], 3) if cur[p] else None for p in PHASES}
                summary["peak_rss_ratio_current_over_reference"] = round(
                    summary["current"]["peak_rss_timed_iterations_mb"]
                    / summary["reference"]["peak_rss_timed_iterations_mb"], 3)
                summary["eos_calibration"] = dirs["eos_calibration"]
                summary["runs"] = runs
                out["results"][name] = summary
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import paddle

        out["machine"]["paddle"] = paddle.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _git_head(folder: str) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "33m", "both"], default=None,
                        help="model size (default: both; tiny with --quick)")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations after one warm-up (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: tiny model, 4 prompts of 16 tokens, 8 new tokens, 1 timed iteration")
    parser.add_argument("--batch", type=int, default=None, help="prompts per iteration (default 16)")
    parser.add_argument("--prompt_length", type=int, default=None, help="prompt tokens (default 64)")
    parser.add_argument("--new_tokens", type=int, default=None, help="max_new_tokens (default 64)")
    parser.add_argument("--train_batch", type=int, default=8, help="per_device_train_batch_size (default 8)")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="gradient_accumulation_steps: micro-batches of --train_batch rows per optimizer step "
                             "(default 1)")
    parser.add_argument("--workload", choices=["fixed", "realistic", "both"], default="fixed",
                        help="fixed: every prompt --prompt_length random tokens, responses to max_new_tokens; "
                             "realistic: prompt lengths --min_prompt..--max_prompt skewed short (left padded), "
                             "the actor's EOS logit biased so sampled responses end after --eos_mean_length "
                             "tokens on average (reproducible: seeded models and prompts)")
    parser.add_argument("--min_prompt", type=int, default=16, help="realistic: shortest prompt (default 16)")
    parser.add_argument("--max_prompt", type=int, default=256, help="realistic: longest prompt (default 256)")
    parser.add_argument("--eos_mean_length", type=float, default=48.0,
                        help="realistic: mean sampled response length the EOS bias aims at (default 48)")
    parser.add_argument("--compare", metavar="REF_CHECKOUT", default=None,
                        help="also run a reference checkout's trainer (e.g. `git worktree add /tmp/ref 5a67775`) "
                             "under the same driver, models and prompts, alternating reference and current "
                             "workers for --rounds rounds (offload off); reports medians and current/reference "
                             "ratios")
    parser.add_argument("--rounds", type=int, default=1, help="--compare: alternating rounds (default 1)")
    parser.add_argument("--current_args", default="",
                        help="--compare: PPO arguments (a JSON object) of the current side's trainers only, e.g. "
                             "'{\"bf16\": true}' with --compare on this same checkout")
    parser.add_argument("--trainer_args", default="", help=argparse.SUPPRESS)
    parser.add_argument("--note", default="", help="a free-text note stored in the JSON (e.g. machine shared)")
    parser.add_argument("--code_root", default=ROOT, help=argparse.SUPPRESS)
    # worker side (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--offload_level", default="", help=argparse.SUPPRESS)
    parser.add_argument("--actor", help=argparse.SUPPRESS)
    parser.add_argument("--rm", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    quick_defaults = dict(config="tiny", iterations=1, batch=4, prompt_length=16, new_tokens=8)
    full_defaults = dict(config="both", iterations=2, batch=16, prompt_length=64, new_tokens=64)
    for key, value in (quick_defaults if opts.quick else full_defaults).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.iterations < 1:
        parser.error("--iterations must be >= 1")

    if opts.worker:
        if opts.code_root != ROOT:  # the reference checkout's ppo, not this one's
            sys.path.insert(0, opts.code_root)
        result = run_worker(opts)
        with open(opts.result, "w") as f:
            json.dump(result, f)
        return

    configs = CONFIGS if opts.config == "both" else (opts.config,)
    if opts.compare:
        print(json.dumps(compare_checkouts(opts, configs, argv), indent=1))
        return
    if opts.workload == "both":
        parser.error("--workload both needs --compare (without it, run one workload at a time)")
    out = {
        "benchmark": "ppo_iteration",
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + (argv or sys.argv[1:])),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"prompts_per_iteration": opts.batch, "prompt_length": opts.prompt_length,
                     "max_new_tokens": opts.new_tokens, "train_micro_batch": opts.train_batch,
                     "timed_iterations": opts.iterations, "warmup_iterations": 1,
                     "offload_on_level": OFFLOAD_ON, "quick": opts.quick,
                     "workload": opts.workload, "note": opts.note,
                     "prompts": "random token ids (no padding)" if opts.workload == "fixed" else
                     f"random token ids, {opts.min_prompt}-{opts.max_prompt} tokens skewed short, left padded",
                     "sampling": "temperature 1, no top-k/top-p"},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="ppo-iteration-") as tmp:
        for config in configs:
            print(f"[ppo_iteration] building random {config} models", file=sys.stderr, flush=True)
            dirs = build_models(config, os.path.join(tmp, config, "models"),
                                opts.eos_mean_length if opts.workload == "realistic" else 0.0)
            runs = {}
            for name, level in (("offload_off", ""), ("offload_on", OFFLOAD_ON)):
                print(f"[ppo_iteration] {config} {name}: fresh worker process", file=sys.stderr, flush=True)
                workdir = os.path.join(tmp, config, name)
                os.makedirs(workdir)
                runs[name] = launch(config, level, dirs, opts, workdir)
                s = runs[name]["seconds_median"]
                print(f"[ppo_iteration] {config} {name}: {s['iteration']:.2f} s/iteration, peak "
                      f"{runs[name]['memory_mb']['peak_rss_timed_iterations']:.0f} MB", file=sys.stderr, flush=True)
            runs["offload_on_vs_off"] = compare(runs["offload_off"], runs["offload_on"])
            runs["eos_calibration"] = dirs["eos_calibration"]
            out["results"][config] = runs
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import paddle

        out["machine"]["paddle"] = paddle.__version__
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
