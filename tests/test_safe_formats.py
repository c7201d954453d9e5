"""Pickles from outside are read only when they hold data: a crafted weights file or checkpoint
state that would run a command is refused with one line and runs nothing; allow_unsafe_pickle
lifts the check."""

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

from trained_weights import assert_no_pickles, weights

from ppo.core.errors import UserError
from ppo.storage import safe_pickle
from ppo.storage.safe_pickle import check_pickle, is_pickle, pickle_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunsACommand:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_the_toolkits_own_pickles_pass_and_name_only_data(tmp_path):
    from ppo.storage.checkpoint import capture_rng

    paddle.save({"w": paddle.randn([3, 2]), "h": paddle.randn([4]).astype("bfloat16"), "step": {"n": 3, "lr": 0.1}},
                str(tmp_path / "w.pdparams"))
    with open(tmp_path / "rng.pkl", "wb") as f:
        pickle.dump(capture_rng({"shuffle_rng": np.random.default_rng(1).bit_generator.state}), f)
    for name in ("w.pdparams", "rng.pkl"):
        check_pickle(str(tmp_path / name))
        assert set(pickle_names(str(tmp_path / name))) <= safe_pickle.ALLOWED
        assert is_pickle(str(tmp_path / name))


@pytest.mark.parametrize("payload,named", [("command", "system"), ("eval", "eval")])
def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path, payload, named):
    marker = tmp_path / "ran"
    obj = {"w": np.zeros(3), "x": RunsACommand(marker) if payload == "command" else CallsEval()}
    for protocol in (2, 4, 5):
        path = tmp_path / f"evil{protocol}.pdparams"
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
        with pytest.raises(UserError, match=f"weights file '{path}' is a pickle that names '[_a-z]+\\.{named}'"):
            check_pickle(str(path), "weights file")
    assert not marker.exists()


def test_a_global_built_from_computed_strings_is_refused(tmp_path):
    # STACK_GLOBAL whose module name does not come straight from a string opcode cannot be checked
    import pickletools  # noqa: F401

    data = (b"\x80\x04" + b"\x8c\x02os" + b"\x94" + b"\x8c\x06system" + b"\x94" + b"h\x00" + b"h\x01" + b"\x93"
            + b"\x8c\x04true\x85R." )
    path = tmp_path / "memo.pkl"
    path.write_bytes(data)
    assert ("os", "system") in set(pickle_names(str(path)))  # memoized strings are followed
    with pytest.raises(UserError, match="names 'os.system'"):
        check_pickle(str(path))


def test_a_truncated_pickle_is_one_line(tmp_path):
    paddle.save({"w": paddle.randn([64, 64])}, str(tmp_path / "w.pdparams"))
    blob = (tmp_path / "w.pdparams").read_bytes()
    (tmp_path / "w.pdparams").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(UserError, match="cannot be read \\(damaged or truncated\\?\\): not a complete pickle"):
        check_pickle(str(tmp_path / "w.pdparams"), "weights file")


def crafted_model(tiny_dir, folder, marker):
    shutil.copytree(tiny_dir / "base", folder)
    state = weights(folder)  # the weights as a paddlenlp pickle folder, one entry added
    os.remove(folder / "model.safetensors")
    state["zz_payload"] = RunsACommand(marker)
    with open(folder / "model_state.pdparams", "wb") as f:
        pickle.dump(state, f, protocol=4)


