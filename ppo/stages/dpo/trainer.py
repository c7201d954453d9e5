"""DPO and its family: preference pairs (or KTO's unpaired completions) -> aligned policy, with no
reward model and no rollout.

Per micro-batch: both answers of every pair in one ``[2B, T]`` forward of the policy, their summed
answer log-probs, the reference's (``reference.Reference``: a frozen copy, the policy with its
adapters off, a precomputed table, or none), and the loss of ``objective.paired_loss``.  The
shared loop (``ppo.stages.single_model.SingleModelTrainer``) does accumulation, clipping, the
optimizer step, logging, evaluation, checkpoints, resume and the graceful stop.
"""

from __future__ import annotations

import logging

import numpy as np
import paddle

from ppo.args.dpo import DPOArgs
from ppo.core.errors import UserError
from ppo.data.preference import PairDataset, UnpairedDataset
from ppo.distributed import parallel, pipeline
from ppo.distributed.parallel import unwrap
from ppo.models import check_model_path, check_weights_present, freeze, load_causal_lm
from ppo.data import import_user_modules
from ppo.models.loading import check_causal_lm_role, check_family, check_reward_role
from ppo.rewards import build_reward_functions
from ppo.models.lora import AdaptersOff, apply_lora
from ppo.models.recompute import enable_recompute
from ppo.stages.dpo import reference as ref
from ppo.stages.dpo.objective import PairLogProbs, paired_loss, unpaired_loss
from ppo.stages.dpo.pipelined import pipeline_pair_step, refresh_copy
from ppo.stages.single_model import SingleModelTrainer, gather_shard_rows

logger = logging.getLogger("ppo")


def check_dpo_models(args: DPOArgs) -> None:
    """Before any work: the policy, and the reference a run reads, are causal LMs the toolkit runs,
    with one vocabulary (UserError, one line)."""
    policy = check_model_path(args.model_name_or_path)
    check_causal_lm_role(policy, args.model_name_or_path, "model_name_or_path")
    check_family(policy, args.model_name_or_path, "model_name_or_path")
    if args.ref_model_name_or_path and args.resolved_reference_mode() in ("model", "precompute"):
        what, path = "ref_model_name_or_path", args.ref_model_name_or_path
        saved = check_model_path(path, what)
        check_weights_present(path, what)
        check_causal_lm_role(saved, path, what)
        check_family(saved, path, what)
        if saved.get("vocab_size") != policy.get("vocab_size"):
            raise UserError(f"'{what}' = '{path}' has vocab_size {saved.get('vocab_size')} and the policy "
                            f"'{args.model_name_or_path}' {policy.get('vocab_size')}: the reference must share the "
                            "policy's vocabulary")
    if args.online_rounds:
        if args.extra_modules:
            import_user_modules([m for m in args.extra_modules.split(",") if m])
        build_reward_functions(args.online_reward_functions, vars(args))  # unknown names: one line now
        if args.online_reward_model_name_or_path:
            what, path = "online_reward_model_name_or_path", args.online_reward_model_name_or_path
            check_reward_role(check_model_path(path, what), path, what)


