"""Resource pools (``resource_pools``): the reference, the reward model, the critic and the rollout on
ranks of their own equal the colocated run, and every impossible plan is one line before any model
loads.

The pooled runs use the settings of ``tests/test_ppo_parallel.py`` (greedy responses, a global
batch of 8 prompts, 3 iterations of 2 optimizer steps), so they compare with the same
single-process run, by the same tolerances: the pooled reference and reward model are whole
models on one rank where the colocated tensor-parallel run splits them (sums in another order,
about 1e-7 relative), and one wrong row or missing score moves these numbers by 1e-2 or more.
"""

import os

import numpy as np
import pytest

from ppo.core.errors import UserError
from ppo.core.placement import canonical_pools, parse_pools, plan_pools
from ppo.distributed.transfer import send_arrays
from ppo.stages.ppo.pools import weight_array
from ppo.storage.checkpoint import canonical_or_text
from ppo.storage.checkpoint import list_checkpoints
from test_entrypoints import run
from test_graceful_stop import ppo_cmd, resume_and_compare, start_run, straight_run  # noqa: F401 (a fixture)
from test_ppo_parallel import STEPS, assert_same_eval, assert_same_steps, assert_same_weights, ppo

# ----------------------------------------------------------------------------------- the plan


def plan(text, world, divisor=1, **kw):
    def data_world(n):
        if n % divisor:
            raise UserError(f"degrees ({divisor}) do not divide {n}")
        return n // divisor

    options = dict(pipeline=False, merged_rollout=False, has_reward_model=True)
    options.update(kw)
    return plan_pools(text, world, data_world, **options)


def test_a_plan_places_the_pools_in_order_from_rank_0():
    p = plan("actor:2,reference:1,reward:1", 4, divisor=2)
    assert [(q.roles, q.ranks) for q in p.pools] == [(("actor",), [0, 1]), (("reference",), [2]), (("reward",), [3])]
    assert p.remote_roles() == ("reference", "reward")
    assert p.pool_of_rank(0) is p.actor and p.pool_of_rank(3).name == "reward"
    shared = plan("actor+critic:2,reference+reward:2", 4)  # data parallel 2: a replica per data rank
    assert shared.pool_of_rank(3).roles == ("reference", "reward") and shared.pool_of_rank(2).ranks == [2, 3]
    assert plan("", 4) is None
    assert p.critic is None
    five = plan("actor:2,critic:1,reference:1,reward:1", 5, divisor=2)  # the critic on a rank of its own
    assert five.critic.ranks == [2] and five.remote_roles() == ("critic", "reference", "reward")
    assert plan("actor:2,critic+reward:2", 4).critic.roles == ("critic", "reward")
    rolled = plan("actor:2,rollout+reference:1", 3, divisor=2)
    assert rolled.rollout.ranks == [2] and rolled.critic is None and plan("actor+rollout:2,reward:2", 4).rollout is None


