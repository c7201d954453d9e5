"""ppo.distributed.cpu_fleet: tensor and pipeline parallel over gloo on CPU, checked on real launched ranks.

Each distributed test launches a script of tests/dist_scripts with ``paddle.distributed.launch``;
the script writes per-rank JSON (and rank 0 an .npz) that the test compares with plain numpy or a
single-process paddlenlp model computed here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "dist_scripts")
LR = 0.5
TOL = 1e-5


def launch(script, out_dir, *args, nproc=2):
    """Run ``script`` on ``nproc`` ranks; return the per-rank JSON results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "log"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
           "--log_dir", str(log_dir), os.path.join(SCRIPTS, script), *map(str, args)]
    env = dict(os.environ, MKL_DEBUG_CPU_TYPE="5")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        logs = "".join(f"\n--- workerlog.{k} ---\n" + open(log_dir / f"workerlog.{k}").read()[-3000:]
                       for k in range(nproc) if (log_dir / f"workerlog.{k}").exists())
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}){logs}")
    return [json.load(open(out_dir / f"rank{k}.json")) for k in range(nproc)]


def single_process_model(model_dir):
    from paddlenlp.transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype="float32")


def single_process_losses(model_dir, data, steps):
    """Loss of the same batch at each of ``steps`` SGD steps, in one process."""
    import paddle

    model = single_process_model(model_dir)
    optimizer = paddle.optimizer.SGD(learning_rate=LR, parameters=model.parameters())
    ids, mask, labels = (paddle.to_tensor(data[k]) for k in ("input_ids", "attention_mask", "labels"))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=True).loss
        losses.append(float(loss))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    return losses


# ---------------------------------------------------------------- in process: when it must not patch

def test_does_nothing_on_an_accelerator_build(monkeypatch):
    import paddle
    from paddle.distributed.fleet.layers.mpu import mp_ops

    import ppo.distributed.cpu_fleet as cpu_fleet

    monkeypatch.setattr(cpu_fleet, "_ENABLED", False)
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 1)
    identity = mp_ops._c_identity
    assert cpu_fleet.enable_cpu_fleet() is False
    assert mp_ops._c_identity is identity
    assert "all_reduce_on_calc_stream" not in vars(paddle.base.core.ProcessGroupGloo)


def test_refuses_a_paddle_version_it_was_not_written_for(monkeypatch):
    import paddle

    import ppo.distributed.cpu_fleet as cpu_fleet
    from ppo.core.errors import UserError

    monkeypatch.setattr(cpu_fleet, "_ENABLED", False)
    monkeypatch.setattr(paddle, "__version__", "3.1.0")
    with pytest.raises(UserError, match=r"paddle 3\.1\.0: .*3\.3 / 3\.0"):
        cpu_fleet.enable_cpu_fleet()
    assert "all_reduce_on_calc_stream" not in vars(paddle.base.core.ProcessGroupGloo)


# ---------------------------------------------------------------- launched ranks

OP_CHECKS = [
    "identity_fwd", "identity_bwd", "allreduce_fwd", "allreduce_input_kept", "allreduce_bwd",
    "concat_fwd", "concat_bwd", "split_fwd", "split_bwd",
    "softmax_ce_loss", "softmax_ce_softmax", "softmax_ce_grad", "softmax_ce_loss_3d",
    "all_reduce_on_calc_stream_sum", "all_reduce_on_calc_stream_max", "all_reduce_on_calc_stream_default",
    "broadcast_on_calc_stream", "all_gather_on_calc_stream", "all_gather_into_tensor_on_calc_stream",
    "send_recv_on_calc_stream", "broadcast_input_data",
]


