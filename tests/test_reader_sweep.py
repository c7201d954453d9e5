"""Every reader of the toolkit against every damaged form of its file, generated from two lists.

``READERS`` names each file the entry points read (argument files, data files in every format and
every layout, model and tokenizer files, weights in every format, weight indexes, checkpoint
files, the DPO reference table, chat templates, the output folder's lock).  ``DAMAGES`` are the
forms a file arrives in when something went wrong: missing, empty, truncated, not UTF-8, a folder
where a file belongs, and a file of another format.  Each (reader, damage) pair that applies is
one case, run through the real entry point in-process: exit status 2, one ``error: ...`` line
naming the damaged file, no traceback, and the output folder (a finished run with a checkpoint)
byte-identical afterwards.

Two source scans keep the lists whole: every label a reader of ``ppo/storage`` is called with
(``read_json(path, "model config")``) has a row here or names the test that covers it, and every
file read outside the storage layer's readers is listed with the reason it may be.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from dataclasses import dataclass, field

import pytest

from tests.test_bad_inputs import (  # noqa: F401  (workspace is the shared fixture)
    ROOT, assert_one_line_error, base_config, entry_main, fill, route_log_handlers_to_stderr, snapshot, workspace)

# ---------------------------------------------------------------------------------------------
# The damaged forms


def _missing(path: str, kind: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _empty(path: str, kind: str) -> None:
    open(path, "wb").close()


def _truncated(path: str, kind: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _not_utf8(path: str, kind: str) -> None:
    """Two bytes that no UTF-8 text holds, in the middle of the file (the rest intact)."""
    with open(path, "rb") as f:
        data = f.read()
    middle = len(data) // 2
    with open(path, "wb") as f:
        f.write(data[:middle] + b"\xff\xfe" + data[middle:])


def _directory(path: str, kind: str) -> None:
    """A folder (holding one file) where the file belongs."""
    _missing(path, kind)
    os.makedirs(path)
    with open(os.path.join(path, "inside.txt"), "w") as f:
        f.write("a folder, not the file\n")


# the content of "a file of another format", by the kind of file it replaces: valid in some
# format, wrong for this reader
OTHER_FORMAT = {
    "json": b"[1, 2, 3]\n",                                   # JSON, but not an object
    "jsonl": b"[1, 2]\n[3, 4]\n",                             # JSON lines that are not records
    "csv": b"PAR1\x00\x15\x04\x15\x10\x15\x14L\x15\x02\x15\x00\x12\x00\x00",  # parquet's magic: binary
    "parquet": b'{"prompt": "2+2=", "answer": "4"}\n',        # JSON text named .parquet
    "text": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",           # a picture
    "safetensors": b'{"weights": [1, 2, 3]}\n',               # JSON, no safetensors header
    "pickle": b'{"weights": [1, 2, 3]}\n',                    # JSON named .pdparams
    "sentencepiece": b'{"model": "sentencepiece"}\n',         # JSON named .model
    "npz": b"prompt,chosen\n1,2\n",                           # CSV named .npz
    "jinja": b"{% for message in messages %}{{ message['content'] }",  # an unclosed template block
}


def _other_format(path: str, kind: str) -> None:
    with open(path, "wb") as f:
        f.write(OTHER_FORMAT[kind])


DAMAGES = {"missing": _missing, "empty": _empty, "truncated": _truncated, "not-utf8": _not_utf8,
           "directory": _directory, "other-format": _other_format}
TEXT = ("missing", "empty", "truncated", "not-utf8", "directory", "other-format")
BINARY = ("missing", "empty", "truncated", "directory", "other-format")


# ---------------------------------------------------------------------------------------------
# The readers


@dataclass
class Reader:
    id: str
    label: str              # what the reader calls the file in its error lines (the source's label)
    stage: str              # the entry point that reads it
    source: str             # the folder the case copies and damages ("CONFIG": the config file itself)
    file: str               # the damaged file, relative to the copy
    point: dict             # config entries that make the stage read the copy ({COPY})
    kind: str               # json | jsonl | csv | parquet | text | safetensors | pickle | ... (OTHER_FORMAT)
    damages: tuple = TEXT
    says: dict = field(default_factory=dict)  # damage -> fragments the line holds instead of the file's path
    rewrite: str = ""       # "manifest" / "fingerprint": the record of the file's checksum rewritten to match
                            # the damage (a crafted folder), so the reader itself meets it
    shows: str = ""         # what the line calls the file, where it is not ``label``
    in_place: bool = False  # the copy is the run's own output_dir (the run resumes into it)
    wraps: tuple = ()       # labels of outer readers around this one (``reading(path, "trainer state")``)


NOT_A_MODEL = ("is not a model folder",)
MISSING = {"missing": ("is damaged", "is missing"), "directory": ("is damaged", "is a folder, not a file")}
NO_WEIGHTS = ("has a config.json but no weights",)


def FOLDER(name: str) -> tuple:
    return (f"has a folder '{name}' where a weights file belongs",)


NO_INDEX = {"missing": ("holds weight shards (model-00001-of-", "but no index file naming them"),
            "directory": FOLDER("model.safetensors.index.json")}
RESUME = {"resume_from_checkpoint": "{COPY}/checkpoint-1"}

READERS = [
    Reader("config-file", "config file", "sft", "CONFIG", "", {}, "json"),
    # data: every format a local file may have, then every layout that reads a local file
    *[Reader(f"data-{fmt}", "dataset file", "sft", "DATA", f"sft.{fmt}", {"train_datasets": f"tiny-sft:1:{{COPY}}/sft.{fmt}"},
             fmt, TEXT if fmt != "parquet" else BINARY, shows="dataset")
      for fmt in ("jsonl", "json", "csv", "parquet")],
    Reader("data-folder", "dataset file", "sft", "DATA", "folder/sft.jsonl",
           {"train_datasets": "tiny-sft:1:{COPY}/folder"}, "jsonl", shows="dataset"),
    # the model folder: config, tokenizer files, weights in every format
    Reader("model-config", "model config", "sft", "BASE", "config.json", {"model_name_or_path": "{COPY}"}, "json",
           says={"missing": NOT_A_MODEL, "directory": NOT_A_MODEL}),
    Reader("tokenizer-config", "tokenizer config", "sft", "BASE", "tokenizer_config.json",
           {"model_name_or_path": "{COPY}"}, "json", TEXT[1:]),
    Reader("special-tokens-map", "special tokens map", "rm", "BASE", "special_tokens_map.json",
           {"model_name_or_path": "{COPY}"}, "json", TEXT[1:]),
    Reader("tokenizer-json", "tokenizer file", "ppo", "FAST", "tokenizer.json", {"actor_model_name_or_path": "{COPY}"},
           "json", TEXT[1:]),
    Reader("added-tokens", "added tokens file", "dpo", "FAST", "added_tokens.json", {"model_name_or_path": "{COPY}"},
           "json", TEXT[1:]),
    Reader("sentencepiece-model", "sentencepiece model", "sft", "BASE", "sentencepiece.bpe.model",
           {"model_name_or_path": "{COPY}"}, "sentencepiece", BINARY,
           says={"missing": ("has no loadable tokenizer", "lacks 'sentencepiece.bpe.model' (vocab_file")}),
    Reader("weights-safetensors", "weights file", "sft", "BASE", "model.safetensors", {"model_name_or_path": "{COPY}"},
           "safetensors", BINARY, says={"missing": NO_WEIGHTS, "directory": FOLDER("model.safetensors")}),
    Reader("weights-pdparams", "weights file", "rm", "PICKLED", "model_state.pdparams",
           {"model_name_or_path": "{COPY}"}, "pickle", BINARY,
           says={"missing": NO_WEIGHTS, "directory": FOLDER("model_state.pdparams")}),
    Reader("weight-index", "weight index", "sft", "SHARDED", "model.safetensors.index.json",
           {"model_name_or_path": "{COPY}"}, "json", TEXT, says=NO_INDEX),
    Reader("weight-shard", "weights file", "ppo", "SHARDED", "model-00002-of-*.safetensors",
           {"actor_model_name_or_path": "{COPY}"}, "safetensors", BINARY,
           says={"missing": ("names the weight shard 'model-00002-of-", "which is missing"),
                 "directory": ("names the weight shard 'model-00002-of-", "which is a folder, not a file")}),
    # a transformers folder (converted on first use)
    Reader("hf-config", "model config", "sft", "HF", "config.json", {"model_name_or_path": "{COPY}"}, "json",
           says={"missing": NOT_A_MODEL, "directory": NOT_A_MODEL}),
    Reader("hf-weights", "weights file of", "dpo", "HF", "model.safetensors", {"model_name_or_path": "{COPY}"},
           "safetensors", BINARY, says={"missing": NO_WEIGHTS, "directory": FOLDER("model.safetensors")}),
    Reader("hf-weight-index", "weight index of", "sft", "HF_SHARDED", "model.safetensors.index.json",
           {"model_name_or_path": "{COPY}"}, "json", TEXT, says=NO_INDEX, shows="weight index"),
    # the chat template, in its own file and in the tokenizer config
    Reader("chat-template-file", "chat template", "sft", "CHAT", "chat_template.jinja",
           {"model_name_or_path": "{COPY}", "prompt_template": "chat"}, "jinja", TEXT,
           says={"missing": ("has none", "chat_template.jinja")}),
    # a checkpoint's files, each read after the manifest matched (the manifest rewritten to match)
    Reader("checkpoint-trainer-state", "checkpoint state", "rm", "RM", "checkpoint-1/trainer_state.json", RESUME,
           "json", TEXT, rewrite="manifest", says=MISSING, wraps=("trainer state",)),
    Reader("checkpoint-random-state", "random state", "rm", "RM", "checkpoint-1/rng.rank0.json", RESUME, "json",
           TEXT, rewrite="manifest", says=MISSING),
    Reader("checkpoint-optimizer-tensors", "optimizer state", "rm", "RM", "checkpoint-1/optimizer.rank0.safetensors",
           RESUME, "safetensors", BINARY, rewrite="manifest", says=MISSING),
    Reader("checkpoint-optimizer-meta", "optimizer state", "rm", "RM", "checkpoint-1/optimizer.rank0.json", RESUME,
           "json", TEXT, rewrite="manifest", says=MISSING),
    Reader("checkpoint-weights", "weights", "rm", "RM", "checkpoint-1/model.safetensors", RESUME, "safetensors",
           BINARY, rewrite="manifest", says=MISSING),
    # ... and the manifest itself, and a checkpoint file changed behind the manifest's back
    Reader("checkpoint-manifest", "checkpoint manifest", "rm", "RM", "checkpoint-1/manifest.json", RESUME, "json",
           TEXT, says={d: ("is damaged: manifest.json is",) for d in TEXT}),
    Reader("checkpoint-file-behind-the-manifest", "checkpoint", "rm", "RM", "checkpoint-1/trainer_state.json", RESUME,
           "json", TEXT, says={d: ("is damaged: file 'trainer_state.json'",) for d in TEXT}),
    # the precomputed DPO reference log-probs of a run, read when it resumes
    Reader("dpo-reference-fingerprint", "reference log-probs fingerprint", "dpo", "DPO_RUN",
           "reference_log_probs/fingerprint.json", {}, "json", TEXT[1:], in_place=True),
    Reader("dpo-reference-table", "reference log-probs table", "dpo", "DPO_RUN", "reference_log_probs/log_probs.npz", {},
           "npz", BINARY, in_place=True, shows="is missing or damaged"),
    Reader("dpo-reference-table-crafted", "reference log-probs table", "dpo", "DPO_RUN",
           "reference_log_probs/log_probs.npz", {}, "npz", ("empty", "truncated", "other-format"), in_place=True,
           rewrite="fingerprint"),
    # the lock of the output folder, written by a run that was killed
    Reader("output-dir-lock", "output_dir", "rm", "OUT", ".run.lock", {"resume_from_checkpoint": "auto"}, "json",
           TEXT[1:], in_place=True),
]

# layouts: each registered dataset that reads a local file, with one valid record; their damaged
# forms are a missing, empty or non-UTF-8 file, a record that is not an object, a field of the wrong
# type, and a cut last line
LAYOUTS = {
    "tiny-sft": ("sft", {"prompt": "2+2=", "answer": "4"}, "answer"),
    "alpaca": ("sft", {"instruction": "Add 2 and 2.", "input": "", "output": "4"}, "output"),
    "arithmetic-sft": ("sft", {"prompt": "2+2=", "answer": "4", "reference": "4"}, "answer"),
    "tiny-preference/train": ("rm", {"prompt": "2+2=", "answer": "4", "other_answer": "5", "better": 0}, "answer"),
    "PKU-SafeRLHF/train": ("rm", {"prompt": "hi", "response_0": "a", "response_1": "b", "better_response_id": 0,
                                  "safer_response_id": 1, "is_response_0_safe": True, "is_response_1_safe": True},
                           "response_0"),
    "tiny-prompts/train": ("ppo", {"prompt": "2+2="}, "prompt"),
    "gsm8k/train": ("ppo", {"question": "2+2?", "answer": "2+2=4\n#### 4"}, "question"),
    "prompt-reference": ("ppo", {"prompt": "2+2=", "reference": "4"}, "prompt"),
    "arithmetic-prompts/train": ("ppo", {"prompt": "2+2=", "reference": "4"}, "prompt"),
    "paddlenlp-dpo": ("dpo", {"src": ["2+2="], "tgt": [], "response": ["4", "5"], "sort": [1, 0]}, "src"),
    "prompt-chosen-rejected": ("dpo", {"prompt": "2+2=", "chosen": "4", "rejected": "5"}, "chosen"),
    "prompt-completion-label": ("dpo", {"prompt": "2+2=", "completion": "4", "label": True}, "completion"),
}
LAYOUT_DAMAGES = ("missing", "empty", "not-utf8", "record-not-an-object", "field-of-wrong-type", "last-line-cut")


@dataclass
class SweepCase:
    id: str
    reader: Reader | None
    damage: str
    layout: str = ""


SWEEP = [SweepCase(f"{r.id}-{d}", r, d) for r in READERS for d in r.damages]
SWEEP += [SweepCase(f"layout-{name.replace('/', '-')}-{d}", None, d, name) for name in LAYOUTS for d in LAYOUT_DAMAGES]
assert len({c.id for c in SWEEP}) == len(SWEEP)


# ---------------------------------------------------------------------------------------------
# The source folders the cases copy


def _records_file(path, records, fmt: str) -> None:
    import datasets

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fmt == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    elif fmt == "json":
        with open(path, "w") as f:
            json.dump(records, f)
    else:
        data = datasets.Dataset.from_list(records)
        data.to_csv(path, index=False) if fmt == "csv" else data.to_parquet(path)


@pytest.fixture(scope="module")
def sources(workspace, tiny_dir, tmp_path_factory):
    """The folders the readers' cases copy: the fixture models (BASE, RM), data in every format,
    a model with a fast tokenizer's files, one with paddle pickles, one sharded, a transformers
    folder, one with a chat template, and a finished DPO run with precomputed reference log-probs."""
    from ppo.models import hf
    from ppo.stages.entry import run_entry
    from ppo.storage.tensors import read_tensors, save_sharded

    root = tmp_path_factory.mktemp("reader_sweep")
    paths = {k: v for k, v in workspace.items() if k != "session_stderr"}
    records = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(16)]
    for fmt in ("jsonl", "json", "csv", "parquet"):
        _records_file(str(root / "data" / f"sft.{fmt}"), records, fmt)
    _records_file(str(root / "data" / "folder" / "sft.jsonl"), records, "jsonl")
    paths["DATA"] = root / "data"

    base = tiny_dir / "base"
    paths["FAST"] = root / "fast"
    shutil.copytree(base, paths["FAST"])
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ppo.tiny.task import corpus

    fast = Tokenizer(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.Whitespace()
    fast.train_from_iterator(list(corpus())[:200], trainers.BpeTrainer(vocab_size=100))
    (paths["FAST"] / "tokenizer.json").write_text(fast.to_str())
    (paths["FAST"] / "added_tokens.json").write_text('{"<extra_0>": 100000}\n')

    import paddle

    state = read_tensors(str(base / "model.safetensors"))
    paths["PICKLED"] = root / "pickled"
    shutil.copytree(base, paths["PICKLED"], ignore=shutil.ignore_patterns("*.safetensors"))
    paddle.save(dict(state), str(paths["PICKLED"] / "model_state.pdparams"))
    paths["SHARDED"] = root / "sharded"
    shutil.copytree(base, paths["SHARDED"], ignore=shutil.ignore_patterns("*.safetensors"))
    total = sum(int(v.numel()) * v.element_size() for v in state.values())
    save_sharded(state, str(paths["SHARDED"]), "model", total // 3 + 1, {"format": "np"})
    assert len(list(paths["SHARDED"].glob("model-0000*-of-0000*.safetensors"))) >= 2

    paths["HF"] = root / "hf"
    hf.export_folder(str(base), str(paths["HF"]))
    assert hf.is_hf_folder(str(paths["HF"]))
    paths["HF_SHARDED"] = root / "hf_sharded"
    hf.export_folder(str(base), str(paths["HF_SHARDED"]), shard_size=total // 3 + 1)
    assert (paths["HF_SHARDED"] / "model.safetensors.index.json").is_file()

    paths["CHAT"] = root / "chat"
    shutil.copytree(base, paths["CHAT"])
    (paths["CHAT"] / "chat_template.jinja").write_text(
        "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")

    # a finished DPO run that precomputed its reference log-probs
    paths["DPO_RUN"] = root / "dpo_run"
    config = fill({**base_config("dpo"), "reference_mode": "precompute", "max_steps": 2, "save_steps": 1},
                  {**paths, "OUT": paths["DPO_RUN"]})
    (root / "dpo_run.json").write_text(json.dumps(config))
    run_entry(entry_main("dpo"), [str(root / "dpo_run.json")])
    assert (paths["DPO_RUN"] / "reference_log_probs" / "log_probs.npz").is_file()
    return paths


def _dpo_resume_config(paths: dict) -> dict:
    return {**base_config("dpo"), "reference_mode": "precompute", "max_steps": 3, "save_steps": 1,
            "resume_from_checkpoint": "auto"}


def _rewrite_manifest(checkpoint: str) -> None:
    """The manifest of ``checkpoint`` matching its files as they are now (a crafted checkpoint)."""
    from ppo.storage.manifest import MANIFEST, file_crc32c

    path = os.path.join(checkpoint, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    for rel in list(manifest["files"]):
        file = os.path.join(checkpoint, rel)
        if os.path.isfile(file):
            manifest["files"][rel] = {"size": os.path.getsize(file), "crc32c": file_crc32c(file)}
    with open(path, "w") as f:
        json.dump(manifest, f)


def _rewrite_fingerprint(folder: str) -> None:
    """The DPO reference table's fingerprint holding the CRC-32C of the table as it is now."""
    from ppo.stages.dpo.reference import FINGERPRINT, TABLE
    from ppo.storage.manifest import file_crc32c

    path = os.path.join(folder, FINGERPRINT)
    with open(path) as f:
        record = json.load(f)
    record["table_crc32c"] = file_crc32c(os.path.join(folder, TABLE))
    with open(path, "w") as f:
        json.dump(record, f)


