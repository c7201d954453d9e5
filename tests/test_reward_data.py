"""Data with references: RawSample.reference, PromptOnlyDataset.references, gsm8k, prompt-reference
and the arithmetic task's generated data."""

import json
import re

import pytest

from ppo.data import PromptOnlyDataset, RawDataset, SupervisedDataset
from ppo.data.template import DEFAULT_TEMPLATE
from ppo.core.errors import UserError
from ppo.rewards import RewardFunction
from ppo.tiny import arithmetic

GSM8K_TRAIN = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A shop sold 1234 pens. How many?", "answer": "It sold 1,234 pens.\n#### 1,234"},
]
GSM8K_TEST = [{"question": "What is 2 - 7?", "answer": "2 - 7 = -5\n#### -5"}]


@pytest.fixture
def registry():
    saved = dict(RawDataset._registry)
    yield
    RawDataset._registry.clear()
    RawDataset._registry.update(saved)


def register(name, samples):
    class ListDataset(RawDataset):
        NAME = name

        def __init__(self, path=None):
            self.samples = list(samples)

        def __getitem__(self, index):
            return self.samples[index]

        def __len__(self):
            return len(self.samples)

    return ListDataset


def write_parquet(records, path):
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(records).to_parquet(str(path))


@pytest.fixture
def gsm8k_repo(tmp_path):
    """A local copy of openai/gsm8k in its hub layout (configuration folders of parquet shards)."""
    repo = tmp_path / "gsm8k"
    write_parquet(GSM8K_TRAIN[:1], repo / "main" / "train-00000-of-00002.parquet")
    write_parquet(GSM8K_TRAIN[1:], repo / "main" / "train-00001-of-00002.parquet")
    write_parquet(GSM8K_TEST, repo / "main" / "test-00000-of-00001.parquet")
    write_parquet([{"question": "socratic", "answer": "no\n#### 0"}], repo / "socratic" / "train-00000-of-00001.parquet")
    return repo


# ---------------------------------------------------------------------------------------------
# gsm8k and prompt-reference


def test_gsm8k_hub_layout(gsm8k_repo):
    train = RawDataset.load("gsm8k/train", str(gsm8k_repo))
    assert [s["input"] for s in train] == [r["question"] for r in GSM8K_TRAIN]  # shards in order, main only
    assert [s["answer"] for s in train] == [r["answer"] for r in GSM8K_TRAIN]
    assert [s["reference"] for s in train] == ["72", "1,234"]
    assert [s["reference"] for s in RawDataset.load("gsm8k/test", str(gsm8k_repo))] == ["-5"]
    # the configuration folder itself, the alias, and one JSON lines file
    assert len(RawDataset.load("gsm8k", str(gsm8k_repo / "main"))) == 2
    jsonl = gsm8k_repo / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_TRAIN))
    assert [s["reference"] for s in RawDataset.load("gsm8k/train", str(jsonl))] == ["72", "1,234"]


def test_gsm8k_references_score_with_math_exact(gsm8k_repo):
    train = RawDataset.load("gsm8k/train", str(gsm8k_repo))
    fn = RewardFunction.load("math_exact")
    refs = [s["reference"] for s in train]
    assert fn(["q", "q"], ["so 72", "\\boxed{1234}"], [[1], [1]], refs) == [1.0, 1.0]
    assert fn(["q", "q"], ["so 27", "\\boxed{123}"], [[1], [1]], refs) == [0.0, 0.0]


def test_gsm8k_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(UserError, match=r"dataset 'gsm8k/train' at '.*bad.jsonl' record 0 field 'answer' has no "
                                        r"'#### <final answer>' line"):
        RawDataset.load("gsm8k/train", str(bad))
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(UserError, match=r"record 0 is missing field\(s\) 'answer'"):
        RawDataset.load("gsm8k/train", str(bad))
    with pytest.raises(UserError, match="has no 'test' data"):
        RawDataset.load("gsm8k/test", str(tmp_path))


def test_prompt_reference_jsonl(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What is 2 + 2?", "reference": "4"},
        {"prompt": "What is half of 3?", "reference": "1.5", "answer": "It is 1.5."},
    ]))
    samples = list(RawDataset.load("prompt-reference", str(file)))
    assert samples == [{"input": "What is 2 + 2?", "reference": "4"},
                       {"input": "What is half of 3?", "reference": "1.5", "answer": "It is 1.5."}]
    numbers = tmp_path / "numbers.jsonl"  # numeric references are kept as their text
    numbers.write_text(json.dumps({"prompt": "How many?", "reference": 12}) + "\n")
    assert RawDataset.load("prompt-reference", str(numbers))[0] == {"input": "How many?", "reference": "12"}
    with pytest.raises(UserError, match="dataset 'prompt-reference' needs a local path"):
        RawDataset.load("prompt-reference")
    file.write_text(json.dumps({"prompt": "p", "reference": True}) + "\n")
    with pytest.raises(UserError, match="record 0 field 'reference' is bool True; expected a string or a number"):
        RawDataset.load("prompt-reference", str(file))
    file.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(UserError, match=r"missing field\(s\) 'reference'; expected fields: prompt, reference"):
        RawDataset.load("prompt-reference", str(file))