@pytest.mark.distributed
@pytest.mark.slow
def test_adapted_ops_and_gloo_methods_match_plain_references(tmp_path):
    results = launch("cpu_fleet_ops.py", tmp_path, tmp_path)
    for rank, result in enumerate(results):
        expected = OP_CHECKS + (["reduce_on_calc_stream"] if rank == 0 else [])
        assert sorted(result["errors"]) == sorted(expected)
        bad = {k: v for k, v in result["errors"].items() if not v < TOL}
        assert not bad, f"rank {rank}: {bad}"
        assert result["flags"] == {"first_call_patched": True, "second_call_noop": True,
                                   "tasks_have_wait": True, "device_id_is_0": True}


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_llama_matches_single_process(tiny_dir, tmp_path):
    import paddle

    results = launch("cpu_fleet_tp_llama.py", tmp_path, tiny_dir / "base", tmp_path, LR)
    assert [r["mp_rank"] for r in results] == [0, 1]
    for r in results:
        assert r["patched"] and r["local_lm_head_shape"] == [64, 160]  # vocab 320 split in 2
        assert r["logits_shape"] == [2, 12, 320]
    tp = np.load(tmp_path / "tp.npz")

    model = single_process_model(tiny_dir / "base")
    initial = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    ids, mask, labels = (paddle.to_tensor(tp[k]) for k in ("input_ids", "attention_mask", "labels"))
    with paddle.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, return_dict=True).logits.numpy()
    assert np.abs(tp["logits"] - logits).max() < TOL

    optimizer = paddle.optimizer.SGD(learning_rate=LR, parameters=model.parameters())
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=True).loss
    assert abs(float(tp["loss"]) - float(loss)) < TOL
    loss.backward()
    optimizer.step()
    after = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(k[len("param/"):] for k in tp.files if k.startswith("param/")) == sorted(after)
    for name, value in after.items():
        assert np.abs(tp[f"param/{name}"] - value).max() < TOL, name
    # the step moved the split weights well beyond the tolerance: agreeing is not agreeing on "unchanged"
    for name in ("llama.embed_tokens.weight", "llama.layers.0.self_attn.q_proj.weight",
                 "llama.layers.1.self_attn.o_proj.weight", "llama.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        assert np.abs(after[name] - initial[name]).max() > 10 * TOL, name


def check_pipeline(results, out_dir, model_dir, steps):
    assert all(r["patched"] and r["exchanged"] for r in results)
    pp = np.load(out_dir / "pp.npz")
    assert all(r["losses"] == results[0]["losses"] for r in results)
    reference = single_process_losses(model_dir, pp, steps)
    assert len(pp["losses"]) == steps
    assert abs(pp["losses"][0] - reference[0]) < TOL
    # the second step starts from the pipeline's update: same update, same loss
    assert np.abs(pp["losses"] - reference).max() < TOL
    assert pp["losses"][-1] < pp["losses"][0]


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_llama_matches_single_process(tiny_dir, tmp_path):
    results = launch("cpu_fleet_pp_llama.py", tmp_path, tiny_dir / "base", tmp_path, LR, 2)
    assert [r["stage"] for r in results] == [0, 1]
    check_pipeline(results, tmp_path, tiny_dir / "base", steps=2)


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_with_tensor_parallel_on_four_ranks(tiny_dir, tmp_path):
    # 4 ranks: also covers the per-group gloo store (disjoint groups) and whole-tensor p2p under mp
    results = launch("cpu_fleet_pp_llama.py", tmp_path, tiny_dir / "base", tmp_path, LR, 2, 2, nproc=4)
    assert sorted((r["stage"], r["mp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    full = sum(int(np.prod(v.shape)) for v in single_process_model(tiny_dir / "base").state_dict().values())
    # split by mp: the 4 ranks together hold the model about once (norm weights are replicated)
    assert sum(r["local_numel"] for r in results) < 1.05 * full
    check_pipeline(results, tmp_path, tiny_dir / "base", steps=2)


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_inference_model_matches_single_process(tiny_dir, tmp_path):
    """The rollout inference model over TP2 shards (heads, MLP columns, vocabulary split; partial
    sums all-reduced) gives a single-process model's logits, greedy tokens, log-probs and scores;
    the training path's vocabulary-parallel entropy gives its entropy and, through the backward,
    its gradients (each rank's LM-head columns, the replicated final norm); a sampled rollout keeps
    the vocabulary-parallel recompute's log-probs."""
    import importlib.util

    import paddle

    from ppo.models import load_score_model, position_ids_from_mask
    from ppo.rollout.collect import GenerationConfig, forward_log_probs, generate

    results = launch("tp_inference.py", tmp_path, tiny_dir / "base", tmp_path)
    assert [r["mp_rank"] for r in results] == [0, 1]
    assert all(r["vocab_split"] and r["local_embedding_rows"] == 160 for r in results)  # 320 / 2
    got = np.load(tmp_path / "tp.npz")
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)  # the script's own import of _common
    spec = importlib.util.spec_from_file_location("tp_inference", os.path.join(SCRIPTS, "tp_inference.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ids, mask, seqs, smask = script.inputs()

    model = single_process_model(tiny_dir / "base")
    model.eval()
    scorer = load_score_model(str(tiny_dir / "base"))
    scorer.eval()
    with paddle.no_grad():
        pos = position_ids_from_mask(mask)
        first = model(input_ids=ids, attention_mask=mask, position_ids=pos, return_dict=True).logits[:, -1]
        token = paddle.argmax(first, axis=-1)
        ids2 = paddle.concat([ids, token.unsqueeze(1)], axis=1)
        mask2 = paddle.concat([mask, paddle.ones_like(token).unsqueeze(1)], axis=1)
        second = model(input_ids=ids2, attention_mask=mask2, position_ids=position_ids_from_mask(mask2),
                       return_dict=True).logits[:, -1]
        greedy, greedy_mask = generate(model, ids, mask, GenerationConfig(max_new_tokens=6, do_sample=False), 2, 3)
        log_probs, _ = forward_log_probs(model, seqs, smask, temperature=0.7)
        out = scorer(seqs, smask)
    np.testing.assert_allclose(got["first"], first.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["second"], second.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["greedy"], greedy.numpy())
    np.testing.assert_array_equal(got["greedy_mask"], greedy_mask.numpy())
    real = (smask[:, 1:].numpy() * smask[:, :-1].numpy()) > 0
    np.testing.assert_allclose(got["log_probs"][real], log_probs.numpy()[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["end"], out.end_scores.numpy(), rtol=1e-5, atol=1e-5)
    live = smask.numpy() > 0
    np.testing.assert_allclose(got["scores"][..., 0][live], out.scores.numpy()[..., 0][live], rtol=1e-5, atol=1e-5)

    # the log-probs kept from a sampled tensor-parallel rollout (full logits gathered per step) are
    # the vocabulary-parallel recompute's and the single process's, to 1e-5
    P = ids.shape[1]
    response = got["sampled_mask"][:, P:] > 0
    assert response.sum() > 10 and (got["kept"][~response] == 0).all()
    np.testing.assert_allclose(got["kept"][response], got["recomputed"][:, P - 1:][response], rtol=0, atol=1e-5)
    with paddle.no_grad():
        single, _ = forward_log_probs(model, paddle.to_tensor(got["sampled"]), paddle.to_tensor(got["sampled_mask"]),
                                      temperature=0.7)
    np.testing.assert_allclose(got["kept"][response], single.numpy()[:, P - 1:][response], rtol=0, atol=1e-5)

    _, entropy = forward_log_probs(model, seqs, smask, temperature=0.7, with_entropy=True)
    (entropy * paddle.to_tensor(real.astype("float32"))).sum().backward()
    assert got["entropy_has_grad"] and not got["detached_has_grad"]
    for key in ("entropy", "entropy_detached"):
        np.testing.assert_allclose(got[key][real], entropy.numpy()[real], rtol=1e-5, atol=1e-5)
    full_grad = model.lm_head.weight.grad.numpy()  # [hidden, vocab]; rank k holds columns k * 160 ...
    assert np.abs(full_grad).max() > 1e-3
    for k in range(2):
        grads = np.load(tmp_path / f"grad{k}.npz")
        np.testing.assert_allclose(grads["lm_head"], full_grad[:, 160 * k:160 * (k + 1)], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(grads["norm"], model.llama.norm.weight.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
def test_group_sharded_stage2_matches_single_process(tmp_path):
    """Sharding stage 2 on CPU: the same updates as one process on the whole batches, each rank
    holding the optimizer moments of only its share of the parameters."""
    import paddle

    results = launch("cpu_fleet_stage2.py", tmp_path, tmp_path)
    assert all(r["patched"] for r in results)
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    from cpu_fleet_stage2 import batches, build, loss_of

    model, optimizer = build()
    norms = []
    for x in batches():
        loss = loss_of(model, paddle.to_tensor(x))
        loss.backward()
        norms.append(float(paddle.sqrt(sum((p.grad * p.grad).sum() for p in model.parameters()))))
        optimizer.step()
        optimizer.clear_grad()
    assert min(norms) > 0.05  # the clip is active in every step, so the sharded clip is exercised
    for r in results:
        for got, want in zip(r["params"], model.parameters()):
            np.testing.assert_allclose(np.array(got), want.numpy(), rtol=0, atol=TOL)
    owned = [set(r["moments_of"]) for r in results]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert owned[0] | owned[1] == set(range(len(list(model.parameters()))))
