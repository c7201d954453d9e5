"""prompt_template chat: the tokenizer's own chat template for SFT, preference and prompt-only data,
multi-turn included; one line when the tokenizer has none."""

import json
import os
import shutil
import types

import pytest

from ppo.data import PreferenceDataset, PromptOnlyDataset, SupervisedDataset, build_template, encode_prompt
from ppo.data.datasets import encode_answer
from ppo.core.errors import UserError

# a template in transformers' convention, written for the tiny sentencepiece vocabulary
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def chat_folder(tiny_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir / "tokenizer", folder)
    return folder


def with_template(folder, where):
    if where == "tokenizer_config":
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = TEMPLATE
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    elif where == "named-list":
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    else:
        (folder / "chat_template.jinja").write_text(TEMPLATE)
    return build_template(types.SimpleNamespace(prompt_template="chat", model_name_or_path=str(folder)))


@pytest.mark.parametrize("where", ["tokenizer_config", "named-list", "jinja-file"])
def test_multi_turn_prompt_is_the_rendered_conversation_turn_by_turn(tiny_tokenizer, chat_folder, where):
    tok = tiny_tokenizer
    template = with_template(chat_folder, where)
    ids, trainable = encode_prompt(tok, template, ["hello there", "the cat is kind", "and the dog"])
    # the first user turn and the generation prompt are not trained; the assistant turn is
    first = ids_of(tok, f"{tok.bos_token}USER: hello there\nASSISTANT:")
    assert ids[:len(first)] == first
    assert trainable.count(True) > 0 and not any(trainable[:len(first)])
    assert tok.eos_token_id in ids and trainable[ids.index(tok.eos_token_id)]
    text = tok.decode(ids)
    assert "USER: hello there" in text and "ASSISTANT: the cat is kind" in text and text.rstrip().endswith("ASSISTANT:")


def test_chat_turns_are_masked_from_the_rendered_text(tiny_tokenizer, chat_folder):
    """Every id belongs to the piece it was rendered in: the pieces are tokenized one by one."""
    tok = tiny_tokenizer
    template = with_template(chat_folder, "tokenizer_config")
    ids, trainable = encode_prompt(tok, template, ["u one", "a one", "u two"])
    r = template.renderer
    m = [{"role": "user", "content": "u one"}, {"role": "assistant", "content": "a one"},
         {"role": "user", "content": "u two"}]
    p1 = r.render(m[:1], True, tok)
    p2 = r.render(m[:2], False, tok)
    p3 = r.render(m[:3], True, tok)
    want = ids_of(tok, p1) + ids_of(tok, p2[len(p1):]) + ids_of(tok, p3[len(p2):])
    mask = [False] * len(ids_of(tok, p1)) + [True] * len(ids_of(tok, p2[len(p1):])) + \
        [False] * len(ids_of(tok, p3[len(p2):]))
    assert ids == want and trainable == mask
    assert p1 == f"{tok.bos_token}USER: u one\nASSISTANT:"


def test_chat_answer_is_the_assistant_turn_with_one_eos(tiny_tokenizer, chat_folder):
    tok = tiny_tokenizer
    template = with_template(chat_folder, "jinja-file")
    answer = encode_answer(tok, "the cat is kind", template)
    # rendered: "<s>USER: ?\nASSISTANT:" and "<s>USER: ?\nASSISTANT: the cat is kind</s>\n": the
    # answer is the difference, stripped, its eos already last
    assert answer == ids_of(tok, f" the cat is kind{tok.eos_token}")
    assert answer.count(tok.eos_token_id) == 1 and answer[-1] == tok.eos_token_id


def test_chat_datasets_sft_preference_prompts(tiny_tokenizer, chat_folder):
    tok = tiny_tokenizer
    template = with_template(chat_folder, "tokenizer_config")
    sft = SupervisedDataset("tiny-sft", tok, max_length=64, template=template)
    pref = PreferenceDataset("tiny-preference/train", tok, max_length=64, template=template)
    prompts = PromptOnlyDataset("tiny-prompts/train", tok, max_length=64, template=template)
    for item in (sft[0]["input_ids"], pref[0]["better_input_ids"], prompts[0]["input_ids"]):
        text = tok.decode(item)
        assert "USER:" in text and "ASSISTANT:" in text and "BEGINNING OF CONVERSATION" not in text


def test_no_template_is_one_line(chat_folder):
    with pytest.raises(UserError) as e:
        build_template(types.SimpleNamespace(prompt_template="chat", actor_model_name_or_path=str(chat_folder)))
    assert "\n" not in str(e.value) and "actor_model_name_or_path" in str(e.value) and "chat_template" in str(e.value)


QWEN_STYLE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_fast_tokenizer_from_tokenizer_json_with_a_qwen_style_template(tmp_path):
    """A transformers-style tokenizer folder with only tokenizer.json (no vocab.json / merges.txt):
    loaded as a fast tokenizer whose ids equal the ``tokenizers`` library's own; the chat template's
    assistant turn ends with <|im_end|>, the eos, once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ppo.models import load_tokenizer
    from ppo.tiny.task import corpus

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(list(corpus()), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "tok"
    folder.mkdir()
    raw.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "bos_token": None, "chat_template": QWEN_STYLE}))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    tok = load_tokenizer(str(folder))
    text = "The cat is kind and the dog is calm.<|im_end|>"
    assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids
    template = build_template(types.SimpleNamespace(prompt_template="chat", model_name_or_path=str(folder)))
    ids, trainable = encode_prompt(tok, template, ["hi", "the cat is kind", "and the dog"])
    assert ids == raw.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").ids + \
        raw.encode("the cat is kind<|im_end|>\n").ids + \
        raw.encode("<|im_start|>user\nand the dog<|im_end|>\n<|im_start|>assistant\n").ids
    answer = encode_answer(tok, "the dog is calm", template)
    assert answer == raw.encode("the dog is calm<|im_end|>").ids and answer.count(tok.eos_token_id) == 1