def _layout_file(case: SweepCase, folder) -> str:
    stage, record, field_name = LAYOUTS[case.layout]
    good = json.dumps(record)
    if case.damage in DAMAGES:
        lines = [good, good]
    elif case.damage == "record-not-an-object":
        lines = [good, json.dumps(list(record.values())), good]
    elif case.damage == "field-of-wrong-type":
        lines = [good, json.dumps({**record, field_name: {"text": 4}}), good]
    else:
        lines = [good, good, good[: len(good) // 2]]
    path = os.path.join(str(folder), "data.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    if case.damage in DAMAGES:
        DAMAGES[case.damage](path, "jsonl")
    return path


# ---------------------------------------------------------------------------------------------
# The cases


@pytest.mark.parametrize("case", SWEEP, ids=[c.id for c in SWEEP])
def test_damaged_file_is_one_line(case, sources, workspace, tmp_path, capfd, monkeypatch):
    from ppo.storage import checkpoint
    from ppo.stages.entry import run_entry

    paths = {**sources, "OUT": tmp_path / "out", "MISSING": tmp_path / "missing"}
    reader = case.reader
    stage = reader.stage if reader else LAYOUTS[case.layout][0]
    config = base_config(stage)
    if stage == "dpo" and case.layout == "prompt-completion-label":
        config["loss_type"] = "kto"
    copy = tmp_path / "copy"
    if reader is None:  # a layout's damaged record
        copy.mkdir()
        damaged = _layout_file(case, copy)
        config["train_datasets"] = f"{case.layout}:1:{damaged}"
        if stage == "ppo":
            config["eval_datasets"] = ""
        expect = (damaged,)
    elif reader.source == "CONFIG":
        damaged = str(tmp_path / "config.json")
        expect = (damaged,)
    else:
        source = paths["RM"] if reader.source == "OUT" else paths[reader.source]
        shutil.copytree(source, copy)
        damaged = str(sorted(copy.glob(reader.file))[0] if "*" in reader.file else copy / reader.file)
        expect = reader.says.get(case.damage, (damaged,))
    if reader is not None and reader.in_place:
        paths["OUT"] = copy
        if reader.source == "DPO_RUN":
            config = _dpo_resume_config(paths)
        if reader.source == "OUT":  # the lock a killed run left behind: a run of another host holds it
            (copy / ".run.lock").write_text(json.dumps({"pid": 1, "host": "another-host", "started": 0}))
    out = str(paths["OUT"])
    if not os.path.isdir(out):
        shutil.copytree(workspace["RM"], out)
    config.update(fill(reader.point if reader else {}, {**paths, "COPY": copy}))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(fill(config, paths), indent=1))
    if reader is not None:
        DAMAGES[case.damage](damaged, reader.kind)
        if reader.rewrite == "manifest":
            _rewrite_manifest(os.path.dirname(damaged))
        elif reader.rewrite == "fingerprint":
            _rewrite_fingerprint(os.path.dirname(damaged))
    before = snapshot(out)
    checkpoints = checkpoint.list_checkpoints(out)

    route_log_handlers_to_stderr(monkeypatch, workspace["session_stderr"])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_entry(entry_main(stage), [str(config_file)])
    err = capfd.readouterr().err
    label = (reader.shows or reader.label) if reader and case.damage not in reader.says else ""
    assert_one_line_error(exit_info.value.code, err, (*expect, label), needle="\x00")
    after = snapshot(out)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"files of the output folder changed or vanished: {changed}"
    assert checkpoint.list_checkpoints(out) == checkpoints


# ---------------------------------------------------------------------------------------------
# The lists are whole: a reader without a row fails here

LIBRARY = ("ppo", "rm", "dpo")
# the storage layer's readers and the argument that carries the label of the file they read
READER_FUNCTIONS = {"read_text": 1, "read_json": 1, "read_sentencepiece": 1, "read_pickle": 1,
                    "load_paddle_state": 1, "open_tensors": 1, "read_tensors": 1, "tensor_names": 1,
                    "index_shards": 1, "check_pickle": 1, "reading": 1, "read_tensors_and_json": 1}
READ_LAYER = {"ppo/storage/files.py", "ppo/storage/tensors.py", "ppo/storage/safe_pickle.py"}
# labels covered by other tests (the file is written by the toolkit itself, inside a run's folder)
ELSEWHERE = {
    "online DPO state": "tests/test_dpo.py::test_online_rounds_rank_train_publish_and_resume",
    "online DPO round statistics": "tests/test_dpo.py::test_online_rounds_rank_train_publish_and_resume",
}
# reads outside the storage layer's readers, each with the reason it may be there
RAW_READS = {
    "ppo/models/cpu_gemm.py:open": "/proc/cpuinfo's flags (a system file, not user input; unreadable: no bf16)",
    "ppo/storage/manifest.py:open": "the manifest and the CRC-32C of checkpoint files: rows checkpoint-manifest-*",
    "ppo/storage/manifest.py:json.load": "the manifest: a damaged one is 'unreadable' (rows checkpoint-manifest-*)",
    "ppo/storage/output_dir.py:open": "the lock and metrics.jsonl the toolkit wrote: rows output-dir-lock-*",
    "ppo/storage/output_dir.py:json.load": "the lock: a damaged one counts as held (rows output-dir-lock-*)",
    "ppo/storage/output_dir.py:json.loads": "metrics.jsonl lines, read with errors='replace'; a damaged line is skipped",
    "ppo/stages/dpo/reference.py:np.load": "the reference table, pickles refused: rows dpo-reference-table-*",
    "ppo/data/base.py:open": "the UTF-8 check of a data file before its parser: rows data-*-not-utf8",
    "ppo/data/base.py:load_dataset": "data files and hub datasets through `datasets`: rows data-* and layout-*",
    "ppo/data/base.py:json.loads": "the records of JSON Lines files of mixed types, from read_text",
    "ppo/distributed/offload.py:open": "the offload store's own temporary file, written in this process",
    "ppo/rewards/remote.py:urlopen": "the reward endpoint's answers: tests/test_reward_server.py",
    "ppo/rewards/remote.py:json.loads": "the reward endpoint's answers: tests/test_reward_server.py",
    "rm/server.py:json.loads": "the reward server's requests: tests/test_reward_service.py (BAD_BODIES and the refusals)",
    "ppo/stages/ppo/serving.py:json.loads": "a resource pool's messages from the actor's pool of the same launch "
                                            "(the generation settings, the final model's state): written by this "
                                            "toolkit's ppo/stages/ppo/pools.py, never a file",
    "ppo/tiny/evaluate.py:open": "the demo's own evaluation files",
    "ppo/tiny/evaluate.py:json.loads": "the demo's own evaluation files",
    "ppo/tiny/pipeline.py:open": "the demo reads the metrics its own runs wrote",
    "ppo/tiny/pipeline.py:json.loads": "the demo reads the metrics its own runs wrote",
}
RAW_CALLS = {"open", "json.load", "json.loads", "np.load", "numpy.load", "paddle.load", "pickle.load", "pickle.loads",
             "safe_open", "load_dataset", "urlopen", "torch.load"}


def _library_files():
    for top in LIBRARY:
        for root, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    yield os.path.relpath(path, ROOT), ast.parse(open(path, encoding="utf-8").read())


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        inner = func.value
        prefix = inner.id if isinstance(inner, ast.Name) else (inner.attr if isinstance(inner, ast.Attribute) else "")
        return f"{prefix}.{func.attr}" if prefix in ("json", "np", "numpy", "paddle", "pickle", "torch") else func.attr
    return ""


def _label(node: ast.Call, position: int):
    """The label argument of a reader call: its text (the constant head of an f-string), or None
    when it forwards a variable (a reader of the storage layer passing its caller's label on)."""
    arg = node.args[position] if len(node.args) > position else next(
        (k.value for k in node.keywords if k.arg == "what"), None)
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return arg.values[0].value.split("'")[0].strip()
    return None


def _is_write(node: ast.Call) -> bool:
    mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and any(c in mode.value for c in "wax")


def test_every_reader_label_has_a_row():
    import re

    labels, uncovered = set(), []
    for rel, tree in _library_files():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _call_name(node) in READER_FUNCTIONS:
                label = _label(node, READER_FUNCTIONS[_call_name(node)])
                if label is not None:
                    labels.add(label)
    covered = {r.label for r in READERS} | {w for r in READERS for w in r.wraps} | set(ELSEWHERE)
    uncovered = sorted(labels - covered)
    assert not uncovered, f"readers without a row in READERS (or ELSEWHERE): {uncovered}"
    for label, test in ELSEWHERE.items():
        file, name = test.split("::")
        assert re.search(rf"^def {name}\(", open(os.path.join(ROOT, file)).read(), re.M), f"{label}: {test} is gone"
    assert labels, "the scan found no reader calls"


def test_every_raw_read_is_listed():
    found = set()
    for rel, tree in _library_files():
        if rel in READ_LAYER:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _call_name(node)
                if name in RAW_CALLS and not (name == "open" and _is_write(node)):
                    found.add(f"{rel}:{name}")
    assert not sorted(found - set(RAW_READS)), f"reads outside the storage layer, not listed: {sorted(found - set(RAW_READS))}"
    assert not sorted(set(RAW_READS) - found), f"listed reads that no longer exist: {sorted(set(RAW_READS) - found)}"
