"""Pipeline parallel and the rollout copies (``eval_mode``), on real launched ranks.

The weight-export test reassembles the training model from every rank's own shards with numpy
(stage by stage, tensor-parallel shards concatenated on the axis where their shape differs from
the checkpoint's), independently of the export code, and checks that each rank's rollout copy holds
exactly those weights after an update, and that its logits and critic scores equal a
single-process model's built from them.
"""

import sys

import numpy as np
import pytest

from test_cpu_fleet import SCRIPTS, TOL, launch
from trained_weights import weights


def reassemble(ranks, arrays, prefix, reference_shapes):
    """{name: full array} of the training model ``prefix`` from the shards of every rank."""
    full = {}
    names = sorted({k[len(f"t/{prefix}/"):] for a in arrays for k in a.files if k.startswith(f"t/{prefix}/")})
    for name in names:
        holders = [(r["mp_rank"], a[f"t/{prefix}/{name}"]) for r, a in zip(ranks, arrays)
                   if f"t/{prefix}/{name}" in a.files]
        shards = [v for _, v in sorted({mp: v for mp, v in holders}.items())]
        want = reference_shapes.get(name, shards[0].shape)
        axes = [i for i, (s, w) in enumerate(zip(shards[0].shape, want)) if s != w]
        if axes:
            full[name] = np.concatenate(shards, axis=axes[0])
        else:
            for s in shards[1:]:  # replicated over tensor parallel: the same on every rank
                np.testing.assert_array_equal(s, shards[0], err_msg=name)
            full[name] = shards[0]
        assert full[name].shape == tuple(want), (name, full[name].shape, want)
    return full


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout,nproc,merged", [
    (["--tensor_parallel_degree", "2", "--eval_mode", "single"], 2, True),
    (["--tensor_parallel_degree", "2", "--pipeline_parallel_degree", "2"], 4, False),
], ids=["tp2-to-single", "tp2xpp2-to-tp2"])
def test_rollout_copies_equal_the_trained_weights(tiny_dir, tmp_path, layout, nproc, merged):
    import paddle

    from ppo.models import load_causal_lm, load_score_model, position_ids_from_mask

    ranks = launch("export_weights.py", tmp_path, tiny_dir / "base", tmp_path, *layout, nproc=nproc)
    arrays = [np.load(tmp_path / f"arrays{k}.npz") for k in range(nproc)]
    base = weights(tiny_dir / "base")
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    for prefix in ("actor", "critic"):
        full = reassemble(ranks, arrays, prefix, shapes)
        if prefix == "actor":  # the update moved the weights: the comparison is not of the checkpoint
            assert max(float(np.abs(full[k] - base[k]).max()) for k in full) > 1e-4
        for r, a in zip(ranks, arrays):
            copy = {k[len(f"r/{prefix}/"):]: a[k] for k in a.files if k.startswith(f"r/{prefix}/")}
            assert copy.keys() == full.keys()
            for name, value in copy.items():
                if merged or value.shape == full[name].shape:
                    expected = full[name]
                else:  # split like training: this rank's own training shard of it
                    holder = next(b for s, b in zip(ranks, arrays)
                                  if s["mp_rank"] == r["mp_rank"] and f"t/{prefix}/{name}" in b.files)
                    expected = holder[f"t/{prefix}/{name}"]
                np.testing.assert_array_equal(value, expected, err_msg=f"{prefix} {name} rank {r}")

    # rollout outputs equal a single-process model's holding the reassembled weights
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    from export_weights import fixed_batch

    ids, mask = fixed_batch()
    actor = load_causal_lm(str(tiny_dir / "base"))
    actor.set_state_dict({k: paddle.to_tensor(v) for k, v in reassemble(ranks, arrays, "actor", shapes).items()})
    critic = load_score_model(str(tiny_dir / "base"), score_type="critic")
    critic.set_state_dict({k: paddle.to_tensor(v) for k, v in reassemble(ranks, arrays, "critic", shapes).items()})
    actor.eval()
    critic.eval()
    with paddle.no_grad():
        logits = actor(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       return_dict=True).logits.numpy()
        scores = critic(ids, mask).scores.numpy()
    for a in arrays:
        np.testing.assert_allclose(a["logits"], logits, rtol=0, atol=TOL)
        np.testing.assert_allclose(a["scores"], scores, rtol=0, atol=TOL)
