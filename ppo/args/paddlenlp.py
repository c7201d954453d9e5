"""PaddleNLP's argument keys that are not fields here: each honoured under this toolkit's name
or accepted with one notice line saying why it has no effect.  The one place the mapping lives."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ppo.core.errors import UserError

# PaddleNLP's keys that are not fields here
#
# From PaddleNLP's llm/config/{llama,qwen}/{ppo,rm,sft,dpo}_argument.json, llm/alignment/ppo/ppo_config.json
# and the TrainingArguments fields they set.  PaddleNLP keys that ARE fields here (recompute,
# critic_recompute, recompute_granularity, evaluation_strategy, save_strategy, do_train, do_eval,
# dataloader_drop_last, overwrite_output_dir, eval_mode, ...) are honoured as documented in their help.


@dataclass(frozen=True)
class Renamed:
    """A PaddleNLP key honoured under this toolkit's name for the same setting; ``form``: how its
    value is written there (``{}`` the value; a config file's relative path resolved first)."""
    field: str
    why: str = ""
    form: str = ""


@dataclass(frozen=True)
class NoEffect:
    """A PaddleNLP key accepted with one notice line: it has no effect here, for the reason given."""
    why: str


PADDLENLP_KEYS: dict = {
    "use_fusemt": Renamed("use_inference_model", "PaddleNLP's switch for rolling out with a separate inference "
                                                 "model (its fused GPU kernels where available)"),
    "max_dec_len": Renamed("max_new_tokens", "the maximum response length"),
    "rollout_n": Renamed("num_return_sequences", "responses sampled per prompt"),
    "dataset_name_or_path": Renamed("train_datasets", "the SFT training data (a registered NAME, or NAME::path)"),
    # PaddleNLP's DPO files (llm/config/*/dpo_argument.json)
    "train_dataset_path": Renamed("train_datasets", "the DPO training pairs: a file in PaddleNLP's DPO layout",
                                  "paddlenlp-dpo:1:{}"),
    "dev_dataset_path": Renamed("eval_datasets", "the DPO evaluation pairs: a file in PaddleNLP's DPO layout",
                                "paddlenlp-dpo:1:{}"),
    "max_seq_len": Renamed("max_length", "the maximum tokens of prompt + answer"),
    "max_prompt_len": NoEffect("prompts are not cut separately; max_length bounds prompt + answer (a pair whose "
                               "prompt alone fills it is skipped and counted)"),
    "flash_mask": NoEffect("a GPU attention kernel; attention runs paddlenlp's default kernel with a dense mask"),
    "greedy_zero_padding": NoEffect("batches are padded, not packed"),
    "benchmark": NoEffect("a PaddleNLP Trainer benchmarking switch"),
    "lazy": NoEffect("the data is read and tokenized whole at start-up"),
    "rslora_plus": NoEffect("LoRA here is plain LoRA (scale lora_alpha / lora_rank, one learning rate); "
                            "rsLoRA / LoRA+ are not implemented, so training differs from PaddleNLP's with it"),
    "fp16_opt_level": NoEffect("bf16/fp16 select autocast mixed precision with float32 master weights; "
                               "AMP levels are not selectable"),
    "use_flash_attention": NoEffect("flash attention is a GPU kernel this toolkit does not switch on; "
                                    "attention runs paddlenlp's default kernel"),
    "use_fused_head_and_loss_fn": NoEffect("a GPU fused kernel; log-probs come from the toolkit's own head and loss"),
    "fused_linear": NoEffect("a GPU fused kernel; projections run paddle's default matmul"),
    "tensor_parallel_output": NoEffect("tensor-parallel logits are gathered by the toolkit's own log-prob code"),
    "sequence_parallel": NoEffect("sequence parallel is not implemented; activations stay whole on each "
                                  "tensor-parallel rank"),
    "pipeline_parallel_config": NoEffect("fleet's pipeline options are set by the toolkit's pipeline schedule"),
    "recompute_use_reentrant": NoEffect("recompute uses paddle's default recompute implementation"),
    "release_grads": NoEffect("gradients are already released after every optimizer step"),
    "min_dec_len": NoEffect("there is no minimum response length: a response ends at its first EOS"),
    "min_learning_rate": NoEffect("the linear and cosine schedules decay to 0"),
    "critic_min_learning_rate": NoEffect("the linear and cosine schedules decay to 0"),
    "logging_dir": NoEffect("metrics go to output_dir (metrics.jsonl and the VisualDL log)"),
    "autotuner_benchmark": NoEffect("a PaddleNLP Trainer benchmarking switch"),
    "skip_profile_timer": NoEffect("a PaddleNLP Trainer profiling switch; phase timings are always logged"),
    "eval_accumulation_steps": NoEffect("evaluation metrics are always accumulated over the whole eval set"),
    "load_best_model_at_end": NoEffect("the final model is always the last step's"),
    "metric_for_best_model": NoEffect("the final model is always the last step's (no best-model selection)"),
    "unified_checkpoint": NoEffect("final models are always written whole (loadable at any parallel degree), "
                                   "the form unified_checkpoint gives"),
    "src_length": NoEffect("prompts are not cut separately; max_length bounds prompt + answer"),
    "eval_with_do_generation": NoEffect("SFT evaluation reports the answer loss, without generating"),
    "zero_padding": NoEffect("batches are padded, not packed"),
}

_noticed: set = set()


def _notice(key: str, why: str) -> None:
    """One line per key and process, on stderr (PaddleNLP files carry many such keys)."""
    if key not in _noticed:
        _noticed.add(key)
        print(f"notice: argument '{key}' (PaddleNLP) has no effect here: {why}", file=sys.stderr, flush=True)


def map_paddlenlp_keys(values: dict, sources: dict, known) -> None:
    """Rename PaddleNLP's keys to their fields here and drop (with a notice) those without effect."""
    for key in [k for k in values if k not in known and k in PADDLENLP_KEYS]:
        entry = PADDLENLP_KEYS[key]
        value, source = values.pop(key), sources.pop(key)
        if isinstance(entry, NoEffect):
            _notice(key, entry.why)
        elif entry.field in known:
            if entry.field in values and values[entry.field] != value:
                raise UserError(f"{source}: '{key}' is PaddleNLP's name of '{entry.field}', which "
                                f"{sources[entry.field]} sets to a different value: give only one of them")
            if entry.form and isinstance(value, str) and value:
                value = entry.form.format(value)
            values.setdefault(entry.field, value)
            sources.setdefault(entry.field, f"{source} (as '{key}')")
        else:  # a PaddleNLP key of another stage (use_fusemt in an SFT file) stays unknown
            values[key], sources[key] = value, source