class DPOTrainer(SingleModelTrainer):
    stage = "dpo"

    def __init__(self, args: DPOArgs):
        self.unpaired = args.unpaired()
        self.kl = 0.0  # KTO's KL estimate of the current step
        self.pipeline = args.pipeline_parallel_degree > 1
        if self.pipeline and not args.pack_pairs:
            logger.info("dpo: pipeline parallel packs each pair into one row (pack_pairs)")
            args.pack_pairs = True
        tokenizer, train_data, eval_data = self.begin(args, UnpairedDataset if self.unpaired else PairDataset,
                                                      pipeline=self.pipeline)
        for data in (train_data, eval_data):
            if data is not None and not self.unpaired:
                getattr(data, "dataset", data).packed = args.pack_pairs  # one row per pair, or two
        # tensor parallel: gathered (full-vocabulary) logits feed the log-probs
        model = load_causal_lm(args.model_name_or_path, **parallel.tp_kwargs(), tensor_parallel_output=False)
        if args.lora:
            apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_target_modules, seed=args.seed)
        if args.recompute:
            enable_recompute(model, args.recompute_granularity)
        mode = args.resolved_reference_mode()
        self.ref_path = args.ref_model_name_or_path or args.model_name_or_path
        reference_model = None
        if mode == "model":
            reference_model = self.load_reference()
        elif mode == "lora":
            reference_model = AdaptersOff(model)  # the base weights the adapters sit on: no second copy
        trained, self.eval_copy = model, None
        if self.pipeline:  # this rank's stage trains; the whole model stays as the copy that evaluates
            pipeline.check_pipeline_config(model.config, "model_name_or_path", args.model_name_or_path)
            trained, self.eval_copy = pipeline.policy_pipe(model), freeze(model)
        self.setup(args, trained, tokenizer, train_data, eval_data)
        table = self.precomputed_table() if mode == "precompute" else None
        self.reference = ref.Reference(mode, reference_model, table, offload=args.offload_reference)
        logger.info("dpo: loss %s, reference %s", args.loss_type, mode)

    def load_reference(self):
        check_model_path(self.ref_path, "ref_model_name_or_path")
        return freeze(load_causal_lm(self.ref_path, "ref_model_name_or_path", **parallel.tp_kwargs(),
                                     tensor_parallel_output=False))

    # -- precomputed reference log-probs -----------------------------------------------------------

    def precomputed_table(self) -> dict:
        """The stored table of this run's data, tokenizer and reference, or one computed now."""
        args, ctx = self.args, self.ctx
        datasets = {"train": self.train_data, "eval": self.eval_data}
        check_model_path(self.ref_path, "ref_model_name_or_path")
        fingerprint = {"data": ref.data_fingerprint(datasets), "tokenizer": ref.tokenizer_fingerprint(self.tokenizer),
                       "reference": ref.model_fingerprint(self.ref_path)}
        table, message = None, None
        if ctx.is_main:
            try:
                table = ref.load_table(args.output_dir, fingerprint)
            except UserError as e:
                message = str(e)
        table, message = parallel.from_main((table, message))
        if message is not None:
            raise UserError(message)
        if table is not None:
            logger.info("dpo: reference log-probs read from %s", args.output_dir)
            return table
        # a fresh run whose reference is its own starting point scores with the policy itself
        own = self.start_step == 0 and self.ref_path == args.model_name_or_path
        model = (AdaptersOff(unwrap(self.model)) if args.lora else self.scorer()) if own else self.load_reference()
        table = ref.compute_table(model, datasets, args.per_device_eval_batch_size, self.precision, args.disable_tqdm)
        self.model.train()
        if ctx.is_main:
            ref.save_table(args.output_dir, table, fingerprint)
        parallel.barrier()
        return table

    # -- the loss ---------------------------------------------------------------------------------

    def scorer(self):
        """The model whose forward gives the policy's log-probs outside training: the model itself, or
        under pipeline parallel its whole copy (refreshed before every evaluation)."""
        return self.eval_copy if self.pipeline else unwrap(self.model)

    def accumulate(self, batches: list, weights: list) -> list[dict]:
        if self.pipeline:
            return pipeline_pair_step(self, batches, weights)
        return super().accumulate(batches, weights)

    def collate(self, dataset, indices):
        batch = super().collate(dataset, indices)
        batch["index"] = paddle.to_tensor(np.asarray(indices, dtype=np.int64))  # rows of a precomputed table
        return batch

    def prepare_step(self, batches: list) -> None:
        """KTO: the step's KL estimate, the mean log-ratio of the policy to the reference on the
        mismatched prompt-completion rows of every micro-batch and data rank (no gradient)."""
        if not self.unpaired:
            return
        total, rows = 0.0, 0
        with paddle.no_grad():
            for b in batches:
                inputs = (b["kl_input_ids"], b["kl_attention_mask"], b["kl_answer_mask"])
                with self.precision.autocast():
                    policy, _ = ref.answer_log_probs(self.model, *inputs)
                total += float((policy - self.unpaired_reference(inputs)).sum())
                rows += policy.shape[0]
        self.kl = parallel.sum_over_data(total) / parallel.sum_over_data(float(rows))

    def unpaired_reference(self, inputs) -> paddle.Tensor:
        if self.reference.mode == "none":
            return paddle.zeros([inputs[0].shape[0]], dtype="float32")
        return self.reference.completions(lambda m: ref.answer_log_probs(m, *inputs), self.precision)[0]

    def log_probs(self, batch, split: str):
        """The micro-batch's policy and reference log-probs (``PairLogProbs``, or KTO's tuple)."""
        if self.unpaired:
            inputs = (batch["input_ids"], batch["attention_mask"], batch["answer_mask"])
            with self.precision.autocast():
                policy, tokens = ref.answer_log_probs(self.model, *inputs)
            return policy, self.unpaired_reference(inputs), tokens
        with self.precision.autocast():
            pc, pr, nc, nr = ref.pair_log_probs(self.model if split == "train" else self.scorer(), batch)
        rc, rr = self.reference.pairs(batch, split, self.precision)
        return PairLogProbs(pc, pr, nc, nr, rc, rr)

    def compute_loss(self, batch):
        lp = self.log_probs(batch, "train")
        if self.unpaired:
            policy, reference, tokens = lp
            return unpaired_loss(policy, reference, tokens, batch["desirable"], self.kl, self.args)
        return paired_loss(lp, self.args)

    # -- evaluation -------------------------------------------------------------------------------

    @paddle.no_grad()
    def evaluate(self) -> dict:
        """The loss and preference metrics over the whole eval set (every data rank's share)."""
        if self.eval_data is None:
            return {}
        mine, per_rank = self.eval_shard()
        bs = self.args.per_device_eval_batch_size
        columns = []
        if self.pipeline:
            refresh_copy(self)
        self.model.eval()
        for start in range(0, len(mine), bs):
            batch = self.collate(self.eval_data, mine[start:start + bs])
            lp = self.log_probs(batch, "eval")
            if self.unpaired:
                parts = list(lp) + [batch["desirable"].astype("float32")]
            else:
                parts = [lp.policy_chosen, lp.policy_rejected, lp.chosen_tokens, lp.rejected_tokens, lp.ref_chosen,
                         lp.ref_rejected]
            columns.append(np.stack([p.astype("float32").numpy().astype(np.float64) for p in parts], axis=1))
        self.model.train()
        width = 4 if self.unpaired else 6
        rows = gather_shard_rows(np.concatenate(columns) if columns else np.zeros((0, width)), per_rank)
        t = [paddle.to_tensor(rows[:, k].astype(np.float32)) for k in range(width)]
        if self.unpaired:
            loss, stats = unpaired_loss(t[0], t[1], t[2], t[3] > 0.5, self.kl, self.args)
        else:
            loss, stats = paired_loss(PairLogProbs(*t), self.args)
        return {"loss": float(loss), **stats, ("completions" if self.unpaired else "pairs"): int(len(rows))}
