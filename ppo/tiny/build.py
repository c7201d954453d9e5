"""Build the tiny example's tokenizer and randomly initialised LLaMA models, offline.

``python -m ppo.tiny.build --output_dir output/tiny`` writes

* ``<out>/tokenizer``: a sentencepiece BPE tokenizer trained on the example corpus, saved as a
  paddlenlp ``LlamaTokenizer`` (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3);
* ``<out>/base``: a tiny ``LlamaForCausalLM`` with random weights and that tokenizer, loadable
  with ``from_pretrained``.  It is the starting point of the SFT stage.

The same functions build the test fixtures, so tests never touch a model hub.
"""

from __future__ import annotations

import argparse
import io
import os

from ppo.models.families import DEMO_FAMILY, family_named
from ppo.tiny.arithmetic import corpus as arithmetic_corpus
from ppo.tiny.task import corpus

# Model sizes used by the example, the tests and the benchmarks.
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)
BENCH_33M = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                 num_attention_heads=8, max_position_embeddings=512)


def build_tokenizer(out_dir: str, vocab_size: int = 320, with_pad: bool = True, texts=None):
    """Train a sentencepiece tokenizer on the example corpus (or ``texts``) and save it.

    ``with_pad=False`` builds a tokenizer with no pad token (used to test that path).
    Returns the paddlenlp tokenizer.
    """
    import sentencepiece as spm
    from paddlenlp.transformers import LlamaTokenizer

    os.makedirs(out_dir, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts) if texts is not None else corpus()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3 if with_pad else -1,
        num_threads=1,
        minloglevel=2,
    )
    model_file = os.path.join(out_dir, "tokenizer.model")
    with open(model_file, "wb") as f:
        f.write(buf.getvalue())
    kwargs = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                  add_bos_token=True, add_eos_token=False)
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    tokenizer = LlamaTokenizer(vocab_file=model_file, **kwargs)
    if not with_pad:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_llama(out_dir: str, tokenizer, seed: int = 0, **sizes):
    """Save a randomly initialised LLaMA causal LM sized by ``sizes`` (default: TINY)."""
    return build_causal_lm(out_dir, tokenizer, seed=seed, **sizes)


def build_causal_lm(out_dir: str, tokenizer, family: str | None = None, seed: int = 0,
                    tie_word_embeddings: bool = False, **sizes):
    """Save a randomly initialised causal LM of model ``family`` (default: the demo's, LLaMA) sized
    by ``sizes`` (default: TINY); ``tie_word_embeddings``: the LM head is the embedding's transpose."""
    import paddle

    model_family = family_named(family or DEMO_FAMILY, "family")
    dims = dict(TINY)
    dims.update(sizes)
    dims.setdefault("vocab_size", len(tokenizer))
    dims.setdefault("num_key_value_heads", dims["num_attention_heads"])  # Qwen2's config defaults it to 32
    config = model_family.config_class(
        **dims,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        use_flash_attention=False,
        tie_word_embeddings=tie_word_embeddings,
        dtype="float32",
    )
    paddle.seed(seed)
    model = model_family.causal_lm_class(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="output/tiny", help="folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--task", default="tiny", choices=("tiny", "arithmetic"),
                        help="corpus of the tokenizer: the example's texts, or the arithmetic task's (digits)")
    args = parser.parse_args(argv)
    texts = None
    if args.task == "arithmetic":
        texts = list(arithmetic_corpus())
    tokenizer = build_tokenizer(os.path.join(args.output_dir, "tokenizer"), texts=texts)
    build_llama(os.path.join(args.output_dir, "base"), tokenizer, seed=args.seed)
    print(f"tokenizer ({len(tokenizer)} tokens) and tiny LLaMA written to {args.output_dir}")


if __name__ == "__main__":
    main()
