import os
import sys

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
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
    model.save_pretrained(str(out / "base"))
    load_score_model(str(out / "base")).save_pretrained(str(out / "score"))
    tokenizer.save_pretrained(str(out / "score"))
    return out
