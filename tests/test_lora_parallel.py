"""LoRA PPO (actor and critic adapters) under tensor parallel 2 equals one process, and resumes.

paddlenlp's ``ColumnParallelLoRALinear`` / ``RowParallelLoRALinear`` split B (column-parallel
layers) or A (row-parallel layers) like their layer's weight.  Both runs start from the same
adapters (``apply_lora`` draws A whole and cuts this rank's rows) and see the same prompts, decoded
greedily (the launch helpers, arguments and tolerances of ``test_ppo_parallel.py``: 1e-4 on
losses, rewards and weights, 2e-3 relative on gradient norms).  Checked: every step's metrics, the
eval generations, the merged final models and their ``lora/`` adapters (gathered from the shards),
the step-2 checkpoint (adapters gathered too); resuming that checkpoint under tensor parallel 2
repeats the straight run bitwise (the adapters cut back into shards on load); rollout on merged
whole copies (``eval_mode single``, every offload level) equals one process too.
"""

import os

import numpy as np
import pytest

from trained_weights import assert_trained_weights_match
from test_ppo_parallel import LR, OPTIMIZER_STEPS, STEPS, assert_same_eval, assert_same_steps, assert_same_weights, ppo, train_metrics
from test_resume import assert_bitwise_equal, weights

LORA = ["--lora", "true", "--lora_rank", "4", "--critic_lora", "true", "--save_steps", "2"]
TP2 = ["--tensor_parallel_degree", "2"]
ADAPTERS = os.path.join("lora", "peft_model.safetensors")


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_ppo_under_tensor_parallel_matches_one_process_and_resumes(tiny_dir, tmp_path):
    one_dir, tp_dir = tmp_path / "one", tmp_path / "tp2"
    one = ppo(tiny_dir, one_dir, 8, *LORA)
    tp = ppo(tiny_dir, tp_dir, 8, *TP2, *LORA, nproc=2)
    assert_same_steps(one, tp)
    assert_same_eval(one_dir, tp_dir)
    base = weights(tiny_dir / "base")
    for sub in ("policy", "value"):
        # whole models: merged W + s A B (no adapter keys), the adapters beside them, and the
        # step-2 checkpoint with base weights and adapters
        assert not [k for k in weights(tp_dir / sub) if "lora" in k]
        assert_same_weights(one_dir / sub, tp_dir / sub)
        a, b = weights(one_dir / sub / ADAPTERS), weights(tp_dir / sub / ADAPTERS)
        assert a.keys() == b.keys() and len(a) == 2 * 2 * 7  # A and B of 7 projections in 2 layers
        assert_trained_weights_match(a, b, lr=LR, steps=OPTIMIZER_STEPS)
        assert [k for k in weights(tp_dir / "checkpoint-2" / sub) if ".lora_" in k]
        assert_same_weights(one_dir / "checkpoint-2" / sub, tp_dir / "checkpoint-2" / sub)
    # the adapters moved the policy by far more than the tolerance
    final = weights(one_dir / "policy")
    assert max(float(np.abs(final[k] - base[k]).max()) for k in base) > 1e-3

    # resume from the tensor-parallel checkpoint: the last step again, bitwise
    resumed_dir = tmp_path / "resumed"
    resumed = ppo(tiny_dir, resumed_dir, 8, *TP2, *LORA, "--resume_from_checkpoint", str(tp_dir / "checkpoint-2"),
                  nproc=2)
    assert [r["step"] for r in resumed] == [STEPS]
    assert without_times(resumed) == without_times(tp[-1:])
    for sub in ("policy", "value"):
        for name in ("model.safetensors", ADAPTERS):
            assert_bitwise_equal(weights(tp_dir / sub / name), weights(resumed_dir / sub / name))

    # rollout on whole copies: the merged W + s A B exported from the shards, the reference a
    # whole base model
    copies_dir = tmp_path / "single-rollout"
    copies = ppo(tiny_dir, copies_dir, 8, *TP2, *LORA, "--eval_mode", "single", "--offload_level",
                 "freeze_model optimizer train_model", nproc=2)
    assert_same_steps(one, copies)
    assert_same_eval(one_dir, copies_dir)
    for sub in ("policy", "value"):
        assert_same_weights(one_dir / sub, copies_dir / sub)
