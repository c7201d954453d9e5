"""Supervised fine-tuning: next-token loss on answer tokens only (prompt tokens carry label -100)."""

from __future__ import annotations

import numpy as np
import paddle

from ppo.core import algorithms as algo
from ppo.distributed import parallel
from ppo.args import SFTArgs
from ppo.core.batching import token_mean_weights
from ppo.data import SupervisedDataset, answer_mask
from ppo.models import load_causal_lm, position_ids_from_mask
from ppo.models.lora import apply_lora
from ppo.models.recompute import enable_recompute
from ppo.stages.single_model import SingleModelTrainer


def lm_logits(model, input_ids, attention_mask) -> paddle.Tensor:
    """[B, T, V] logits with positions counted over real tokens (same for any padding side)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), return_dict=True)
    return out.logits


def answer_token_loss(logits, labels) -> tuple[paddle.Tensor, int]:
    """(mean next-token NLL over the labelled answer tokens, their count); logits [B, T, V],
    labels [B, T] (-100 off the answer).  ``algorithms.nll_sum`` over ``answer_mask``, as the ptx term."""
    valid = answer_mask(labels)
    n = int(valid.astype("int64").sum())
    targets = paddle.where(valid, labels[:, 1:], paddle.zeros_like(labels[:, 1:]))
    return algo.nll_sum(algo.gather_log_probs(logits[:, :-1], targets), valid) / max(n, 1), n


class SFTTrainer(SingleModelTrainer):
    stage = "sft"

    def __init__(self, args: SFTArgs):
        tokenizer, train_data, eval_data = self.begin(args, SupervisedDataset)
        # tensor parallel: gathered (full-vocabulary) logits feed the plain cross entropy
        model = load_causal_lm(args.model_name_or_path, **parallel.tp_kwargs(), tensor_parallel_output=False)
        if args.lora:
            apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_target_modules, seed=args.seed)
        if args.recompute:
            enable_recompute(model, args.recompute_granularity)
        self.setup(args, model, tokenizer, train_data, eval_data)

    def micro_weights(self, batches: list) -> list:
        """Token-mean over the step: every answer token of every micro-batch and data rank counts once."""
        tokens = [int(answer_mask(b["labels"]).astype("int64").sum()) for b in batches]
        return token_mean_weights(tokens, parallel.sum_over_data(float(sum(tokens))), self.ctx.data_world)

    def compute_loss(self, batch):
        with self.precision.autocast():
            logits = lm_logits(self.model, batch["input_ids"], batch["attention_mask"])
        loss, _ = answer_token_loss(logits, batch["labels"])
        return loss, {}

    @paddle.no_grad()
    def evaluate(self) -> dict:
        """Token-weighted answer loss and perplexity on the eval set, over all data ranks."""
        if self.eval_data is None:
            return {}
        mine, per_rank = self.eval_shard()
        total, count = 0.0, 0
        self.model.eval()
        bs = self.args.per_device_eval_batch_size
        for start in range(0, len(mine), bs):
            batch = self.collate(self.eval_data, mine[start:start + bs])
            loss, n = answer_token_loss(lm_logits(self.model, batch["input_ids"], batch["attention_mask"]),
                                        batch["labels"])
            total, count = total + float(loss) * n, count + n
        self.model.train()
        sums = parallel.all_gather_data([total, count]).reshape(-1, 2).sum(axis=0)
        loss = float(sums[0] / max(sums[1], 1))
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": int(sums[1])}