@pytest.mark.parametrize("text, world, kw, words", [
    ("actor:2,reference:1", 4, {}, "places 3 ranks but the launch has 4"),
    ("actor:2,reference:1,reward:2", 4, {}, "places 5 ranks"),
    ("actor:4", 4, {}, "names only the actor's pool"),
    ("actor:3,reference:1", 4, {"divisor": 2}, "do not divide 3"),
    ("actor:2,reward:2", 4, {"divisor": 2}, "one rank per data rank"),   # TP2: one data rank
    ("actor:2,reward:1", 3, {}, "one rank per data rank"),                # DP2: two data ranks
    ("actor:1,reward:1", 2, {"has_reward_model": False}, "reward_model_name_or_path is empty"),
    ("actor:1,reference:1", 2, {"pipeline": True}, "no pipeline_parallel_degree"),
    ("actor:1,reference:1", 2, {"merged_rollout": True}, "eval_mode 'single'"),
    ("actor:1,critic:1", 2, {"uses_critic": False}, "only adv_estimator 'gae' trains a critic"),
    ("actor:2,critic:1", 3, {}, "one rank per data rank"),               # DP2: a critic rank per data rank
    ("actor:2,rollout:1", 3, {}, "one rank per data rank"),
    ("actor:1,rollout:1", 2, {"pipeline": True}, "no pipeline_parallel_degree"),
])
def test_impossible_plans_are_one_line(text, world, kw, words):
    with pytest.raises(UserError, match=words) as e:
        plan(text, world, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, words", [
    ("actor", "must be ROLE"), ("actor:", "must be ROLE"), ("actor:two", "whole number"), ("actor:0", ">= 1"),
    ("actor:1,refrence:1", "unknown role 'refrence'.*reference"), ("actor:1,reward:1,reward:1", "named twice"),
    ("reward:1,actor:1", "first pool must hold the actor"),
    ("actor+reward+reward:2", "named twice"), ("actor:1,,critic:1", "empty entry"),
    ("actor:1,critic:1,", "empty entry"), ("actor:1,critic:+1", "whole number"),
    ("actor:1,critic:1_0", "whole number"), ("actor:1,critic:\uff11", "whole number"),
])
def test_malformed_pools_are_one_line(text, words):
    with pytest.raises(UserError, match=words) as e:
        parse_pools(text)
    assert "\n" not in str(e.value)


def test_pools_are_recorded_one_way():
    """A checkpoint records the layout, not its spelling: a resume with spaces or the roles of a
    pool in another order is the same layout (a checkpoint of an earlier version kept the spelling)."""
    assert canonical_pools(" actor:1, rollout + critic : 1") == canonical_pools("actor:1,critic+rollout:1") \
        == "actor:1,critic+rollout:1"
    assert canonical_pools("") == ""
    assert canonical_or_text("actor:1, rollout+critic:1") == "actor:1,critic+rollout:1"
    assert canonical_or_text("not pools") == "not pools"


def test_weights_go_to_the_rollout_pool_as_float32_exactly():
    """bf16 (numpy holds its bits as uint16) and fp16 weights widen to float32 without rounding;
    any rank flattens (the rollout's copy has the shapes)."""
    import paddle

    values = np.array([[1.0, -2.5, 0.15625], [3.0e-3, 65504.0, -0.0]], dtype=np.float32)
    bf16 = paddle.to_tensor(values).astype("bfloat16")
    assert bf16.numpy().dtype == np.uint16
    np.testing.assert_array_equal(weight_array(bf16.numpy()), bf16.astype("float32").numpy().reshape(-1))
    half = values.astype(np.float16)
    np.testing.assert_array_equal(weight_array(half), half.astype(np.float32).reshape(-1))
    assert weight_array(np.zeros([2, 3, 4], np.float32)).shape == (24,)
    with pytest.raises(ValueError, match="rank <= 2"):
        send_arrays([np.zeros([2, 2, 2], np.float32)], dst=0, group=None)
    with pytest.raises(ValueError, match="int64 / float32 / float64"):
        send_arrays([np.zeros([2], np.float16)], dst=0, group=None)


@pytest.mark.distributed
def test_a_bad_plan_stops_every_rank_with_one_line_before_loading(tiny_dir, tmp_path):
    out = tmp_path / "bad"
    proc = run("ppo/run_ppo.py", "config/tiny/ppo_argument.json", "--actor_model_name_or_path", tiny_dir / "base",
               "--reward_model_name_or_path", tiny_dir / "score", "--output_dir", out, "--max_steps", "1",
               "--resource_pools", "actor:1,reward:2", nproc=2, check=False)
    assert proc.returncode != 0
    logs = "".join(open(os.path.join(out, "launch-logs", f)).read()
                   for f in os.listdir(os.path.join(out, "launch-logs")) if f.startswith("workerlog"))
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("places 3 ranks but the launch has 2" in e for e in errors), logs[-2000:]
    assert "Traceback" not in logs
    assert not os.path.exists(out / "policy")


