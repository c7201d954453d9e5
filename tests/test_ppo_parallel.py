"""PPO under parallel layouts (real ``paddle.distributed.launch``, gloo on CPU) equals one process.

Layouts: data parallel, sharding stage 1 and 2, tensor parallel (rolling out on the training model or on
a merged single copy), pipeline parallel, tensor x pipeline parallel (rolling out on
tensor-parallel or single copies), data x pipeline parallel and pipeline x sharding stage 1 (4
ranks; rollout on copies exported from the pipeline, the batch split over the pipeline's ranks);
also the ptx loss under pipeline parallel, and recompute under tensor and pipeline parallel
(bitwise equal to the same layout without it).  Qwen2 under tensor and pipeline parallel, from
paddlenlp and from transformers folders; Mistral under tensor parallel and tied Qwen2 under sharding
stage 1, from transformers folders (converted once for all ranks; their exports checked).

Every run starts from the same tiny actor (also the reward model and critic, with the score head's
fixed-seed initialisation), sees the same global prompt batch of 8 and decodes greedily, so the
comparison does not depend on sampling.  One optimizer step per ``update_iters`` epoch (the train
micro-batch is the whole per-rank rollout) and no mini-batch shuffling: the global batch of every
step is the same rows whatever the layout.

Tolerance: the layouts compute the same sums in another order (an all-reduce over ranks, matmuls
split over the hidden or vocabulary dimension, a log-softmax normaliser assembled from per-shard
max and sum), about 1e-7 relative per operation in float32; six Adam steps carry that into
differences of about 1e-6 in losses and weights.  The bounds below (1e-4 on losses and rewards,
2e-3 relative on gradient norms) leave room for that and are still far below what one changed
row, token or step would move (1e-2 and more).  Weights are compared by the one rule of
``tests/trained_weights.py``: AdamW puts a weight whose gradient is near zero up to a step apart.
"""

import json
import os

import numpy as np
import pytest

from test_entrypoints import run
from test_hf_checkpoints import check_export_matches
from family_models import family_dir, randomize_biases
from trained_weights import assert_bitwise_weights, assert_trained_weights_match, weights

STEPS = 3
COMMON = ["--max_steps", str(STEPS), "--do_sample", "false", "--max_new_tokens", "8", "--update_iters", "2",
          "--shuffle_minibatches", "false", "--logging_steps", "1", "--eval_steps", "100",
          "--learning_rate", "0.001", "--critic_learning_rate", "0.001", "--save_steps", "0"]
LR = 1e-3
OPTIMIZER_STEPS = STEPS * 2  # update_iters 2, one optimizer step per epoch (the whole rollout)

# the pipeline layouts step over 2 micro-batches of 4 (fleet's 1F1B schedule with a steady phase);
# the token-mean makes that the same update as one batch of 8
PIPELINE = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
LAYOUTS = {
    # name: (arguments, per-device prompt batch giving the same global batch of 8 prompts, ranks)
    "data-parallel": ([], 4, 2),
    "sharding-stage1": (["--sharding_parallel_degree", "2", "--sharding", "stage1"], 4, 2),
    "sharding-stage2": (["--sharding_parallel_degree", "2", "--sharding", "stage2"], 4, 2),
    "tensor-parallel": (["--tensor_parallel_degree", "2"], 8, 2),
    # with every offload level: the training actor and critic leave while the copies roll out
    "tensor-parallel-single-rollout": (["--tensor_parallel_degree", "2", "--eval_mode", "single", "--offload_level",
                                        "freeze_model optimizer train_model"], 8, 2),
    "pipeline-parallel": (["--pipeline_parallel_degree", "2", *PIPELINE], 8, 2),
    "tp2xpp2": (["--tensor_parallel_degree", "2", "--pipeline_parallel_degree", "2", *PIPELINE], 8, 4),
    "tp2xpp2-single-rollout": (["--tensor_parallel_degree", "2", "--pipeline_parallel_degree", "2", "--eval_mode",
                                "single", *PIPELINE], 8, 4),
    "dp2xpp2": (["--pipeline_parallel_degree", "2", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "2"], 4, 4),
    "pp2xsharding-stage1": (["--pipeline_parallel_degree", "2", "--sharding_parallel_degree", "2", "--sharding",
                             "stage1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"], 4, 4),
}


