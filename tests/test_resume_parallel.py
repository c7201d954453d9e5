"""Exact resume with two ranks (real ``paddle.distributed.launch``): k steps + resume to N equals N
steps straight, for the reward model under sharding stage 1 and stage 2 (optimizer state split over
ranks), SFT
under data parallel and PPO under tensor parallel and under pipeline parallel with sampled
responses, a ptx loss and an adaptive KL coefficient (random state of every rank restored).

The comparison is bitwise: a resumed run repeats the same operations in the same order on the same
layout (gloo's reductions are deterministic), so nothing may differ, not even in the last bit.
"""

import os

import pytest

from test_entrypoints import run
from test_resume import assert_bitwise_equal, assert_same_metrics, train_metrics, weights

STAGES = {
    # stage: (script, config, model argument, layout, extra arguments, saved model folders)
    "reward-sharding-stage1": ("rm/run_reward.py", "config/tiny/rm_argument.json", "--model_name_or_path",
                               ["--sharding_parallel_degree", "2", "--sharding", "stage1"],
                               ["--per_device_train_batch_size", "8", "--eval_datasets", ""], [""]),
    "reward-sharding-stage2": ("rm/run_reward.py", "config/tiny/rm_argument.json", "--model_name_or_path",
                               ["--sharding_parallel_degree", "2", "--sharding", "stage2"],
                               ["--per_device_train_batch_size", "8", "--eval_datasets", ""], [""]),
    "sft-data-parallel": ("ppo/run_sft.py", "config/tiny/sft_argument.json", "--model_name_or_path", [],
                          ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                           "--eval_split_ratio", "0"], [""]),
    "ppo-tensor-parallel": ("ppo/run_ppo.py", "config/tiny/ppo_argument.json", "--actor_model_name_or_path",
                            ["--tensor_parallel_degree", "2"],
                            ["--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "2",
                             "--max_new_tokens", "6", "--eval_datasets", "", "--eval_steps", "0",
                             "--ptx_datasets", "tiny-sft", "--ptx_coeff", "0.3", "--adaptive_kl", "true"],
                            ["policy", "value"]),
    "ppo-pipeline-parallel": ("ppo/run_ppo.py", "config/tiny/ppo_argument.json", "--actor_model_name_or_path",
                              ["--pipeline_parallel_degree", "2"],
                              ["--per_device_prompt_batch_size", "4", "--per_device_train_batch_size", "1",
                               "--gradient_accumulation_steps", "2", "--max_new_tokens", "6",
                               "--eval_datasets", "", "--eval_steps", "0", "--ptx_datasets", "tiny-sft",
                               "--ptx_coeff", "0.3", "--adaptive_kl", "true"],
                              ["policy", "value"]),
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", list(STAGES))
def test_two_rank_resume_is_exact(stage, tiny_dir, tmp_path):
    script, config, model_arg, layout, extra, subs = STAGES[stage]
    base = str(tiny_dir / "base")
    common = [config, model_arg, base, "--max_steps", "4", "--logging_steps", "1", "--learning_rate", "0.001",
              "--seed", "3", *layout, *extra]
    if stage.startswith("ppo"):
        common += ["--reward_model_name_or_path", str(tiny_dir / "score"), "--critic_learning_rate", "0.001"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(script, *common, "--output_dir", straight, "--save_steps", "2", nproc=2)
    checkpoint = straight / "checkpoint-2"
    assert (checkpoint / "manifest.json").is_file()
    assert sorted(p for p in os.listdir(checkpoint) if p.startswith("rng.rank")) == ["rng.rank0.json", "rng.rank1.json"]
    run(script, *common, "--output_dir", resumed, "--resume_from_checkpoint", checkpoint, nproc=2)
    for sub in subs:
        assert_bitwise_equal(weights(straight / sub),
                             weights(resumed / sub))
    a, b = train_metrics(straight), train_metrics(resumed)
    assert sorted(b) == [3, 4]
    assert_same_metrics(a, b, [3, 4])
    # training moved the model between the checkpoint and the end
    start = weights(checkpoint / subs[0])
    end = weights(straight / subs[0])
    assert max(float(abs(end[k] - start[k]).max()) for k in end) > 1e-4
