"""The DPO stage's arguments (``dpo/run_dpo.py``): DPO and its family of offline preference losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ppo.args.common import DataArgs, ParallelArgs, TrainingArgs, arg, require, validate_shared
from ppo.core.errors import UserError, closest
from ppo.core.preference import LOSS_TYPES, REFERENCE_FREE, UNPAIRED

REFERENCE_MODES = ("", "model", "lora", "precompute", "none")


@dataclass
class DPOArgs(TrainingArgs, ParallelArgs, DataArgs):
    model_name_or_path: str = arg("", "Policy to start from (usually the SFT model; paddlenlp or Hugging Face folder).",
                                  path="path")
    ref_model_name_or_path: str = arg("", "Reference model folder (default: model_name_or_path, the usual choice).",
                                      path="path")
    loss_type: str = arg("sigmoid", "Preference loss, or several comma-separated to combine with loss_weights: "
                                    "sigmoid (DPO), ipo, hinge, simpo, orpo (reference-free), kto (unpaired data: "
                                    "prompt/completion/label).")
    loss_weights: str = arg("", "Comma-separated weights of the loss_type entries (default: 1 each).")
    beta: float = arg(0.1, "beta of the losses: the strength of the pull towards the reference (tau in IPO; "
                           "SimPO's reward scale).", gt=0)
    label_smoothing: float = arg(0.0, "Conservative DPO's eps: the assumed share of flipped preference labels "
                                      "(sigmoid loss).", ge=0, lt=0.5)
    simpo_gamma: float = arg(0.5, "SimPO's target reward margin gamma.", ge=0)
    orpo_lambda: float = arg(0.1, "ORPO's weight lambda of the odds-ratio term beside the chosen answer's NLL "
                                  "(the paper's 0.1; PaddleNLP weighs it by pref_loss_ratio, default 1).", gt=0)
    kto_desirable_weight: float = arg(1.0, "KTO's weight of desirable completions (lambda_D).", gt=0)
    kto_undesirable_weight: float = arg(1.0, "KTO's weight of undesirable completions (lambda_U).", gt=0)
    pref_loss_ratio: float = arg(1.0, "Weight of the preference loss (PaddleNLP's name).", ge=0)
    sft_loss_ratio: float = arg(0.0, "Weight of an added NLL term on the chosen answer (per-token mean per pair), "
                                     "for every loss type.", ge=0)
    reference_mode: str = arg("", "Where reference log-probs come from: model (a separate frozen copy), lora (the "
                                  "policy with its adapters off; needs lora), precompute (one pass before training, "
                                  "stored in output_dir and reused on resume), none (reference-free). Default: lora "
                                  "with lora, none for reference-free losses, else model.", REFERENCE_MODES)
    reference_free: bool = arg(False, "PaddleNLP's switch: reference log-probs are 0 (same as reference_mode none).")
    pack_pairs: bool = arg(False, "Pack each pair into one row (prompt once, the rejected answer's positions "
                                  "restarting after it and its tokens kept from attending to the chosen ones) "
                                  "instead of two rows; docs/dpo.md has the measured speed of both.")
    # online (iterative) DPO
    online_rounds: int = arg(0, "Online DPO: rounds of sampling from the current policy, ranking the responses and "
                                "a DPO round on best-vs-worst pairs (0: offline DPO on train_datasets).", ge=0)
    online_prompts: str = arg("", "Online DPO's prompts, NAME[:proportion[:path]] (default: train_datasets' prompts).",
                              path="datasets")
    online_prompts_per_round: int = arg(128, "Prompts sampled per online round.", ge=1)
    online_samples: int = arg(4, "Responses sampled per prompt in an online round (best and worst make its pair).",
                              ge=2)
    online_reward_model_name_or_path: str = arg("", "Reward model that ranks online responses.", path="path")
    online_reward_model_weight: float = arg(1.0, "Weight of the reward model's score in the online ranking.", ge=0)
    online_reward_functions: str = arg("", "Reward functions added to the online ranking, NAME[:weight] "
                                           "(the functions PPO uses, e.g. tiny_guard:4).")
    max_new_tokens: int = arg(32, "Online DPO: the longest sampled response.", ge=1)
    temperature: float = arg(1.0, "Online DPO: sampling temperature.", gt=0)
    top_p: float = arg(1.0, "Online DPO: nucleus sampling threshold.", gt=0, le=1)
    offload_reference: bool = arg(False, "Keep the separate reference model in host memory between its forwards "
                                         "(GPU builds; a no-op on CPU).")

    # -- derived ---------------------------------------------------------------------------------

    def loss_terms(self) -> list[tuple[str, float]]:
        """``[(loss type, weight)]`` from ``loss_type`` and ``loss_weights`` (checked by ``validate``)."""
        names = [n.strip() for n in self.loss_type.split(",") if n.strip()]
        weights = [float(w) for w in self.loss_weights.split(",")] if self.loss_weights.strip() else [1.0] * len(names)
        return list(zip(names, weights))

    def unpaired(self) -> bool:
        return any(name in UNPAIRED for name, _ in self.loss_terms())

    def resolved_reference_mode(self) -> str:
        if self.reference_free or all(name in REFERENCE_FREE for name, _ in self.loss_terms()):
            return "none"
        if self.reference_mode:
            return self.reference_mode
        return "lora" if self.lora else "model"

    def validate(self) -> None:
        validate_shared(self)
        names = [n.strip() for n in self.loss_type.split(",")]
        require(bool(self.loss_type.strip()) and all(names),
                f"'loss_type' = {self.loss_type!r} must name one or more comma-separated losses of "
                f"{', '.join(LOSS_TYPES)}")
        for name in names:
            if name not in LOSS_TYPES:
                raise UserError(f"'loss_type' names unknown loss '{name}'{closest(name, LOSS_TYPES)}; accepted: "
                                f"{', '.join(LOSS_TYPES)} (comma-separated to combine)")
        require(len(set(names)) == len(names), f"'loss_type' = {self.loss_type!r} names a loss twice")
        if self.loss_weights.strip():
            parts = [w.strip() for w in self.loss_weights.split(",")]
            try:
                weights = [float(w) for w in parts]
            except ValueError:
                raise UserError(f"'loss_weights' = {self.loss_weights!r} must be comma-separated numbers, one per "
                                "loss_type entry") from None
            require(len(weights) == len(names), f"'loss_weights' gives {len(weights)} weights for the "
                                                f"{len(names)} losses of loss_type {self.loss_type!r}")
            require(all(math.isfinite(w) and w >= 0 for w in weights),
                    f"'loss_weights' = {self.loss_weights!r} must be finite numbers >= 0")
            require(sum(weights) > 0, f"'loss_weights' = {self.loss_weights!r}: at least one weight must be > 0")
        if any(n in UNPAIRED for n in names):
            require(len(names) == 1, f"'loss_type' = {self.loss_type!r}: kto reads unpaired data and cannot be "
                                     "combined with the paired losses")
        mode = self.resolved_reference_mode()
        if mode == "lora":
            require(self.lora, "'reference_mode' is 'lora' (the policy with its adapters off), which needs lora "
                               "true; use 'model' or 'precompute' for a full fine-tune")
        if mode == "precompute":
            require(not self.unpaired(), "'reference_mode' 'precompute' covers paired data; kto computes its "
                                         "reference online (mode 'model' or 'lora')")
        if self.online_rounds:
            require(bool(self.online_reward_model_name_or_path or self.online_reward_functions),
                    "'online_rounds' > 0 needs a ranking: give online_reward_model_name_or_path and/or "
                    "online_reward_functions")
            require(not self.unpaired(), "'online_rounds' builds pairs: use a paired loss_type, not kto")
            require(self.max_new_tokens < self.max_length,
                    f"'max_new_tokens' ({self.max_new_tokens}) must be < 'max_length' ({self.max_length}): the "
                    "prompt needs room")
        require(not (self.pack_pairs and self.unpaired()), "'pack_pairs' packs pairs: kto's data is unpaired")
        if self.pipeline_parallel_degree > 1:
            require(not self.unpaired(), "'pipeline_parallel_degree' > 1 trains packed pairs; kto's unpaired "
                                         "completions train under tensor parallel, sharding or data parallel")