# ---------------------------------------------------------------------------------------------
# PromptOnlyDataset keeps references


def test_prompt_dataset_references(tiny_tokenizer, registry):
    register("with-refs", [{"input": "a", "reference": "1"}, {"input": "b", "reference": "2"},
                           {"input": "a", "reference": "other"}, {"input": "c", "reference": "3"}])
    register("without-refs", [{"input": "d"}, {"input": "e"}])
    data = PromptOnlyDataset("with-refs,without-refs", tiny_tokenizer, 64)
    inputs = ["a", "b", "c", "d", "e"]  # the repeated 'a' is dropped: its first reference stays
    assert [item["input_ids"] for item in data] == [
        tiny_tokenizer(DEFAULT_TEMPLATE.format(input=x))["input_ids"] for x in inputs]
    assert data.references(range(5)) == ["1", "2", "3", None, None]
    assert data.references([3, 0]) == [None, "1"]
    batch = data.get_collator()([data[i] for i in (2, 0)])
    assert set(batch) == {"input_ids", "attention_mask"}  # the batch stays tensors only
    train, evaluation = data.split(0.4, seed=0)
    for subset in (train, evaluation):
        expected = [data.references([j])[0] for j in subset.indices]
        assert subset.references(range(len(subset))) == expected


def test_reference_must_be_text(tiny_tokenizer, registry):
    register("int-ref", [{"input": "a", "reference": 4}])
    with pytest.raises(UserError, match="dataset 'int-ref' sample 0 field 'reference' is int; expected a string"):
        PromptOnlyDataset("int-ref", tiny_tokenizer, 64)


# ---------------------------------------------------------------------------------------------
# The arithmetic task


def _value(prompt):  # the problem's result, computed independently of the generator
    a, op, b = re.search(r"(\d+) ([+-]) (\d+)[?.]$", prompt).groups()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def _problem(prompt):
    return re.search(r"(\d+ [+-] \d+)[?.]$", prompt).group(1)


def test_arithmetic_shipped_files_regenerate(tmp_path):
    arithmetic.write_files(str(tmp_path))
    for name in arithmetic.FILES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == open(f"{arithmetic.DATA_DIR}/{name}.jsonl", "rb").read()


def test_arithmetic_data():
    data = arithmetic.generate()
    train, evaluation, sft = data["prompts_train"], data["prompts_eval"], data["sft"]
    n_problems = 6 * 6 + 6 * 7 // 2  # a + b, and a - b with a >= b, for 0..5
    assert len(evaluation) == n_problems and len(train) == 3 * n_problems
    for rec in train + evaluation + sft:
        assert rec["reference"] == str(_value(rec["prompt"])) and _value(rec["prompt"]) >= 0
    # held out by phrasing: no held-out prompt is trained on, but every held-out problem is
    eval_prompts = {r["prompt"] for r in evaluation}
    assert not eval_prompts & {r["prompt"] for r in train} and not eval_prompts & {r["prompt"] for r in sft}
    assert all(r["prompt"].startswith("How much is ") for r in evaluation)
    assert not any(r["prompt"].startswith("How much is ") for r in train + sft)
    assert {_problem(r["prompt"]) for r in evaluation} == {_problem(r["prompt"]) for r in train} \
        == {_problem(r["prompt"]) for r in sft}
    wrong = [r for r in sft if r["answer"] != r["reference"]]
    assert 0.45 * len(sft) < len(wrong) < 0.55 * len(sft) and all(not r["correct"] for r in wrong)
    assert all(1 <= abs(int(r["answer"]) - int(r["reference"])) <= 3 and int(r["answer"]) >= 0 for r in wrong)
    fn = RewardFunction.load("math_exact")
    scores = fn([r["prompt"] for r in sft], [r["answer"] for r in sft], [[1]] * len(sft),
                [r["reference"] for r in sft])
    assert sum(scores) == len(sft) - len(wrong) == sum(r["correct"] for r in sft)
    assert 30 <= sum(r["answer"] != r["reference"] for r in arithmetic.generate(wrong_share=0.1, n_sft=500)["sft"]) <= 70
    assert arithmetic.generate(seed=1)["sft"] != sft and arithmetic.generate(seed=1)["prompts_eval"] == evaluation
    assert len(arithmetic.generate(max_operand=9)["prompts_eval"]) == 155


def test_arithmetic_datasets_registered(tiny_tokenizer, tmp_path):
    sft = RawDataset.load("arithmetic-sft")
    assert len(sft) == 4000 and set(sft[0]) == {"input", "answer", "reference"}
    assert len(RawDataset.load("arithmetic-prompts/train")) == 171
    evaluation = RawDataset.load("arithmetic-prompts/eval")
    assert evaluation[6] == {"input": "How much is 1 + 0?", "reference": "1"}
    prompts = PromptOnlyDataset("arithmetic-prompts/eval", tiny_tokenizer, 64)
    assert prompts.references(range(len(prompts))) == [s["reference"] for s in evaluation]
    assert len(SupervisedDataset("arithmetic-sft:0.01", tiny_tokenizer, 64)) == 40
    arithmetic.write_files(str(tmp_path), wrong_share=0.5, n_sft=10)  # a regenerated folder as the path
    assert len(RawDataset.load("arithmetic-sft", str(tmp_path))) == 10
