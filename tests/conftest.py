import os
import sys

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
# Under pytest-xdist the workers share the cores: each worker (and every process it starts) takes
# its share of MKL threads, as a launcher's ranks do, instead of every worker taking all of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "MKL_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["MKL_NUM_THREADS"] = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny tokenizer (``<dir>/tokenizer``) and random tiny LLaMA (``<dir>/base``), built offline."""
    from ppo.tiny.build import build_llama, build_tokenizer

    out = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(str(out / "tokenizer"))
    build_llama(str(out / "base"), tokenizer, seed=0)
    # the base with a fresh (fixed-seed) score head: what a reward model needs to be accepted
    from ppo.models import load_score_model
    load_score_model(str(out / "base")).save_pretrained(str(out / "score"))
    tokenizer.save_pretrained(str(out / "score"))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from paddlenlp.transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))


@pytest.fixture(scope="session")
def qwen2_tied_dir(tiny_dir, tmp_path_factory):
    """A tiny Qwen2 with tied embeddings, grouped kv heads and random q/k/v biases (``<dir>/base``)
    on the tiny tokenizer, and its score model (``<dir>/score``: the base with a fixed-seed head)."""
    import numpy as np
    import paddle
    from paddlenlp.transformers import AutoTokenizer

    from ppo.models import load_score_model
    from ppo.tiny.build import build_causal_lm

    out = tmp_path_factory.mktemp("qwen2-tied")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    model = build_causal_lm(str(out / "base"), tokenizer, family="qwen2", seed=0, num_key_value_heads=2,
                            tie_word_embeddings=True)
    rng = np.random.default_rng(7)  # paddlenlp starts the biases at zero: make them matter from step 0
    for name, p in model.named_parameters():
        if name.endswith("_proj.bias"):
            p.set_value(paddle.to_tensor(rng.normal(0, 0.3, p.shape).astype("float32")))
    model.save_pretrained(str(out / "base"), safe_serialization=True)
    load_score_model(str(out / "base")).save_pretrained(str(out / "score"))
    tokenizer.save_pretrained(str(out / "score"))
    return out


@pytest.fixture(scope="session")
def qwen3_tied_dir(tiny_dir, tmp_path_factory):
    """A tiny tied Qwen3 (grouped kv heads, head_dim 32, random q/k norm weights) and its score model."""
    from family_models import family_dir
    from test_qwen3 import randomize_head_norms

    return family_dir(tiny_dir, tmp_path_factory.mktemp("qwen3-tied"), "qwen3",
                      lambda m: randomize_head_norms(m, seed=9), head_dim=32, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def ernie4_5_tied_dir(tiny_dir, tmp_path_factory):
    """A tiny tied ERNIE 4.5 (ERNIE-4.5-0.3B's form: tied, use_bias off; grouped kv heads, head_dim
    32) and its score model."""
    from family_models import family_dir

    return family_dir(tiny_dir, tmp_path_factory.mktemp("ernie4_5-tied"), "ernie4_5", lambda m: None,
                      head_dim=32, tie_word_embeddings=True)


@pytest.fixture(autouse=True)
def _matmul_path_per_test():
    """Every test starts on the matmul path the worker had before it: a trainer built in-process
    (e.g. from a PaddleNLP config with bf16 true) switches the process-wide oneDNN / bf16 state,
    which would otherwise carry into the next test's models."""
    from ppo.models import cpu_gemm

    before = cpu_gemm.snapshot()
    yield
    cpu_gemm.restore(before)


# The files with the longest runs first (measured with --durations), so that the workers, which
# take whole files, do not end with one long file running alone.
LONGEST_FIRST = ["test_ppo_parallel.py", "test_pools.py", "test_graceful_stop.py", "test_resume.py", "test_entrypoints.py",
                 "test_ppo_rewards.py", "test_resume_parallel.py", "test_cpu_fleet.py", "test_hf_checkpoints.py",
                 "test_bad_inputs.py", "test_lora_parallel.py", "test_ernie4_5.py", "test_qwen3.py", "test_qwen2.py",
                 "test_pipeline.py", "test_reward_service.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