def train_metrics(output_dir, split="train"):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def eval_samples(output_dir):
    """Every rank's eval generations of each eval step, as sorted (prompt, response, reward) rows."""
    folder = os.path.join(output_dir, "eval_samples")
    found = {}
    for name in os.listdir(folder):
        step = int(name.split(".")[0].split("-")[1])
        with open(os.path.join(folder, name)) as f:
            found.setdefault(step, []).extend(json.loads(line) for line in f)
    return {step: sorted(rows, key=lambda r: (r["prompt"], r["response"])) for step, rows in found.items()}


def assert_same_eval(one_dir, two_dir, steps=(0, STEPS), rows=24, extra_keys=()):
    """The same eval reward, KL and lengths, and the same eval generations (``rows`` prompts, 24 in
    the tiny task, every rank's share: a redundant or missing share would change the row count);
    with reward functions, the same per-function scores of every row."""
    one, two = train_metrics(one_dir, "eval"), train_metrics(two_dir, "eval")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(steps)
    for a, b in zip(one, two):
        for key in ("reward", "reward_std", "kl", "response_length", *extra_keys):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    rows_one, rows_two = eval_samples(one_dir), eval_samples(two_dir)
    assert rows_one.keys() == rows_two.keys()
    for step in rows_one:
        assert len(rows_one[step]) == len(rows_two[step]) == rows
        assert [(r["prompt"], r["response"]) for r in rows_one[step]] == \
            [(r["prompt"], r["response"]) for r in rows_two[step]]
        np.testing.assert_allclose([r["reward"] for r in rows_two[step]], [r["reward"] for r in rows_one[step]],
                                   atol=1e-4)
        assert [r.get("rewards") for r in rows_one[step]] == [r.get("rewards") for r in rows_two[step]]


def ppo(tiny_dir, out, batch, *extra, nproc=1):
    base = str(tiny_dir / "base")
    run("ppo/run_ppo.py", "config/tiny/ppo_argument.json", "--actor_model_name_or_path", base,
        "--reward_model_name_or_path", str(tiny_dir / "score"), "--output_dir", out, *COMMON,
        "--per_device_prompt_batch_size", str(batch), "--per_device_train_batch_size", str(batch),
        "--gradient_accumulation_steps", "1", *extra,
        nproc=nproc)
    return train_metrics(out)


