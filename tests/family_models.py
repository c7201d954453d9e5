"""Tiny per-family model folders for the tests: a causal LM on the tiny tokenizer and its reward model."""

import numpy as np


def randomize_biases(model, seed):
    """paddlenlp starts the q/k/v biases at zero: make them matter from step 0 (a layout that
    dropped or mis-split them would then differ from one process)."""
    import paddle

    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("_proj.bias"):
            p.set_value(paddle.to_tensor(rng.normal(0, 0.3, p.shape).astype("float32")))


def family_dir(tiny_dir, out, family, randomize, **sizes):
    """A tiny ``family`` model with grouped kv heads on the tiny tokenizer in ``out/base``
    (``randomize(model)`` makes its family's own weights matter from step 0), and its reward model in
    ``out/score``: the base with a fresh (fixed-seed) score head, as tiny_dir's score/."""
    from paddlenlp.transformers import AutoTokenizer

    from ppo.models import load_score_model
    from ppo.tiny.build import build_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    model = build_causal_lm(str(out / "base"), tokenizer, family=family, seed=0, num_key_value_heads=2, **sizes)
    randomize(model)
    model.save_pretrained(str(out / "base"), safe_serialization=True)
    load_score_model(str(out / "base")).save_pretrained(str(out / "score"))
    tokenizer.save_pretrained(str(out / "score"))
    return out
