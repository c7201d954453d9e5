"""DPO in every layout, through ``paddle.distributed.launch`` with two ranks (four for the
combinations with pipeline parallel): the same losses,
preference metrics and trained weights as one process on the same global batch (pipeline parallel
trains packed pairs; the one process trains two rows per pair, which give the same log-probs)."""

import pytest
from test_entrypoints import metrics, run
from trained_weights import assert_trained_weights_match

LR, STEPS = 1e-3, 4

LAYOUTS = {
    # name: (arguments, per-device batch giving the same global batch of 16 pairs on 2 ranks, one-process run)
    "data-parallel": ([], 8, "model"),
    "data-parallel-precompute": (["--reference_mode", "precompute"], 8, "model"),
    "sharding-stage1": (["--sharding_parallel_degree", "2", "--sharding", "stage1"], 8, "model"),
    "sharding-stage2-precompute": (["--sharding_parallel_degree", "2", "--sharding", "stage2",
                                    "--reference_mode", "precompute"], 8, "model"),
    "tensor-parallel": (["--tensor_parallel_degree", "2"], 16, "model"),
    "tensor-parallel-packed": (["--tensor_parallel_degree", "2", "--pack_pairs", "true"], 16, "model"),
    # pipeline: the whole global batch on the one data rank, 2 micro-batches through the 1F1B schedule
    "pipeline": (["--pipeline_parallel_degree", "2", "--gradient_accumulation_steps", "2"], 8, "model"),
    "pipeline-precompute": (["--pipeline_parallel_degree", "2", "--gradient_accumulation_steps", "2",
                             "--reference_mode", "precompute"], 8, "model"),
    # four ranks: pipeline with tensor parallel, and with sharding stage 1
    "tensor-x-pipeline": (["--tensor_parallel_degree", "2", "--pipeline_parallel_degree", "2",
                           "--gradient_accumulation_steps", "2"], 8, "model"),
    "pipeline-x-sharding-stage1": (["--pipeline_parallel_degree", "2", "--sharding_parallel_degree", "2",
                                    "--sharding", "stage1"], 8, "model"),
    "tensor-parallel-lora": (["--tensor_parallel_degree", "2", "--lora", "true", "--lora_rank", "4"], 16, "lora"),
}
ONE_PROCESS = {"model": [], "lora": ["--lora", "true", "--lora_rank", "4"]}


def common(tiny_dir):
    return ["config/tiny/dpo_argument.json", "--model_name_or_path", tiny_dir / "base", "--max_steps", str(STEPS),
            "--logging_steps", "1", "--eval_steps", str(STEPS), "--learning_rate", str(LR),
            "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--sft_loss_ratio", "0.3",
            "--eval_datasets", "tiny-preference/test:0.3"]


@pytest.fixture(scope="module")
def one_process(tiny_dir, tmp_path_factory):
    """The one-process runs the layouts are compared with (made on first use)."""
    made = {}

    def get(kind):
        if kind not in made:
            out = tmp_path_factory.mktemp(f"one-{kind}")
            run("dpo/run_dpo.py", *common(tiny_dir), "--output_dir", out, "--per_device_train_batch_size", "16",
                *ONE_PROCESS[kind])
            made[kind] = out
        return made[kind]

    return get


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dpo_two_ranks_match_one_process(tiny_dir, tmp_path, one_process, layout):
    args, per_device, kind = LAYOUTS[layout]
    one = one_process(kind)
    two = tmp_path / "two"
    ranks = 4 if "-x-" in layout else 2
    run("dpo/run_dpo.py", *common(tiny_dir), "--output_dir", two, "--per_device_train_batch_size", str(per_device),
        *ONE_PROCESS[kind], *args, nproc=ranks)
    a_rows, b_rows = metrics(one, "train"), metrics(two, "train")
    assert len(a_rows) == len(b_rows) == STEPS
    for a, b in zip(a_rows, b_rows):
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a, b)
        if abs(a["rewards/margins"]) > 1e-4:  # at the first step every pair is a tie, broken by rounding
            assert abs(a["rewards/accuracies"] - b["rewards/accuracies"]) < 1e-6, (a, b)
    ea, eb = metrics(one, "eval")[-1], metrics(two, "eval")[-1]
    assert ea["pairs"] == eb["pairs"] == 60
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert abs(ea[key] - eb[key]) < 1e-4 * max(1.0, abs(ea[key])), (key, ea, eb)
    assert_trained_weights_match(one, two, lr=LR, steps=STEPS)
