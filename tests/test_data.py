"""Data layer: registry, specs, loaders, mixing, tokenization rules and collators."""

import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import paddle
import pytest

from ppo.data import (
    DEFAULT_FOLLOW_TEMPLATE,
    DEFAULT_TEMPLATE,
    DatasetSpec,
    PreferenceDataset,
    PromptOnlyDataset,
    PromptTemplate,
    RawDataset,
    SupervisedDataset,
    encode_prompt,
    ensure_pad_token,
    import_user_modules,
    load_records,
    mix_indices,
    parse_dataset_spec,
)
from ppo.core.errors import UserError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DATA = TESTS / "data"
PKU = DATA / "pku_saferlhf"
TINY_DATA = ROOT / "ppo" / "tiny" / "data"


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def registry():
    """Restores the dataset registry (and drops user modules) after a test that registers classes."""
    saved = dict(RawDataset._registry)
    yield
    RawDataset._registry.clear()
    RawDataset._registry.update(saved)
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) and Path(module.__file__).name == "user_datasets.py":
            del sys.modules[name]


def register(name, samples, aliases=()):
    """A RawDataset subclass serving ``samples`` under ``name``."""

    class ListDataset(RawDataset):
        NAME = name
        ALIASES = aliases

        def __init__(self, path=None):
            self.samples = list(samples)

        def __getitem__(self, index):
            return self.samples[index]

        def __len__(self):
            return len(self.samples)

    return ListDataset


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def eos_pad_tok(tmp_path_factory):
    """The tiny tokenizer without a pad token, given pad = eos by ensure_pad_token."""
    from paddlenlp.transformers import AutoTokenizer

    from ppo.tiny.build import build_tokenizer

    out = tmp_path_factory.mktemp("nopad")
    build_tokenizer(str(out), with_pad=False)
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(str(out)))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    return tokenizer


def ids_of(tok, text, special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Registry


BUILTIN = ["PKU-SafeRLHF/train", "PKU-SafeRLHF/test", "PKU-SafeRLHF-30K/train", "PKU-SafeRLHF-30K/test",
           "PKU-SafeRLHF-10K/train", "alpaca", "tiny-sft", "tiny-preference/train", "tiny-preference/test",
           "tiny-prompts/train", "tiny-prompts/eval"]


def test_builtin_names_registered():
    names = RawDataset.names()
    assert set(BUILTIN) <= set(names)
    assert names == sorted(names)
    assert "tatsu-lab/alpaca" not in names  # aliases resolve but are not listed
    assert RawDataset._registry["tatsu-lab/alpaca"] is RawDataset._registry["alpaca"]
    assert RawDataset._registry["PKU-Alignment/PKU-SafeRLHF/train"] is RawDataset._registry["PKU-SafeRLHF/train"]


def test_duplicate_name_names_both_classes(registry):
    with pytest.raises(UserError) as e:
        register("tiny-sft", [])
    message = str(e.value)
    assert "'tiny-sft'" in message and "ppo.data.tiny.TinySFT" in message
    assert "test_data.register.<locals>.ListDataset" in message
    with pytest.raises(UserError, match="'tatsu-lab/alpaca'.*ppo.data.alpaca.Alpaca"):
        register("fresh-name", [], aliases=("tatsu-lab/alpaca",))
    assert "fresh-name" not in RawDataset.names()  # a rejected class registers nothing


def test_aliases_and_invalid_names(registry):
    cls = register("aliased", [{"input": "hi"}], aliases=("alias-one", "alias-two"))
    assert isinstance(RawDataset.load("alias-two"), cls)
    assert "aliased" in RawDataset.names() and "alias-one" not in RawDataset.names()
    for bad in ["has:colon", "a,b", "", " padded"]:
        with pytest.raises(UserError, match="invalid NAME"):
            register(bad, [])


def test_unknown_name_lists_names_and_suggests():
    with pytest.raises(UserError) as e:
        RawDataset.load("tiny-sfft")
    message = str(e.value)
    assert "unknown dataset 'tiny-sfft'" in message and "did you mean 'tiny-sft'" in message
    assert ", ".join(RawDataset.names()) in message
    assert "\n" not in message


def test_load_checks_the_class(registry):
    class NoLen(RawDataset):
        NAME = "no-len"

        def __getitem__(self, index):
            return {}

    class NoPath(RawDataset):
        NAME = "no-path"

        def __init__(self):
            pass

        def __getitem__(self, index):
            return {"input": "x"}

        def __len__(self):
            return 1

    register("empty-one", [])
    with pytest.raises(UserError, match="'no-len'.*does not define __len__"):
        RawDataset.load("no-len")
    assert len(RawDataset.load("no-path")) == 1
    with pytest.raises(UserError, match="'no-path'.*takes no path.*'/some/where'"):
        RawDataset.load("no-path", "/some/where")
    with pytest.raises(UserError, match="dataset 'empty-one' has no samples"):
        RawDataset.load("empty-one")


# ---------------------------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize("spec, expected", [
    ("tiny-sft", [DatasetSpec("tiny-sft", 1.0, None)]),
    ("a:0.5,b", [DatasetSpec("a", 0.5), DatasetSpec("b", 1.0)]),
    (" a : 2.5 , b:1:/data/x.jsonl ", [DatasetSpec("a", 2.5), DatasetSpec("b", 1.0, "/data/x.jsonl")]),
    ("a:1:C:/data/x:y.json", [DatasetSpec("a", 1.0, "C:/data/x:y.json")]),  # split at most twice
    ("a::/data/x", [DatasetSpec("a", 1.0, "/data/x")]),  # empty proportion keeps the default
    (["a:0.5", "b:3,c"], [DatasetSpec("a", 0.5), DatasetSpec("b", 3.0), DatasetSpec("c")]),
    ([("a",), ("b", 0.25), ("c", 2, "/p")], [DatasetSpec("a"), DatasetSpec("b", 0.25), DatasetSpec("c", 2.0, "/p")]),
])
def test_parse_spec(spec, expected):
    assert parse_dataset_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "  ", ",", "a,,b", ":0.5", "a:x", "a:0", "a:-1", "a:nan", "a:inf",
                                  [], [("a", "zero")], [("a", 1, 2, 3)], 42])
