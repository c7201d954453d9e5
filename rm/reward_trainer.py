"""Reward-model training: preference pairs -> scalar score model.

Per micro-batch: score the better and the worse answers in one forward, take the preference loss
(+ score regularisation) and backward; the shared loop (``ppo.stages.single_model.SingleModelTrainer``) does
accumulation, clipping, the optimizer step, logging, evaluation and saving.  End scores of every
step are gathered over all data ranks into the model's normaliser, whose statistics are saved in
its config so PPO can normalise rewards with them (``normalize_reward``).
"""

from __future__ import annotations

import numpy as np
import paddle

from ppo.distributed import parallel
from ppo.args import RewardArgs
from ppo.data import PreferenceDataset
from ppo.core.errors import UserError
from ppo.models import Normalizer, load_score_model
from ppo.models.lora import apply_lora
from ppo.models.recompute import enable_recompute
from ppo.distributed.parallel import unwrap
from ppo.stages.single_model import SingleModelTrainer, gather_shard_rows
from rm.losses import divergence_span, score_regularization, sequence_wise_loss, token_wise_loss


def pair_inputs(batch) -> tuple[paddle.Tensor, paddle.Tensor, int]:
    """Better and worse sequences stacked into one [2B, T] batch for a single forward."""
    ids = paddle.concat([batch["better_input_ids"], batch["worse_input_ids"]], axis=0)
    mask = paddle.concat([batch["better_attention_mask"], batch["worse_attention_mask"]], axis=0)
    return ids, mask, batch["better_input_ids"].shape[0]


class RewardTrainer(SingleModelTrainer):
    stage = "reward model"

    def __init__(self, args: RewardArgs):
        tokenizer, train_data, eval_data = self.begin(args, PreferenceDataset)
        model = load_score_model(args.model_name_or_path, score_type="reward", score_bias=args.score_bias,
                                 **parallel.tp_kwargs())
        model.normalizer = Normalizer(args.normalizer_type, args.normalizer_momentum)
        if args.lora:  # the new score head trains whole besides the adapters
            apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_target_modules, trainable=(r"score_head\..*",),
                       seed=args.seed)
        if args.recompute:
            enable_recompute(model, args.recompute_granularity)
        self.setup(args, model, tokenizer, train_data, eval_data)

    def compute_loss(self, batch):
        args = self.args
        ids, mask, B = pair_inputs(batch)
        with self.precision.autocast():
            out = self.model(ids, mask)
        scores = out.scores.squeeze(-1).astype("float32")   # [2B, T]
        end = out.end_scores.squeeze(-1).astype("float32")  # [2B]
        raw_end = end.numpy()
        normalizer = unwrap(self.model).normalizer
        if args.normalize_score_during_training and normalizer.count > 0:
            scores, end = normalizer.normalize(scores), normalizer.normalize(end)
        better_end, worse_end = end[:B], end[B:]
        if args.loss_type == "token-wise":
            span = divergence_span(batch["better_input_ids"], batch["worse_input_ids"],
                                   batch["better_attention_mask"], batch["worse_attention_mask"])
            loss = token_wise_loss(scores[:B], scores[B:], span, args.margin)
        else:
            loss = sequence_wise_loss(better_end, worse_end, args.margin)
        if args.regularization > 0:
            loss = loss + args.regularization * score_regularization(better_end, worse_end)
        accuracy = float((better_end > worse_end).astype("float32").mean())
        return loss, {"accuracy": accuracy, "end_scores": raw_end}

    def after_step(self, stats) -> None:
        scores = parallel.all_gather_data(np.concatenate([s["end_scores"] for s in stats]))
        unwrap(self.model).normalizer.update(scores)

    @paddle.no_grad()
    def evaluate(self) -> dict:
        """Pair accuracy and score statistics on the eval set, sharded over the data ranks."""
        if self.eval_data is None:
            return {}
        mine, per_rank = self.eval_shard()
        bs = self.args.per_device_eval_batch_size
        better, worse = [np.zeros(0)], [np.zeros(0)]
        self.model.eval()
        for start in range(0, len(mine), bs):
            ids, mask, B = pair_inputs(self.collate(self.eval_data, mine[start:start + bs]))
            with self.precision.autocast():
                end = self.model(ids, mask).end_scores.squeeze(-1).astype("float32").numpy()
            better.append(end[:B])
            worse.append(end[B:])
        self.model.train()
        pairs = gather_shard_rows(np.stack([np.concatenate(better), np.concatenate(worse)], axis=1), per_rank)
        b, w = pairs[:, 0], pairs[:, 1]
        both = np.concatenate([b, w])
        return {"accuracy": float((b > w).mean()), "reward_mean": float(both.mean()), "reward_std": float(both.std()),
                "better_mean": float(b.mean()), "worse_mean": float(w.mean()), "pairs": int(len(b))}

    def before_save(self) -> None:
        unwrap(self.model).sync_normalizer_to_config()

    def extra_state(self) -> dict:
        return unwrap(self.model).normalizer.to_config()

    def restore_extra_state(self, state: dict) -> None:
        unwrap(self.model).normalizer = Normalizer.from_config(state)


def validate_reward_args(args: RewardArgs) -> None:
    if not args.model_name_or_path:
        raise UserError("'model_name_or_path' is empty: give the folder of the model to start from")
