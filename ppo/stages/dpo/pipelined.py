"""The DPO step under pipeline parallel: every micro-batch of an optimizer step in one pass of
fleet's 1F1B schedule, the loss in the last stage.

Pairs are packed one per row (``pack_pairs``: the pipeline slices every input and label tensor by
rows, ``per_device_train_batch_size`` pairs per micro-batch) and padded to one length for the whole
step (the schedule sends one shape).  The reference log-probs are computed before the pass (a
frozen whole copy, or the precomputed table) and reach the last stage as labels, with each
micro-batch's weight.
"""

from __future__ import annotations

import numpy as np

from ppo.distributed import parallel, pipeline
from ppo.stages.dpo.objective import PairLogProbs, paired_loss
from ppo.stages.dpo.reference import packed_from_logits

STAT_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")


def pipeline_pair_step(trainer, batches: list, weights: list) -> list[dict]:
    """``SingleModelTrainer.accumulate`` for DPO under pipeline parallel: the stats of every micro-batch."""
    args = trainer.args
    rows = [int(b["index"].shape[0]) for b in batches]
    indices = np.concatenate([b["index"].numpy() for b in batches]).tolist()
    whole = trainer.collate(trainer.train_data, indices)  # one packed batch: one length for every micro-batch
    ref_chosen, ref_rejected = trainer.reference.pairs(whole, "train", trainer.precision)
    labels = (whole["packed_input_ids"], whole["packed_chosen_mask"], whole["packed_rejected_mask"],
              whole["packed_first_rejected"], ref_chosen.reshape([-1, 1]), ref_rejected.reshape([-1, 1]),
              pipeline.row_weights(rows, weights))

    def compute(logits, labels):
        ids, chosen_mask, rejected_mask, first, rc, rr, w = labels
        pc, pr, nc, nr = packed_from_logits(logits, ids, chosen_mask, rejected_mask, first)
        loss, stats = paired_loss(PairLogProbs(pc, pr, nc, nr, rc[:, 0], rr[:, 0]), args)
        return loss * float(w[0, 0]), {"loss": float(loss), **stats}

    inputs = (whole["packed_input_ids"], whole["packed_attention_mask"], whole["packed_position_ids"])
    return pipeline.pipeline_pass(trainer.model, trainer.optimizer, inputs, labels, compute, STAT_KEYS,
                                  len(batches), trainer.precision)


def refresh_copy(trainer) -> None:
    """The whole (non-pipeline) copy that evaluates and precomputes, set to the trained weights."""
    pipeline.export_weights(parallel.unwrap(trainer.model), trainer.eval_copy, merge_tensor_parallel=False)