def test_parse_spec_rejects(spec):
    with pytest.raises(UserError) as e:
        parse_dataset_spec(spec)
    message = str(e.value)
    assert repr(spec) in message and "NAME[:PROPORTION[:PATH]]" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# Loaders on the sample files


def pku_expected(record):
    return dict(input=record["prompt"], answer=record["response_0"], other_answer=record["response_1"],
                better=record["better_response_id"] == 0, safer=record["safer_response_id"] == 0,
                is_safe=record["is_response_0_safe"], is_other_safe=record["is_response_1_safe"])


@pytest.mark.parametrize("name, path", [
    ("PKU-SafeRLHF/train", PKU), ("PKU-SafeRLHF/test", PKU),
    ("PKU-SafeRLHF-30K/train", DATA / "pku_saferlhf_30k.jsonl"),
    ("PKU-SafeRLHF-10K/train", PKU / "train.jsonl"),
    ("PKU-Alignment/PKU-SafeRLHF-30K/test", PKU / "test.jsonl"),
])
def test_pku_saferlhf_mapping(name, path):
    split = name.rsplit("/", 1)[1]
    file = path / f"{split}.jsonl" if path.is_dir() else path
    records = read_jsonl(file)
    dataset = RawDataset.load(name, str(path))
    assert len(dataset) == len(records)
    for i, record in enumerate(records):
        sample = dataset[i]
        expected = pku_expected(record)
        assert sample == expected, i
        assert sample["better"] is (record["better_response_id"] == 0)
    assert any(not dataset[i]["better"] for i in range(len(dataset)))


def test_alpaca_mapping():
    with open(DATA / "alpaca.json", encoding="utf-8") as f:
        records = json.load(f)
    dataset = RawDataset.load("alpaca", str(DATA / "alpaca.json"))
    assert len(dataset) == len(records)
    assert any(r["input"] == "" for r in records) and any(r["input"] for r in records)
    for i, record in enumerate(records):
        prompt = record["instruction"] if not record["input"] else record["instruction"] + "\n\n" + record["input"]
        assert dataset[i] == {"input": prompt, "answer": record["output"]}
    assert dataset[1]["input"] == "Translate the sentence into French.\n\nThe cat sleeps."


