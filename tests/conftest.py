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
