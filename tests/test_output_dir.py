"""Output folders are never destroyed: the final save keeps the run's checkpoints and metrics."""

import hashlib
import json
import os

import pytest

from ppo.args import SFTArgs
from ppo.checkpoint import list_checkpoints


def snapshot(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def sft(tiny_dir, out, **kw):
    from ppo.sft_trainer import SFTTrainer

    common = dict(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-sft", max_length=64, max_steps=2,
                  per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_steps=1,
                  disable_tqdm=True, seed=5, output_dir=str(out))
    return SFTTrainer(SFTArgs(**{**common, **kw}))


def train_steps(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """A finished 2-step SFT run with checkpoint-1 (the last step is the final model; never modified)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    sft(tiny_dir, out).train()
    return out


def test_final_save_keeps_checkpoints_metrics_and_loads_from_output_dir(finished):
    assert [n for n, _ in list_checkpoints(str(finished))] == [1]
    assert train_steps(finished) == [1, 2]
    assert os.path.isfile(finished / "config.json") and os.path.isfile(finished / "model_state.pdparams")
    assert not [n for n in os.listdir(finished) if n.startswith((".tmp-", ".old-"))]


def test_final_save_into_finished_folder_keeps_other_files(finished, tmp_path):
    # the final save of a resumed run writes over the model files only (before: the folder was renamed away)
    import shutil

    from ppo.checkpoint import publish

    target = tmp_path / "run"
    shutil.copytree(finished, target)
    tmp = tmp_path / ".tmp-run"
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    publish(str(tmp), str(target))
    after = snapshot(target)
    before = snapshot(finished)
    assert after["config.json"] == hashlib.sha256(b"{}").hexdigest()
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items()
                                                                     if k != "config.json"}
    assert not tmp.exists()