@pytest.mark.parametrize("name, file, fields", [
    ("tiny-sft", "sft.jsonl", {"input": "prompt", "answer": "answer"}),
    ("tiny-preference/train", "preference_train.jsonl",
     {"input": "prompt", "answer": "answer", "other_answer": "other_answer", "better": "better"}),
    ("tiny-preference/test", "preference_test.jsonl",
     {"input": "prompt", "answer": "answer", "other_answer": "other_answer", "better": "better"}),
    ("tiny-prompts/train", "prompts_train.jsonl", {"input": "prompt"}),
    ("tiny-prompts/eval", "prompts_eval.jsonl", {"input": "prompt"}),
])
def test_tiny_mapping(name, file, fields, tmp_path):
    records = read_jsonl(TINY_DATA / file)
    dataset = RawDataset.load(name)
    assert len(dataset) == len(records)
    for i in (0, 1, len(records) - 1):
        assert dataset[i] == {key: records[i][field] for key, field in fields.items()}
    # The path overrides the built-in folder: a folder with the same file names, or one file.
    (tmp_path / file).write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n")
    assert len(RawDataset.load(name, str(tmp_path))) == 3
    assert len(RawDataset.load(name, str(tmp_path / file))) == 3


def test_local_formats(tmp_path):
    import datasets

    records = read_jsonl(PKU / "train.jsonl")
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "x.parquet"))
    table.to_csv(str(tmp_path / "x.csv"), index=False)
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records))
    datasets.DatasetDict({"train": table, "test": table.select([0, 1])}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    table.select([0, 1, 2]).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet"))
    table.select([3]).to_parquet(str(tmp_path / "hub" / "data" / "train-00001-of-00002.parquet"))
    for path, split, expected in [("x.parquet", None, records), ("x.csv", None, records),
                                  ("lines.json", None, records), ("saved", "train", records),
                                  ("saved", "test", records[:2]), ("hub", "train", records[:4])]:
        assert load_records(str(tmp_path / path), split) == expected, path
    assert [s["input"] for s in RawDataset.load("PKU-SafeRLHF/test", str(tmp_path / "saved"))] == \
        [r["prompt"] for r in records[:2]]
    with pytest.raises(UserError, match=r"'.*saved' has no split 'validation'; it has: test, train"):
        load_records(str(tmp_path / "saved"), "validation")


def test_bad_files_name_the_file(tmp_path):
    missing = DATA / "bad" / "missing_field.jsonl"
    with pytest.raises(UserError) as e:
        RawDataset.load("PKU-SafeRLHF/train", str(missing))
    message = str(e.value)
    assert str(missing) in message and "record 1 is missing field(s) 'response_1'" in message
    assert "expected fields: prompt, response_0, response_1, better_response_id" in message

    for file, what in [("empty.jsonl", "is empty"), ("not_json.jsonl", "could not be read as json")]:
        with pytest.raises(UserError) as e:
            RawDataset.load("alpaca", str(DATA / "bad" / file))
        assert f"dataset file '{DATA / 'bad' / file}' {what}" in str(e.value)
        assert "\n" not in str(e.value)

    with pytest.raises(UserError, match="dataset path '/no/such/file.jsonl' does not exist"):
        RawDataset.load("alpaca", "/no/such/file.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="notes.txt' has an unsupported extension"):
        load_records(str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match=r"dataset folder '.*' has no 'train' data; expected train.jsonl.*notes.txt"):
        load_records(str(tmp_path), "train")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(UserError, match="holds no records"):
        load_records(str(tmp_path / "list.json"))
    (tmp_path / "typed.jsonl").write_text(json.dumps(dict(read_jsonl(PKU / "train.jsonl")[0], better_response_id=2)))
    with pytest.raises(UserError, match="typed.jsonl' record 0 field 'better_response_id' is 2; expected 0 or 1"):
        RawDataset.load("PKU-SafeRLHF/train", str(tmp_path / "typed.jsonl"))


def test_hub_failure_suggests_a_local_path(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'PKU-Alignment/PKU-SafeRLHF' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as e:
        RawDataset.load("PKU-SafeRLHF/train")
    message = str(e.value)
    assert "'PKU-Alignment/PKU-SafeRLHF' (split 'train')" in message and "ConnectionError" in message
    assert "'PKU-SafeRLHF/train:1.0:/path/to/file-or-folder'" in message


# ---------------------------------------------------------------------------------------------
# Mixing and splitting


def test_mix_indices_exact_and_seeded():
    assert mix_indices(10, 1.0, 0) == list(range(10))
    half = mix_indices(10, 0.5, 0)
    assert len(half) == 5 and len(set(half)) == 5
    more = mix_indices(10, 2.5, 0)
    counts = Counter(more)
    assert len(more) == 25 and set(counts.values()) <= {2, 3} and sum(c == 3 for c in counts.values()) == 5
    assert mix_indices(1000, 0.3, 7) == mix_indices(1000, 0.3, 7)
    assert mix_indices(1000, 0.3, 7) != mix_indices(1000, 0.3, 8)
    assert mix_indices(3, 0.1, 0) == []


@pytest.mark.parametrize("proportion, count", [(0.5, 100), (1, 200), (2.5, 500)])
def test_mixing_counts(tok, proportion, count):
    data = PreferenceDataset(f"tiny-preference/test:{proportion}", tok, 128)
    assert len(data) == count
    per_pair = Counter(tuple(item["better_input_ids"] + [-1] + item["worse_input_ids"]) for item in data)
    if proportion == 2.5:
        assert sum(per_pair.values()) == 500 and sum(c == 3 for c in per_pair.values()) == 100


def test_mixing_reproducible_and_spec_ordered(tok):
    spec = "tiny-preference/test:0.5,tiny-prompts/eval:0.5"
    a = PromptOnlyDataset(spec, tok, 128, seed=1)
    b = PromptOnlyDataset(spec, tok, 128, seed=1)
    c = PromptOnlyDataset(spec, tok, 128, seed=2)
    assert a.data == b.data and a.data != c.data
    sft = SupervisedDataset("tiny-preference/test:0.3,tiny-sft:0.01", tok, 128, seed=3)
    assert len(sft) == 60 + 20
    # Entry i draws with seed + i, and entries keep the spec's order.
    pref, plain = RawDataset.load("tiny-preference/test"), RawDataset.load("tiny-sft")
    expected = ([pref[j]["answer"] for j in mix_indices(200, 0.3, 3)]
                + [plain[j]["answer"] for j in mix_indices(2000, 0.01, 4)])
    for item, answer in zip(sft.data, expected, strict=True):
        answer_ids = ids_of(tok, " " + answer, special=False) + [tok.eos_token_id]
        assert item["input_ids"][-len(answer_ids):] == answer_ids


def test_split_sizes_and_disjoint(tok):
    data = SupervisedDataset("tiny-preference/test", tok, 128)
    train, held = data.split(0.1)
    assert (len(train), len(held)) == (180, 20)
    assert set(train.indices).isdisjoint(held.indices) and set(train.indices) | set(held.indices) == set(range(200))
    assert train[0] is data[train.indices[0]]
    assert data.split(0.1)[1].indices == held.indices
    assert data.split(0.1, seed=5)[1].indices != held.indices
    assert len(data.split(0.0)[1]) == 0 and len(data.split(0.001)[1]) == 1
    assert held.get_collator()([held[0]])["input_ids"].shape[0] == 1
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"eval_split_ratio=.* for 'tiny-preference/test' is outside \[0, 1\)"):
            data.split(bad)


# ---------------------------------------------------------------------------------------------
# Templates and tokenization rules


def test_template_default_and_custom(tok):
    prompt = "Tell me about the cat."
    ids, trainable = encode_prompt(tok, PromptTemplate(), prompt)
    assert ids == ids_of(tok, DEFAULT_TEMPLATE.format(input=prompt)) and ids[0] == tok.bos_token_id
    assert not any(trainable)
    custom = PromptTemplate(first="Question: {input}\nAnswer:")
    assert encode_prompt(tok, custom, prompt)[0] == ids_of(tok, f"Question: {prompt}\nAnswer:")
    sft = SupervisedDataset("tiny-sft:0.001", tok, 128, template="Q: {input} A:")
    first = RawDataset.load("tiny-sft")[mix_indices(2000, 0.001, 42)[0]]
    assert sft[0]["input_ids"][:len(ids_of(tok, f"Q: {first['input']} A:"))] == ids_of(tok, f"Q: {first['input']} A:")


@pytest.mark.parametrize("template, match", [
    ("no placeholder", "has no {input} placeholder"),
    ("{other} {input}", "not a valid format string"),
    ("{input", "not a valid format string"),
    (None, "is a NoneType"),
])
def test_template_rejects(template, match):
    with pytest.raises(UserError, match=match):
        PromptTemplate(first=template)
    with pytest.raises(UserError, match=match):
        PromptTemplate(follow=template)


def test_dialogue_prompt_matches_whole_text(tok):
    turns = ["Tell me about the cat.", "The cat is calm.", "And the dog?"]
    ids, trainable = encode_prompt(tok, PromptTemplate(), turns)
    text = (DEFAULT_TEMPLATE.format(input=turns[0]) + " " + turns[1] + tok.eos_token
            + DEFAULT_FOLLOW_TEMPLATE.format(input=turns[2]))
    # The tokenizer parses '</s>' in text as the eos token, so the whole text gives the same ids.
    assert ids == ids_of(tok, text)
    assert ids.count(tok.eos_token_id) == 1
    start = len(ids_of(tok, DEFAULT_TEMPLATE.format(input=turns[0])))
    end = len(ids_of(tok, DEFAULT_TEMPLATE.format(input=turns[0]) + " " + turns[1] + tok.eos_token))
    assert trainable == [start <= k < end for k in range(len(ids))]


def test_supervised_labels_position_by_position(tok, registry):
    dialogue = ["Tell me about the cat.", "The cat is calm.", "And the dog?"]
    register("sft-cases", [{"input": "Describe the river in a few words.", "answer": "The river is calm."},
                           {"input": dialogue, "answer": "The dog is kind."}])
    data = SupervisedDataset("sft-cases", tok, 128)
    eos = tok.eos_token_id
    first = DEFAULT_TEMPLATE.format(input=dialogue[0])
    # Independent construction: boundaries from tokenizing growing prefixes of the whole text.
    cases = [
        [(DEFAULT_TEMPLATE.format(input="Describe the river in a few words."), False),
         (" The river is calm.</s>", True)],
        [(first, False), (" The cat is calm.</s>", True), (DEFAULT_FOLLOW_TEMPLATE.format(input="And the dog?"), False),
         (" The dog is kind.</s>", True)],
    ]
    for item, pieces in zip(data.data, cases):
        text, expected_labels, previous = "", [], 0
        for piece, trained in pieces:
            text += piece
            ids = ids_of(tok, text)
            expected_labels += ids[previous:] if trained else [-100] * (len(ids) - previous)
            previous = len(ids)
        assert item["input_ids"] == ids_of(tok, text)
        assert item["labels"] == expected_labels
        assert item["input_ids"][-1] == eos and item["labels"][-1] == eos  # eos appended and trained
    # Truncation cuts the answer on the right; labels stay aligned.
    short = SupervisedDataset("sft-cases", tok, 20)
    assert short[0]["input_ids"] == data[0]["input_ids"][:20] and short[0]["labels"] == data[0]["labels"][:20]


def test_eos_appended_to_every_answer(tok):
    data = PreferenceDataset("tiny-preference/test:0.2", tok, 128)
    assert all(item["better_input_ids"][-1] == tok.eos_token_id and item["worse_input_ids"][-1] == tok.eos_token_id
               for item in data)
    sft = SupervisedDataset("tiny-sft:0.05", tok, 128)
    assert all(item["input_ids"][-1] == tok.eos_token_id and item["input_ids"].count(tok.eos_token_id) == 1
               for item in sft)


def test_preference_order_follows_better(tok):
    records = read_jsonl(PKU / "train.jsonl")
    data = PreferenceDataset(f"PKU-SafeRLHF/train:1:{PKU}", tok, 256)
    kept = [r for r in records if r["response_0"] != r["response_1"]]
    assert len(data) == len(kept) == len(records) - 1
    for item, record in zip(data.data, kept):
        prompt = ids_of(tok, DEFAULT_TEMPLATE.format(input=record["prompt"]))
        answers = [ids_of(tok, " " + record[f"response_{k}"], special=False) + [tok.eos_token_id] for k in (0, 1)]
        better = record["better_response_id"]
        assert item["better_input_ids"] == prompt + answers[better]
        assert item["worse_input_ids"] == prompt + answers[1 - better]


# ---------------------------------------------------------------------------------------------
# Collators


def test_prompt_collator_left_pads(tok, registry):
    register("prompt-cases", [{"input": "Tell me about the cat."}, {"input": "Describe the mountain in a few words."}])
    data = PromptOnlyDataset("prompt-cases", tok, 128)
    lengths = [len(item["input_ids"]) for item in data]
    batch = data.get_collator()(list(data))
    T = max(lengths)
    assert batch["input_ids"].shape == [2, T] and batch["attention_mask"].shape == [2, T]
    assert all(t.dtype == paddle.int64 for t in batch.values())
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    for row, item in enumerate(data):
        n = len(item["input_ids"])
        assert ids[row, T - n:].tolist() == item["input_ids"]
        assert (ids[row, :T - n] == tok.pad_token_id).all()
        assert mask[row].tolist() == [0] * (T - n) + [1] * n


def test_preference_collator_pads_both_sides_to_one_length(tok):
    data = PreferenceDataset("tiny-preference/test:0.05", tok, 128)
    items = list(data)[:4]
    batch = data.get_collator()(items)
    T = max(len(s) for item in items for s in (item["better_input_ids"], item["worse_input_ids"]))
    for side in ("better", "worse"):
        ids, mask = batch[f"{side}_input_ids"].numpy(), batch[f"{side}_attention_mask"].numpy()
        assert ids.shape == mask.shape == (4, T) and ids.dtype == np.int64 and mask.dtype == np.int64
        for row, item in enumerate(items):
            n = len(item[f"{side}_input_ids"])
            assert ids[row, :n].tolist() == item[f"{side}_input_ids"] and (ids[row, n:] == tok.pad_token_id).all()
            assert mask[row].tolist() == [1] * n + [0] * (T - n)


def test_supervised_collator_right_pads_labels(tok):
    data = SupervisedDataset("tiny-sft:0.002", tok, 128)
    batch = data.get_collator()(list(data))
    T = max(len(item["input_ids"]) for item in data)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == [4, T]
    for row, item in enumerate(data):
        n = len(item["input_ids"])
        assert batch["labels"].numpy()[row].tolist() == item["labels"] + [-100] * (T - n)
        assert batch["attention_mask"].numpy()[row].tolist() == [1] * n + [0] * (T - n)


def test_masks_from_lengths_when_pad_is_eos(eos_pad_tok, registry):
    register("eos-cases", [
        {"input": "Tell me about the cat.", "answer": "The cat is calm.", "other_answer": "The cat is rude and cold.",
         "better": True},
        {"input": "Describe the mountain in a few words.", "answer": "The mountain is calm, kind and warm.",
         "other_answer": "The mountain is cold.", "better": False},
    ])
    eos = eos_pad_tok.eos_token_id
    sft = SupervisedDataset("eos-cases", eos_pad_tok, 128)
    batch = {k: v.numpy() for k, v in sft.get_collator()(list(sft)).items()}
    for row, item in enumerate(sft):
        n = len(item["input_ids"])
        assert batch["input_ids"][row, n - 1] == eos  # the real eos ending the answer...
        assert batch["attention_mask"][row, n - 1] == 1 and batch["labels"][row, n - 1] == eos  # ...stays visible
        assert (batch["attention_mask"][row, n:] == 0).all() and (batch["labels"][row, n:] == -100).all()
    assert (batch["input_ids"] == eos).sum() > 2  # the short row is padded with eos ids
    pref = PreferenceDataset("eos-cases", eos_pad_tok, 128)
    batch = {k: v.numpy() for k, v in pref.get_collator()(list(pref)).items()}
    for side in ("better", "worse"):
        lengths = [len(item[f"{side}_input_ids"]) for item in pref]
        assert batch[f"{side}_attention_mask"].sum(axis=1).tolist() == lengths
        assert all(batch[f"{side}_input_ids"][row, n - 1] == eos for row, n in enumerate(lengths))
    prompts = PromptOnlyDataset("eos-cases", eos_pad_tok, 128)
    batch = prompts.get_collator()(list(prompts))
    assert batch["attention_mask"].numpy().sum(axis=1).tolist() == [len(item["input_ids"]) for item in prompts]


def test_dataloader_batches(tok):
    data = SupervisedDataset("tiny-sft:0.004", tok, 64)
    loader = paddle.io.DataLoader(data, batch_size=3, shuffle=False, collate_fn=data.get_collator())
    shapes = [batch["input_ids"].shape[0] for batch in loader]
    assert shapes == [3, 3, 2]


# ---------------------------------------------------------------------------------------------
# Skips, warnings and errors while tokenizing


def test_prompt_dedup_keeps_first(tok, registry, caplog):
    register("dupes", [{"input": "b"}, {"input": "a"}, {"input": "b"}, {"input": ["u", "x", "v"]},
                       {"input": ["u", "x", "v"]}, {"input": "c"}])
    data = PromptOnlyDataset("dupes:2", tok, 128)
    expected = [ids_of(tok, DEFAULT_TEMPLATE.format(input=x)) for x in ("b", "a")]
    expected.append(encode_prompt(tok, PromptTemplate(), ["u", "x", "v"])[0])
    expected.append(ids_of(tok, DEFAULT_TEMPLATE.format(input="c")))
    assert [item["input_ids"] for item in data] == expected
    assert data.counts["duplicate"] == 8


def test_identical_pairs_skipped_with_one_warning(tok, registry, caplog):
    pairs = [{"input": f"q{i}", "answer": "same", "other_answer": "same" if i < 3 else "other", "better": True}
             for i in range(5)]
    register("pairs", pairs)
    with caplog.at_level(logging.WARNING, logger="ppo.data"):
        data = PreferenceDataset("pairs", tok, 128)
    assert len(data) == 2 and data.counts["identical"] == 3
    warnings = [r for r in caplog.records if "identical" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 3 of 5 pairs of 'pairs'" in warnings[0].getMessage()
    register("all-same", pairs[:3])
    with pytest.raises(UserError, match="all 3 pairs of 'all-same' have identical answers"):
        PreferenceDataset("all-same", tok, 128)


def test_long_prompts_left_truncated_with_one_warning(tok, registry, caplog):
    long_prompt = " ".join(["Describe the cat and the dog and the river."] * 6)
    register("long", [{"input": long_prompt, "answer": "The cat is calm."}, {"input": "hi", "answer": "ok"},
                      {"input": long_prompt + " again", "answer": "The dog is kind."}])
    full = ids_of(tok, DEFAULT_TEMPLATE.format(input=long_prompt))
    assert len(full) > 40
    with caplog.at_level(logging.WARNING, logger="ppo.data"):
        data = PromptOnlyDataset("long", tok, 40)
    assert data[0]["input_ids"] == full[-40:]
    assert data[1]["input_ids"] == ids_of(tok, DEFAULT_TEMPLATE.format(input="hi"))
    assert data.counts["truncated"] == 2
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert messages == [
        "2 of 3 prompts of 'long' are longer than max_length=40 tokens; kept the last 40 tokens of each"]
    # With an answer to train on, a prompt that fills max_length leaves nothing: the sample is skipped.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ppo.data"):
        sft = SupervisedDataset("long", tok, 40)
    assert len(sft) == 1 and sft.counts["too_long"] == 2
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "skipped 2 of 3 samples of 'long': the prompt alone fills max_length=40 tokens, leaving no room for the answer"]
    with pytest.raises(UserError, match=r"'long:1' gives no samples after tokenization \(3 too long\); .*max_length=5"):
        SupervisedDataset([("long", 1)], tok, 5)


def test_bad_samples_name_the_dataset_and_index(tok, registry):
    register("bad-input", [{"input": "ok", "answer": "a"}, {"input": ["u", "a"], "answer": "b"}])
    with pytest.raises(UserError, match=r"dataset 'bad-input' sample 1 field 'input' is list .*odd length"):
        SupervisedDataset("bad-input", tok, 64)
    register("no-answer", [{"input": "ok"}])
    with pytest.raises(UserError, match=r"dataset 'no-answer' sample 0 has no field\(s\) 'answer', 'other_answer', "
                                        r"'better'; PreferenceDataset needs input, answer, other_answer, better"):
        PreferenceDataset("no-answer", tok, 64)
    register("not-dict", [("q", "a")])
    with pytest.raises(UserError, match="dataset 'not-dict' sample 0 is a tuple"):
        PromptOnlyDataset("not-dict", tok, 64)
    register("three", [{"input": "a"}, {"input": "b"}, {"input": "c"}])
    with pytest.raises(UserError, match="'three:0.1' selects no samples"):
        PromptOnlyDataset("three:0.1", tok, 64)
    with pytest.raises(UserError, match="max_length=0"):
        PromptOnlyDataset("tiny-prompts/eval", tok, 0)


def test_ensure_pad_token(tmp_path, caplog):
    from paddlenlp.transformers import AutoTokenizer

    from ppo.tiny.build import build_tokenizer

    build_tokenizer(str(tmp_path), with_pad=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer.pad_token_id is None
    with caplog.at_level(logging.WARNING, logger="ppo.data"):
        assert ensure_pad_token(tokenizer) is tokenizer
        ensure_pad_token(tokenizer)  # already fixed: silent
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("ppo.data")]
    assert len(warnings) == 1 and "no pad token" in warnings[0] and "sequence lengths" in warnings[0]

    class Bare:
        name_or_path = "/models/bare"
        pad_token_id = eos_token_id = eos_token = None

    with pytest.raises(UserError) as e:
        ensure_pad_token(Bare())
    assert str(e.value) == ("tokenizer at '/models/bare' has neither a pad nor an eos token; add one "
                            "(e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'})) and save it")


# ---------------------------------------------------------------------------------------------
# User modules


def test_user_module_by_path(tok, registry, monkeypatch):
    monkeypatch.chdir(ROOT)
    import_user_modules(["tests/user_datasets.py"])
    import_user_modules(["tests/user_datasets.py"])  # a second import is harmless
    raw = RawDataset.load("my-dataset-name")
    assert len(raw) == 10 and raw[1]["better"] is False
    data = PreferenceDataset("my-dataset-name:0.5,tiny-preference/train:0.01", tok, 128)
    assert len(data) == 5 + 20
    picked = mix_indices(10, 0.5, 42)
    for item, index in zip(data.data[:5], picked):
        prompt = raw[index]["input"]
        topic = prompt.removeprefix("Tell me about the ").rstrip(".")
        assert tok.decode(item["better_input_ids"]).endswith(f"{prompt} ASSISTANT: The {topic} is kind and warm.</s>")
        assert tok.decode(item["worse_input_ids"]).endswith(f"{prompt} ASSISTANT: The {topic} is rude and cold.</s>")


def test_user_module_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="extra module file 'nowhere/mine.py' does not exist"):
        import_user_modules(["nowhere/mine.py"])
    with pytest.raises(UserError, match="extra module 'no_such_module_xyz' cannot be imported"):
        import_user_modules("no_such_module_xyz")
    broken = tmp_path / "broken_module.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match=f"importing extra module '{broken}' failed: RuntimeError: boom"):
        import_user_modules([str(broken)])
    assert "broken_module" not in sys.modules
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fine_module.py").write_text("VALUE = 3\n")
    assert import_user_modules("fine_module, ")[0].VALUE == 3


def test_decode_without_special_equals_the_tokenizers_own_decode(tiny_dir):
    """The fast decode of rollout, scoring and evaluation gives exactly ``decode(ids,
    skip_special_tokens=True)``: random rows over the whole vocabulary with the special ids (bos,
    eos, unk, an added special token) and an added plain token mixed in."""
    import numpy as np
    from paddlenlp.transformers import AutoTokenizer

    from ppo.data.tokenizer_utils import decode_without_special

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<extra>"]})
    tokenizer.add_tokens(["plainword"])
    special = set(tokenizer.all_special_ids)
    assert len(special) >= 4
    rng = np.random.default_rng(0)
    vocab = len(tokenizer)
    rows = [list(rng.integers(0, vocab, rng.integers(0, 40))) for _ in range(200)]
    rows += [sorted(special) * 2, [], [tokenizer.convert_tokens_to_ids("plainword")] * 3]
    assert any(set(r) & special for r in rows[:200])
    want = [tokenizer.decode([int(t) for t in r], skip_special_tokens=True) for r in rows]
    assert decode_without_special(tokenizer, rows) == want
    # and special ids do get dropped (without skipping they decode to text)
    assert tokenizer.decode(sorted(special), skip_special_tokens=False) != want[-3] == ""
