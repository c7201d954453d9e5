"""The tiny example's gold rules and its tiny_guard reward (ppo/tiny/task.py) on hand-written answers."""

from __future__ import annotations

import pytest

from ppo.tiny import task
from ppo.tiny.task import gold_score, strict_gold_score

TRAIN = "Give me your view of the train."


@pytest.mark.parametrize("prompt, response, lenient, strict", [
    # on topic, distinct adjectives: both rules agree
    (TRAIN, "The train is kind, rude and warm.", 2 / 3, 2 / 3),
    (TRAIN, "The train is calm and gentle.", 1.0, 1.0),
    (TRAIN, "The train is dark and cold.", 0.0, 0.0),
    # repeated adjectives count once under the strict rule
    # a repeated adjective counts once; its repeats count against the answer
    (TRAIN, "The train is brave, brave, brave and gentle.", 1.0, 0.5),
    (TRAIN, "The train is lovely, lovely and lovely.", 1.0, 1 / 3),
    (TRAIN, "The train is brave, brave, brave and rude.", 0.75, 0.25),
    (TRAIN, "The train is rude, rude and kind.", 1 / 3, 1 / 3),
    (TRAIN, "The train is Kind and KIND and sad.", 2 / 3, 1 / 3),  # case does not make a new adjective
    # another topic (or none) scores 0 under the strict rule
    (TRAIN, "The dog is kind and calm.", 1.0, 0.0),
    (TRAIN, "It is kind and calm.", 1.0, 0.0),
    (TRAIN, "The trains are kind.", 1.0, 0.0),  # a word, not a substring
    # the topic may appear anywhere; no adjective scores 0
    (TRAIN, "Kind, the train.", 1.0, 1.0),
    (TRAIN, "The train is.", 0.0, 0.0),
    (TRAIN, "", 0.0, 0.0),
    # the prompt's topic is found inside a chat template too
    ("BEGINNING OF CONVERSATION: USER: Tell me about the school. ASSISTANT:", "The school is happy.", 1.0, 1.0),
    ("BEGINNING OF CONVERSATION: USER: Tell me about the school. ASSISTANT:", "The train is happy.", 1.0, 0.0),
])
def test_gold_rules_on_hand_written_answers(prompt, response, lenient, strict):
    assert gold_score(response) == pytest.approx(lenient)
    assert strict_gold_score(prompt, response) == pytest.approx(strict)


def test_strict_rule_needs_a_topic_in_the_prompt():
    with pytest.raises(ValueError, match="names no topic"):
        strict_gold_score("Hello there.", "The train is kind.")


def test_sft_answers_are_on_topic():
    # so the SFT policy scores about the same under both rules
    data = task.generate(n_sft=200, n_pref=10, n_pref_test=10)
    assert all(strict_gold_score(r["prompt"], r["answer"]) > 0 or gold_score(r["answer"]) == 0 for r in data["sft"])
    assert all(f"The {task._topic_of(r['prompt'])} is" in r["answer"] for r in data["sft"])


def test_topic_guard_reward_function():
    from ppo.rewards import RewardFunction

    guard = RewardFunction.load("tiny_guard")
    prompt = "BEGINNING OF CONVERSATION: USER: Tell me about the school. ASSISTANT:"
    responses = ["The school is kind and rude.", "The train is kind and calm.", "The school is calm, calm and kind.",
                 "The school is.", "The.", "The school is Kind and kind."]
    assert guard([prompt] * 6, responses, [[1]] * 6, [None] * 6) == [0.0, -1.0, -1.0, 0.0, -1.0, -1.0]
    # a passing answer loses nothing to the strict rule beyond what the lenient rule sees
    for r in responses:
        if guard([prompt], [r], [[1]], [None])[0] == 0:
            assert strict_gold_score(prompt, r) == pytest.approx(gold_score(r))
