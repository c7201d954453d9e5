"""transformers itself as the reference, in its own process (torch and paddle stay out of each
other's process): write a transformers folder with transformers' own classes, or read the logits
of a folder with them.

    python tests/hf_reference.py write FAMILY FOLDER --vocab V --tied 0|1 --seed S
    python tests/hf_reference.py logits FOLDER IDS_JSON OUT.npy

``write`` builds transformers' ``<Family>ForCausalLM`` from a tiny config (grouped kv heads; for
Qwen3 and ERNIE 4.5 a head_dim twice hidden / heads, with ERNIE's ``use_bias`` from ``--bias``), random
weights from ``--seed`` (norm weights and biases too, so that each matters), and saves it with ``save_pretrained`` (safetensors).  ``logits`` loads a
folder with ``AutoModelForCausalLM`` in float32 and saves its logits on one sequence.
"""

import argparse
import json
import sys

import numpy as np
import torch

FAMILIES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM")}


def write(family: str, folder: str, vocab: int, tied: bool, seed: int, bias: bool = False) -> None:
    import transformers

    config_name, model_name = FAMILIES[family]
    dims = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=50000.0,
                tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family == "qwen3":
        dims.update(head_dim=16, attention_bias=False)
    if family == "ernie4_5":  # its interleaved rotary, its own head_dim and the bias switch
        dims.update(head_dim=16, use_bias=bias)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**dims)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # norms start at ones: make every one of them matter
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)


def logits(folder: str, ids: list, out: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        np.save(out, model(torch.tensor([ids])).logits[0].numpy())


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("family", choices=sorted(FAMILIES))
    w.add_argument("folder")
    w.add_argument("--vocab", type=int, required=True)
    w.add_argument("--tied", type=int, default=0)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--bias", type=int, default=0, help="ERNIE 4.5's use_bias")
    r = sub.add_parser("logits")
    r.add_argument("folder")
    r.add_argument("ids")
    r.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.family, args.folder, args.vocab, bool(args.tied), args.seed, bool(args.bias))
    else:
        logits(args.folder, json.loads(args.ids), args.out)


if __name__ == "__main__":
    sys.exit(main())