@pytest.fixture(scope="module")
def single(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-single")
    return out, ppo(tiny_dir, out, 8)


def assert_same_weights(folder_a, folder_b):
    """The rule of ``tests/trained_weights.py`` at these runs' learning rate and step count."""
    assert_trained_weights_match(folder_a, folder_b, lr=LR, steps=OPTIMIZER_STEPS)


STEP_KEYS = ("actor_loss", "critic_loss", "reward", "kl", "value_mean", "return_mean", "entropy")
GRAD_NORMS = ("actor_grad_norm", "critic_grad_norm")


def assert_same_steps(one, two, extra_keys=(), steps=STEPS, keys=STEP_KEYS, grad_norms=GRAD_NORMS):
    """The same training metrics, step by step (``keys``: 1e-4 relative; gradient norms 2e-3)."""
    assert len(one) == len(two) == steps
    for a, b in zip(one, two):
        assert a["response_length"] == b["response_length"], (a, b)  # the same greedy responses
        for key in (*keys, *extra_keys):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
        for key in grad_norms:
            assert abs(a[key] - b[key]) < 2e-3 * max(1e-3, abs(a[key])), (key, a[key], b[key])


@pytest.fixture(scope="module")
def layout_run(tiny_dir, tmp_path_factory):
    """``layout_run(name)`` -> (output folder, train metrics) of that layout's run, launched once per
    module: the recompute test compares against the same runs as the layout test."""
    done = {}

    def get(layout):
        if layout not in done:
            extra, batch, nproc = LAYOUTS[layout]
            out = tmp_path_factory.mktemp(layout)
            done[layout] = (out, ppo(tiny_dir, out, batch, *extra, nproc=nproc))
        return done[layout]

    return get


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ppo_layouts_match_one_process(tiny_dir, single, layout_run, layout):
    one_dir, one = single
    two_dir, two = layout_run(layout)
    assert_same_steps(one, two)
    assert_same_eval(one_dir, two_dir)
    # training moved the policy: the final weights differ from the start by far more than the tolerance

    start = weights(tiny_dir / "base")
    final = weights(one_dir / "policy")
    moved = max(float(np.abs(final[k] - start[k]).max()) for k in final if k in start)
    assert moved > 1e-3
    # merged checkpoints, loadable in one process, equal to the single-process ones
    for sub in ("policy", "value"):
        assert_same_weights(one_dir / sub, two_dir / sub)


@pytest.mark.slow
@pytest.mark.distributed
def test_data_ranks_cutting_steps_into_different_numbers_of_micro_batches_match_one_process(tiny_dir, single,
                                                                                          tmp_path, monkeypatch):
    """The update's cut varies per rank (its lengths): data-parallel gradients are reduced once per
    step, on each rank's last micro-batch, so ranks taking different numbers of micro-steps still
    give one process's update (``tests/uneven_cut.py`` makes rank 1 take one per row)."""
    from test_entrypoints import ROOT

    counts = tmp_path / "counts"
    counts.mkdir()
    monkeypatch.setenv("UNEVEN_CUT_DIR", str(counts))
    out = tmp_path / "uneven"
    two = ppo(tiny_dir, out, 4, "--extra_modules", os.path.join(ROOT, "tests", "uneven_cut.py"), nproc=2)
    per_rank = [list(map(int, (counts / f"rank{r}").read_text().split())) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0 and per_rank[0] != per_rank[1]
    assert all(c == 4 for c in per_rank[1])  # one per row of a 4-row step
    one_dir, one = single
    assert_same_steps(one, two)
    for sub in ("policy", "value"):
        assert_same_weights(one_dir / sub, out / sub)


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tensor-parallel", "pipeline-parallel"])
def test_recompute_under_tensor_and_pipeline_parallel_is_bitwise(tiny_dir, tmp_path, layout_run, monkeypatch, layout):
    """``recompute`` (actor, whole decoder layers) and ``critic_recompute`` (critic, attention core)
    change nothing: the recomputed forward runs the same kernels on the same inputs, so every
    metric and the final weights are bitwise those of the same layout without recompute.  A probe
    (``tests/recompute_probe.py``) proves that every rank did recompute, with both granularities."""
    from test_entrypoints import ROOT

    plain_dir, _ = layout_run(layout)
    extra, batch, nproc = LAYOUTS[layout]
    probe = tmp_path / "probe"
    probe.mkdir()
    monkeypatch.setenv("RECOMPUTE_PROBE_DIR", str(probe))
    out = tmp_path / "recompute"
    ppo(tiny_dir, out, batch, *extra, "--recompute", "true", "--critic_recompute", "true",
        "--critic_recompute_granularity", "core_attn",
        "--extra_modules", os.path.join(ROOT, "tests", "recompute_probe.py"), nproc=nproc)
    assert sorted(os.listdir(probe)) == [f"rank{r}-{block}" for r in range(nproc) for block in ("core_attn", "full")]
    for split in ("train", "eval"):
        assert without_times(train_metrics(out, split)) == without_times(train_metrics(plain_dir, split))
    for sub in ("policy", "value"):
        assert_bitwise_weights(plain_dir / sub, out / sub)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_node_launch_on_localhost(tiny_dir, tmp_path, single):
    """The multi-node command (``--master``/``--nnodes``), as two launchers of one rank each on this
    machine, trains the same as one process (data parallel over the two "nodes")."""
    import subprocess
    import sys

    from test_entrypoints import ROOT

    one_dir, one = single
    out, base = tmp_path / "two-nodes", str(tiny_dir / "base")
    master = f"127.0.0.1:{free_port()}"
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--master", master, "--nnodes", "2",
               "--nproc_per_node", "1", "--log_dir", str(tmp_path / f"node{node}-logs"),
               os.path.join(ROOT, "ppo/run_ppo.py"), "config/tiny/ppo_argument.json",
               "--actor_model_name_or_path", base, "--reward_model_name_or_path", str(tiny_dir / "score"), "--output_dir", str(out),
               *COMMON, "--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "4",
               "--disable_tqdm", "true"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    two = train_metrics(out)
    assert len(two) == STEPS
    for a, b in zip(one, two):
        for key in ("actor_loss", "critic_loss", "reward", "kl"):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert_same_weights(one_dir / "policy", out / "policy")


@pytest.mark.slow
@pytest.mark.distributed
def test_ptx_under_pipeline_parallel_matches_one_process(tiny_dir, tmp_path):
    """The ptx loss runs as a second pipeline pass (one ptx micro-batch per pipeline micro-batch);
    it equals one process stepping the same 2 micro-batches of 4 with the same ptx rows."""
    ptx = ["--ptx_datasets", "tiny-sft", "--ptx_coeff", "0.5", *PIPELINE]
    one = ppo(tiny_dir, tmp_path / "one", 8, *ptx)
    two = ppo(tiny_dir, tmp_path / "pp2", 8, "--pipeline_parallel_degree", "2", *ptx, nproc=2)
    assert all(r["ptx_loss"] > 0 for r in one)
    assert_same_steps(one, two, extra_keys=("ptx_loss",))
    # the ptx term is in the update: without it the actor ends elsewhere
    plain = ppo(tiny_dir, tmp_path / "plain", 8, *PIPELINE)
    assert abs(plain[-1]["actor_grad_norm"] - one[-1]["actor_grad_norm"]) > 1e-2 * one[-1]["actor_grad_norm"]
    for sub in ("policy", "value"):
        assert_same_weights(tmp_path / "one" / sub, tmp_path / "pp2" / sub)


@pytest.fixture(scope="module")
def qwen2_dir(tiny_dir, tmp_path_factory):
    """A tiny untied Qwen2 (grouped kv heads, random q/k/v biases) on the tiny tokenizer."""
    return family_dir(tiny_dir, tmp_path_factory.mktemp("qwen2"), "qwen2", lambda m: randomize_biases(m, seed=8))


@pytest.fixture(scope="module")
def qwen3_dir(tiny_dir, tmp_path_factory):
    """A tiny untied Qwen3 (grouped kv heads, head_dim 32 = twice hidden / heads, random per-head
    q/k norm weights) on the tiny tokenizer, and its score model."""
    from test_qwen3 import randomize_head_norms

    return family_dir(tiny_dir, tmp_path_factory.mktemp("qwen3"), "qwen3", lambda m: randomize_head_norms(m, seed=8),
                      head_dim=32)


@pytest.fixture(scope="module")
def ernie4_5_dir(tiny_dir, tmp_path_factory):
    """A tiny untied ERNIE 4.5 with use_bias (random biases on every projection), grouped kv heads
    and head_dim 32, and its score model."""
    return family_dir(tiny_dir, tmp_path_factory.mktemp("ernie4_5"), "ernie4_5",
                      lambda m: randomize_biases(m, seed=10), head_dim=32, use_bias=True)


@pytest.fixture(scope="module")
def qwen2_single(qwen2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2-ppo-single")
    return out, ppo(qwen2_dir, out, 8)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tensor-parallel", "pipeline-parallel"])
def test_qwen2_ppo_layouts_match_one_process(qwen2_dir, tmp_path, qwen2_single, layout):
    """Qwen2 (untied) under tensor and pipeline parallel equals one process, same tolerances as LLaMA."""
    extra, batch, nproc = LAYOUTS[layout]
    one_dir, one = qwen2_single
    two = ppo(qwen2_dir, tmp_path / layout, batch, *extra, nproc=nproc)
    assert_same_steps(one, two)
    assert_same_eval(one_dir, tmp_path / layout)
    for sub in ("policy", "value"):
        assert_same_weights(one_dir / sub, tmp_path / layout / sub)
        with open(one_dir / sub / "config.json") as f:
            assert json.load(f)["model_type"] == "qwen2"


def folder_bytes(folder):
    """Every file of ``folder`` with its bytes and modification time (a folder never written to keeps both)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            out[name] = (f.read(), os.stat(path).st_mtime_ns)
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "ernie4_5"])
def test_tied_models_from_transformers_folders_under_sharding_match_one_process(request, family, tmp_path,
                                                                                monkeypatch):
    """Two ranks (sharding stage 1) start from transformers folders (the tied Qwen2, Qwen3 or ERNIE 4.5
    actor and its reward model, exported by the toolkit) with an empty conversion cache: they race to convert,
    each folder is converted exactly once (one log line across both ranks), the folders stay
    byte-identical, and the run equals one process started from the paddlenlp folders.  A rank that
    loaded other weights would show in the step-0 evaluation, where every rank's share of the
    generations and rewards is compared with the single process."""
    from ppo.models import hf

    qwen2_tied_dir = request.getfixturevalue(f"{family}_tied_dir")
    one_dir = tmp_path / "single"
    one = ppo(qwen2_tied_dir, one_dir, 8)
    src = tmp_path / "hf"
    for sub in ("base", "score"):
        hf.export_folder(str(qwen2_tied_dir / sub), str(src / sub))
    before = {sub: folder_bytes(src / sub) for sub in ("base", "score")}
    cache = tmp_path / "cache"
    monkeypatch.setenv("PPO_CACHE", str(cache))  # inherited by the launcher and its ranks
    extra, batch, nproc = LAYOUTS["sharding-stage1"]
    out = tmp_path / "sharding"
    two = ppo(src, out, batch, *extra, nproc=nproc)
    assert_same_steps(one, two)
    assert_same_eval(one_dir, out)
    for sub in ("policy", "value"):
        assert_same_weights(one_dir / sub, out / sub)
    with open(out / "policy" / "config.json") as f:
        saved = json.load(f)
    assert saved["model_type"] == family and saved["tie_word_embeddings"] is True
    assert_converted_once(src, cache, out, nproc)
    assert {sub: folder_bytes(src / sub) for sub in ("base", "score")} == before


def assert_converted_once(src, cache, out, nproc):
    """Each transformers folder ``src/base``, ``src/score`` was converted exactly once into ``cache``
    (one log line across all ranks, whichever rank won the lock) and every rank loaded that copy."""
    from ppo.models import hf

    logs = [(out / "launch-logs" / f"workerlog.{rank}").read_text() for rank in range(nproc)]
    converted = [line for log in logs for line in log.splitlines() if "converting the transformers folder" in line]
    assert sorted(line.split(" into ")[0].rsplit(" ", 1)[-1] for line in converted) == \
        [str(src / "base"), str(src / "score")], converted
    targets = {sub: str(cache / "converted" / hf._cache_key(str(src / sub))) for sub in ("base", "score")}
    for log in logs:
        for sub, target in targets.items():
            assert f"the transformers folder {src / sub} loads from its converted copy {target}" in log
    assert sorted(os.listdir(cache / "converted")) == sorted(
        os.path.basename(t) + ext for t in targets.values() for ext in ("", ".lock"))


@pytest.fixture(scope="module")
def mistral_dir(tiny_dir, tmp_path_factory):
    """A tiny Mistral (grouped kv heads; its sliding window is the tiny task's max_length, 64) and its
    score model (the base with a fixed-seed head), on the tiny tokenizer."""
    from test_mistral import build_mistral

    return build_mistral(tiny_dir, tmp_path_factory.mktemp("mistral"), sliding_window=64)


@pytest.fixture(scope="module")
def from_transformers(tmp_path_factory):
    """``from_transformers(family, paddlenlp_dir)`` -> (root, metrics): ``root/hf/{base,score}`` are
    transformers folders exported from ``paddlenlp_dir``'s actor and reward model, ``root/single``
    the one-process PPO run started from them (with its own empty cache); once per family."""
    from ppo.models import hf

    done = {}

    def get(family, paddlenlp_dir):
        if family not in done:
            root = tmp_path_factory.mktemp(f"{family}-from-transformers")
            for sub in ("base", "score"):
                hf.export_folder(str(paddlenlp_dir / sub), str(root / "hf" / sub))
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("PPO_CACHE", str(root / "single-cache"))  # inherited by the run
                done[family] = root, ppo(root / "hf", root / "single", 8)
        return done[family]

    return get


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["qwen2-tensor-parallel", "qwen2-pipeline-parallel", "mistral-tensor-parallel",
                                  "qwen3-tensor-parallel", "qwen3-pipeline-parallel", "ernie4_5-tensor-parallel",
                                  "ernie4_5-pipeline-parallel"])
def test_ppo_from_transformers_folders_under_tensor_and_pipeline_parallel_matches_one_process(
        request, from_transformers, tmp_path, monkeypatch, case):
    """Two ranks under tensor or pipeline parallel start from transformers folders (the untied Qwen2
    with random q/k/v biases, Mistral, Qwen3 with its q/k norms and wide heads, or ERNIE 4.5 with its
    interleaved rotary and biases everywhere: actor, reference, critic and reward model) with an empty
    cache: each folder is converted once, every rank loads its shard or stage from that copy, and the
    run equals one process started from the same folders (LLaMA's tolerances).  The transformers
    folders written at the end (``policy/hf``, ``value/hf``) match the numpy forward of
    test_hf_checkpoints, load back through the toolkit, and equal the one-process export."""
    from safetensors.numpy import load_file

    family, layout = case.split("-", 1)
    root, one = from_transformers(family, request.getfixturevalue(f"{family}_dir"))
    src, one_dir = root / "hf", root / "single"
    before = {sub: folder_bytes(src / sub) for sub in ("base", "score")}
    cache = tmp_path / "cache"
    monkeypatch.setenv("PPO_CACHE", str(cache))  # inherited by the launcher and its ranks
    extra, batch, nproc = LAYOUTS[layout]
    out = tmp_path / layout
    two = ppo(src, out, batch, *extra, nproc=nproc)
    assert_same_steps(one, two)
    assert_same_eval(one_dir, out)
    assert_converted_once(src, cache, out, nproc)
    assert {sub: folder_bytes(src / sub) for sub in ("base", "score")} == before
    for sub in ("policy", "value"):
        assert_same_weights(one_dir / sub, out / sub)
        exported = check_export_matches(out / sub)
        assert exported["model_type"] == family and exported["tie_word_embeddings"] is False
        check_export_matches(out / sub, load=out / sub / "hf")  # read back as a transformers folder
        with open(one_dir / sub / "hf" / "config.json") as f:
            assert json.load(f) == exported
        assert_trained_weights_match(load_file(str(one_dir / sub / "hf" / "model.safetensors")),
                                     load_file(str(out / sub / "hf" / "model.safetensors")), lr=LR, steps=OPTIMIZER_STEPS)