# ------------------------------------------------------------------------ equal to colocated


# log-probs at a temperature other than 1: a pool that ignored it would score other numbers
TEMPERATURE = ["--temperature", "0.8"]
POOLED = {
    # name: (arguments, per-device prompt batch for the global batch of 8, ranks)
    # every role on its own ranks: the critic scores and trains on its rank while the TP2 actor trains
    "tp2-critic-reference-reward": (["--tensor_parallel_degree", "2", "--resource_pools",
                                     "actor:2,critic:1,reference:1,reward:1"], 8, 5),
    # the rollout on a rank of its own beside the reference: the TP2 actor's merged weights go there
    "tp2-rollout-reference": (["--tensor_parallel_degree", "2", "--resource_pools", "actor:2,rollout+reference:1"],
                              8, 3),
    # data parallel 2: the critic's pool of 2 trains data parallel, beside the frozen roles
    "dp2-shared-pool": (["--resource_pools", "actor:2,critic+reference+reward:2"], 4, 4),
    # sharding stage 1 over the actor's 2 ranks: 2 data ranks, so 2 reward ranks
    "sharding-reward-pool": (["--sharding_parallel_degree", "2", "--sharding", "stage1", "--resource_pools",
                              "actor:2,reward:2"], 4, 4),
}


@pytest.fixture(scope="module")
def single(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-single")
    return out, ppo(tiny_dir, out, 8, *TEMPERATURE)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(POOLED))
def test_pooled_runs_equal_the_colocated_run(tiny_dir, single, tmp_path, layout):
    one_dir, one = single
    extra, batch, nproc = POOLED[layout]
    two_dir = tmp_path / layout
    two = ppo(tiny_dir, two_dir, batch, *TEMPERATURE, *extra, nproc=nproc)
    assert_same_steps(one, two)
    assert_same_eval(one_dir, two_dir)
    for sub in ("policy", "value"):
        assert_same_weights(one_dir / sub, two_dir / sub)
    # the pools scored: every step logged when each pool scored, after the sequences were sent
    names = {"dp2-shared-pool": ("critic_reference_reward",),
             "tp2-critic-reference-reward": ("critic", "reference", "reward"),
             "tp2-rollout-reference": ("reference_rollout",),
             "sharding-reward-pool": ("reward",)}[layout]
    for row in two:
        for name in ("actor", *names):
            start, end = row[f"time/pool_{name}_start"], row[f"time/pool_{name}_end"]
            assert 0 <= start <= end, (name, start, end)


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_with_pools_checkpoints_and_resumes_exactly(tiny_dir, tmp_path, start_run):
    """SIGTERM to the launcher of a sampled pooled run (tensor-parallel actor; the critic, the reward
    model and the rollout on a rank of their own) inside step 2: the actor's pool writes
    checkpoint-2, the pool its value/, the critic's optimizer states and its random state (the
    rollout samples from it) into it, and both stop (the pool's rank keeps working until the
    actor's pool releases it); the resume, reading them back on the pool and sending it the
    actor's weights again, ends bit for bit where a straight pooled run ends."""
    layout = ("--tensor_parallel_degree", "2", "--resource_pools", "actor:2,critic+reward+rollout:1")
    straight = tmp_path / "straight"
    straight_run(ppo_cmd(tiny_dir, straight, *layout), 3, straight)
    cmd = ppo_cmd(tiny_dir, tmp_path / "stopped", *layout)
    run = start_run(cmd, 3, tmp_path / "stopped", "step:2")
    run.paused_at("step2", ranks=range(2))
    run.signal()
    run.go("step2")
    run.proc.wait(timeout=300)
    logs = run.logs()
    for log in logs[:2]:
        assert "Traceback" not in log and log.strip().splitlines()[-1].startswith("stopped by SIGTERM after step 2 of 4")
    assert "Traceback" not in logs[2] and "SIGTERM" not in logs[2].strip().splitlines()[-1]
    assert [n for n, _ in list_checkpoints(str(run.out))] == [2]
    saved = run.out / "checkpoint-2"  # the critic's part, written by its pool (rank 2)
    assert (saved / "value" / "config.json").is_file() and (saved / "optimizer-critic.rank2.safetensors").is_file()
    assert not (saved / "optimizer-critic.rank0.safetensors").exists()
    resume_and_compare(cmd, 3, run.out, straight, models=("policy", "value"))