def test_a_crafted_model_folder_is_refused_by_the_entry_point(tiny_dir, tmp_path):
    """The SFT entry point on a model folder whose weights would run a command: exit 2, one line,
    nothing run, nothing written; with --allow_unsafe_pickle true paddlenlp loads it (and runs it)."""
    marker = tmp_path / "ran"
    crafted_model(tiny_dir, tmp_path / "evil", marker)
    cmd = [sys.executable, os.path.join(ROOT, "ppo", "run_sft.py"), "--model_name_or_path", str(tmp_path / "evil"),
           "--train_datasets", "tiny-sft:0.01", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
           "--max_length", "64", "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: weights file '") and "model_state.pdparams' is a pickle that names " \
        "'posix.system'" in last and "--allow_unsafe_pickle true" in last, last
    assert "Traceback" not in proc.stderr and not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # the user's explicit choice: the check is lifted (with a warning) and the file loads as pickle does
    proc = subprocess.run(cmd + ["--allow_unsafe_pickle", "true", "--output_dir", str(tmp_path / "out2")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "allow_unsafe_pickle: pickled files are loaded without checking" in proc.stderr
    assert marker.exists()


def test_a_crafted_checkpoint_state_is_refused_on_resume(tiny_dir, tmp_path):
    from ppo.args import SFTArgs
    from ppo.stages.sft.trainer import SFTTrainer
    from ppo.storage.manifest import MANIFEST, file_crc32c

    common = dict(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-sft:0.05", max_length=64,
                  max_steps=2, per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True,
                  output_dir=str(tmp_path / "run"))
    SFTTrainer(SFTArgs(save_steps=1, **common)).train()
    ckpt = tmp_path / "run" / "checkpoint-1"
    marker = tmp_path / "ran"
    # a checkpoint in the earlier layout (random state pickled in rng.rank0.pkl), crafted, with the
    # manifest made to match, as an attacker who rewrites a shared checkpoint would
    import json

    os.remove(ckpt / "rng.rank0.json")
    target = ckpt / "rng.rank0.pkl"
    with open(target, "wb") as f:
        pickle.dump({"paddle": RunsACommand(marker)}, f)
    manifest = json.load(open(ckpt / MANIFEST))
    del manifest["files"]["rng.rank0.json"]
    manifest["files"]["rng.rank0.pkl"] = {"size": target.stat().st_size, "crc32c": file_crc32c(str(target))}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="names 'posix.system'"):
        SFTTrainer(SFTArgs(resume_from_checkpoint=str(ckpt), **{**common, "max_steps": 3})).train()
    assert not marker.exists()


def test_checkpoints_hold_no_pickled_state_and_the_earlier_layout_still_resumes(tiny_dir, tmp_path):
    """The optimizer and random states of a checkpoint are safetensors and JSON; a checkpoint in the
    earlier layout (the same states as .pdopt and .pkl pickles) resumes to the same bitwise result."""
    import json

    from ppo.args import SFTArgs
    from ppo.stages.sft.trainer import SFTTrainer
    from ppo.storage.checkpoint import read_tensors_and_json, rng_from_json
    from ppo.storage.manifest import MANIFEST, file_crc32c

    common = dict(model_name_or_path=str(tiny_dir / "base"), train_datasets="tiny-sft:0.05", max_length=64,
                  max_steps=4, per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True, seed=3,
                  learning_rate=1e-3)
    SFTTrainer(SFTArgs(output_dir=str(tmp_path / "straight"), save_steps=2, **common)).train()
    ckpt = tmp_path / "straight" / "checkpoint-2"
    state_files = [n for n in os.listdir(ckpt) if n.startswith(("optimizer", "rng"))]
    assert sorted(state_files) == ["optimizer.rank0.json", "optimizer.rank0.safetensors", "rng.rank0.json"]
    assert not any(is_pickle(str(ckpt / n)) for n in state_files)
    # the earlier layout, written as that version wrote it
    old = tmp_path / "old"
    os.makedirs(old)
    shutil.copytree(ckpt, old / "checkpoint-2")
    oc = old / "checkpoint-2"
    paddle.save(read_tensors_and_json(str(oc / "optimizer.rank0"), "optimizer state"), str(oc / "optimizer.rank0.pdopt"))
    with open(oc / "rng.rank0.pkl", "wb") as f:
        pickle.dump(rng_from_json(json.load(open(oc / "rng.rank0.json"))), f)
    paddle.save({k: paddle.to_tensor(v) for k, v in weights(oc).items()}, str(oc / "model_state.pdparams"))
    for name in ("optimizer.rank0.json", "optimizer.rank0.safetensors", "rng.rank0.json", "model.safetensors"):
        os.remove(oc / name)
    manifest = json.load(open(oc / MANIFEST))
    manifest["files"] = {n: {"size": os.path.getsize(oc / n), "crc32c": file_crc32c(str(oc / n))}
                         for n in os.listdir(oc) if n != MANIFEST}
    (oc / MANIFEST).write_text(json.dumps(manifest))
    SFTTrainer(SFTArgs(output_dir=str(old), resume_from_checkpoint=str(oc), **common)).train()
    assert_no_pickles(tmp_path / "straight")  # final model, checkpoints: no pickle anywhere
    a, b = weights(tmp_path / "straight"), weights(old)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