@pytest.mark.slow
@pytest.mark.distributed
def test_a_reward_pool_samples_what_the_colocated_run_samples(tiny_dir, tmp_path):
    """With sampling on: the responses come from the rank's random stream, which must not depend
    on which models the rank built (the reward model lives on its own rank here)."""
    sampled = ["--do_sample", "true", "--tensor_parallel_degree", "2"]
    colocated = ppo(tiny_dir, tmp_path / "colocated", 8, *TEMPERATURE, *sampled, nproc=2)
    pooled = ppo(tiny_dir, tmp_path / "pooled", 8, *TEMPERATURE, *sampled, "--resource_pools", "actor:2,reward:1",
                 nproc=3)
    assert_same_steps(colocated, pooled)
    assert len({r["reward"] for r in colocated}) == STEPS  # sampled: every step's responses differ


@pytest.fixture(scope="module")
def eos_dir(tiny_dir, tmp_path_factory):
    """The tiny base with its end-of-sequence logit's weights scaled by 6 (``<dir>/base``; the score
    model copied to ``<dir>/score``): sampled responses end at unequal lengths (about 1 in 20
    tokens is the end), so the micro-batches of a step carry unequal token counts."""
    import shutil

    from ppo.models import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("eos")
    shutil.copytree(tiny_dir / "score", out / "score")
    model = load_causal_lm(str(tiny_dir / "base"), "base")
    tokenizer = load_tokenizer(str(tiny_dir / "base"), "base")
    weight = model.lm_head.weight.numpy()
    weight[:, tokenizer.eos_token_id] *= 6
    model.lm_head.weight.set_value(weight)
    model.save_pretrained(str(out / "base"), safe_serialization=True)
    tokenizer.save_pretrained(str(out / "base"))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_a_critic_and_rollout_pool_trains_as_colocated(eos_dir, tmp_path):
    """The critic and the rollout on a pool of their own (2 ranks, one per data rank), beside a
    data-parallel actor.  The rollout's ranks sample what the colocated actor samples (each data
    rank's random stream, the actor's weights sent after every update: stale weights change the
    responses from step 2 on).  The critic takes the optimizer steps the colocated critic takes,
    from the rows, micro-batches and weights the actor's pool sends: sampled responses of unequal
    lengths in length buckets, shuffled mini-batches, two steps of two micro-batches per epoch, so
    a wrong row, a dropped weight or an unsynchronised gradient moves the critic's numbers."""
    steps = ["--do_sample", "true", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
             "--shuffle_minibatches", "true", "--length_buckets", "true"]
    colocated = ppo(eos_dir, tmp_path / "colocated", 4, *TEMPERATURE, *steps, nproc=2)
    pooled = ppo(eos_dir, tmp_path / "pooled", 4, *TEMPERATURE, *steps, "--resource_pools", "actor:2,critic+rollout:2",
                 nproc=4)
    assert_same_steps(colocated, pooled)
    assert_same_eval(tmp_path / "colocated", tmp_path / "pooled")  # evaluation's own fixed samples
    assert len({r["response_length"] for r in colocated}) > 1  # sampled: the steps' lengths differ
    for sub in ("policy", "value"):
        assert_same_weights(tmp_path / "colocated" / sub, tmp_path / "pooled" / sub)
    assert all(0 <= r["time/pool_critic_rollout_start"] <= r["time/pool_critic_rollout_end"] for r in pooled)
