"""Reward functions: registry, spec, combination, and the built-ins against hand-written cases."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from ppo.data import import_user_modules
from ppo.core.errors import UserError
from ppo.rewards import (
    RewardFunction,
    RewardSpec,
    answers_equal,
    build_reward_functions,
    combine,
    extract_answer,
    parse_number,
    parse_reward_functions,
)

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def registry():
    """Restores the reward registry (and drops the user module) after a test that registers functions."""
    saved = dict(RewardFunction._registry)
    yield
    RewardFunction._registry.clear()
    RewardFunction._registry.update(saved)
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) and Path(module.__file__).name == "user_rewards.py":
            del sys.modules[name]


def call(name, responses, references=None, ids=None, options=None, **context):
    fn = RewardFunction.load(name, options)
    n = len(responses)
    return fn(["p"] * n, responses, ids if ids is not None else [[1]] * n,
              references if references is not None else [None] * n, **context)


# ---------------------------------------------------------------------------------------------
# Registry and spec


def test_builtins_registered():
    assert {"math_exact", "format", "overlong", "remote"} <= set(RewardFunction.names())


def test_parse_spec():
    assert parse_reward_functions("") == [] and parse_reward_functions(None) == []
    assert parse_reward_functions("math_exact, format:0.5,overlong:-2") == [
        RewardSpec("math_exact", 1.0), RewardSpec("format", 0.5), RewardSpec("overlong", -2.0)]
    assert parse_reward_functions("format:0") == [RewardSpec("format", 0.0)]


@pytest.mark.parametrize("spec, message", [
    ("math_exat", "unknown reward function 'math_exat' (did you mean 'math_exact'?); registered: "),
    ("format:abc", "weight 'abc' of 'format' is not a finite number"),
    ("format:inf", "weight 'inf' of 'format' is not a finite number"),
    ("format:", "weight '' of 'format' is not a finite number"),
    ("math_exact,math_exact:2", "names 'math_exact' twice"),
    ("math_exact,,format", "has an empty entry"),
])
def test_parse_spec_errors_one_line(spec, message):
    with pytest.raises(UserError) as e:
        parse_reward_functions(spec)
    assert message in str(e.value) and "\n" not in str(e.value)
    if "unknown" in message:
        assert ", ".join(RewardFunction.names()) in str(e.value)


def test_unknown_name_in_load():
    with pytest.raises(UserError, match="unknown reward function 'nope'; registered: format, math_exact"):
        RewardFunction.load("nope")


def test_name_clash_rejected(registry):
    with pytest.raises(UserError, match="reward function name 'format' of .* is already registered"):
        class Other(RewardFunction):
            NAME = "format"
    with pytest.raises(UserError, match="invalid NAME 'a:b'"):
        class Bad(RewardFunction):
            NAME = "a:b"


def test_user_module_registers_a_function(registry):
    import_user_modules([str(TESTS / "user_rewards.py")])
    assert "short-is-good" in RewardFunction.names()
    [(fn, weight)] = build_reward_functions("short-is-good:2", {"max_new_tokens": 8, "unrelated": 1})
    assert weight == 2.0 and fn.max_new_tokens == 8  # options the function names reach it, others do not
    scores = combine([(fn, weight)], ["a", "b"], ["x", "y"], [[1, 2], [1, 2, 3, 4]], [None, None], max_new_tokens=8)
    np.testing.assert_allclose(scores.total, [2 * (1 - 2 / 8), 2 * (1 - 4 / 8)])


def test_combine_weighted_sum(registry):
    class Const(RewardFunction):
        NAME = "const-test"

        def __call__(self, prompts, responses, response_ids, references, **context):
            return [0.25] * len(responses)

    fns = build_reward_functions("math_exact:2,const-test:-1,overlong:0.5",
                                 {"reward_overlong_buffer": 4, "max_new_tokens": 10})
    responses = ["#### 42", "it is 41", "so 42"]
    ids = [[0] * 3, [0] * 8, [0] * 10]
    scores = combine(fns, ["q"] * 3, responses, ids, ["42", "42", "42"], max_new_tokens=10)
    math_exact = np.array([1.0, 0.0, 1.0])
    overlong = np.array([0.0, -2 / 4, -1.0])  # (10 - 4 - L) / 4 for L > 6
    np.testing.assert_array_equal(scores.per_function["math_exact"], math_exact)
    np.testing.assert_array_equal(scores.per_function["const-test"], [0.25] * 3)
    np.testing.assert_allclose(scores.per_function["overlong"], overlong)
    expected = [2 * m - 0.25 + 0.5 * o for m, o in zip(math_exact, overlong)]
    np.testing.assert_allclose(scores.total, expected)
    assert combine([], ["q"], ["r"], [[1]], [None]).total.tolist() == [0.0]


@pytest.mark.parametrize("returned, message", [
    ([1.0], "returned 1 scores for 2 responses"),
    ([1.0, float("nan")], "returned nan for response 1"),
    ([1.0, "1"], "returned '1' for response 1"),
    (None, "returned a NoneType"),
])
def test_combine_rejects_bad_scores(registry, returned, message):
    class Broken(RewardFunction):
        NAME = "broken-test"

        def __call__(self, prompts, responses, response_ids, references, **context):
            return returned

    with pytest.raises(UserError, match=f"reward function 'broken-test' .*{message}"):
        combine([(Broken(), 1.0)], ["a", "b"], ["x", "y"], [[1], [1]], [None, None])


# ---------------------------------------------------------------------------------------------
# math_exact


@pytest.mark.parametrize("text, answer", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("so the total is\n#### 1,234", "1,234"),
    ("#### -5", "-5"),
    ("I think \\boxed{3} first, but the answer is \\boxed{4}.", "4"),
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("\\boxed{x^{2}+1}", "x^{2}+1"),
    ("We have 3 apples and 4 pears, so 7 in all.", "7"),
    ("It is 3.50 dollars.", "3.50"),
    ("10-5 is 5", "5"),
    ("x = -12", "-12"),
    ("half: 1/2", "1/2"),
    ("the numbers 2,5 and 8", "8"),
    ("I do not know.", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text, value", [
    ("1,234", 1234), ("+7", 7), ("-0.50", -0.5), ("2.500", 2.5), ("3/4", 0.75), ("-6/4", -1.5),
    ("\\frac{1}{8}", 0.125), ("$12", 12), ("12.", 12), (" 42 ", 42),
    ("1,23", None), ("1/0", None), ("abc", None), ("4 apples", None), ("", None),
])
def test_parse_number(text, value):
    got = parse_number(text)
    assert (got is None) if value is None else (got is not None and math.isclose(float(got), value))


@pytest.mark.parametrize("response, reference, score", [
    ("The answer is 42.", "42", 1.0),
    ("#### 1,234", "1234", 1.0),          # commas
    ("so 1234", "#### 1,234", 1.0),       # reference in GSM8K form
    ("It comes to -3", "-3", 1.0),        # negatives
    ("It comes to 3", "-3", 0.0),
    ("\\boxed{0.5}", "1/2", 1.0),         # fractions compared as values
    ("1/2", "2/4", 1.0),
    ("\\boxed{\\frac{2}{3}}", "0.6667", 0.0),
    ("first \\boxed{5}, finally \\boxed{6}", "6", 1.0),   # the last boxed answer counts
    ("first \\boxed{5}, finally \\boxed{6}", "5", 0.0),
    ("2.50", "2.5", 1.0),                 # trailing zeros
    ("+8", "8", 1.0),                     # plus sign
    ("I have no idea.", "42", 0.0),       # no answer
    ("42 is wrong, the answer is 43", "42", 0.0),   # the last number counts
    ("\\boxed{x+1}", "x + 1", 1.0),       # non-numbers compared as text without spaces
])
def test_math_exact_cases(response, reference, score):
    assert call("math_exact", [response], [reference]) == [score]


def test_math_exact_needs_references():
    with pytest.raises(UserError, match=r"needs a reference answer for every prompt, but sample 1 of the batch "
                                        r"\(prompt 'p'\) has none"):
        call("math_exact", ["1", "2"], ["1", None])


def test_answers_equal_number_vs_text():
    assert not answers_equal("42", "forty-two") and answers_equal("a b", "ab")


# ---------------------------------------------------------------------------------------------
# format and overlong


def test_format_default_and_full_match():
    responses = ["<think>add them</think> <answer>42</answer>", "  <think>a\nb</think>\n<answer>4</answer>\n",
                 "<answer>42</answer>", "<think>x</think><answer>42</answer> trailing text"]
    assert call("format", responses) == [1.0, 1.0, 0.0, 0.0]
    assert call("format", ["42", " -7 ", "42 apples"], options={"reward_format_pattern": r"-?\d+"}) == [1.0, 1.0, 0.0]
    assert call("format", ["42 apples"], options={"reward_format_pattern": r".*\d+.*"}) == [1.0]


def test_format_bad_pattern():
    with pytest.raises(UserError, match=r"reward_format_pattern '\(' is not a valid regular expression"):
        RewardFunction.load("format", {"reward_format_pattern": "("})


def test_overlong_against_the_dapo_formula():
    M, K = 20, 5
    lengths = list(range(0, 23))

    def dapo(L):  # DAPO eq. 13, written out case by case
        if L <= M - K:
            return 0.0
        if L <= M:
            return ((M - K) - L) / K
        return -1.0

    got = call("overlong", ["r"] * len(lengths), ids=[[7] * L for L in lengths],
               options={"reward_overlong_buffer": K}, max_new_tokens=M)
    assert got == [dapo(L) for L in lengths]
    assert got[15] == 0.0 and got[16] == -0.2 and got[20] == -1.0


@pytest.mark.parametrize("options, message", [
    ({"reward_overlong_buffer": 0}, "reward_overlong_buffer=0 must be an integer >= 1"),
    ({"reward_overlong_buffer": 1.5}, "reward_overlong_buffer=1.5 must be an integer >= 1"),
    ({"reward_overlong_buffer": 8, "max_new_tokens": 8}, "must be smaller than max_new_tokens=8"),
])
def test_overlong_bad_buffer(options, message):
    with pytest.raises(UserError, match=message):
        RewardFunction.load("overlong", options)


def test_builtins_deterministic():
    responses = ["#### 3", "\\boxed{4}", "5 and 6"]
    fns = build_reward_functions("math_exact,format,overlong", {"reward_overlong_buffer": 2})
    args = (["q"] * 3, responses, [[1] * 3, [1] * 9, [1] * 10], ["3", "4", "5"])
    a = combine(fns, *args, max_new_tokens=10)
    b = combine(fns, *args, max_new_tokens=10)
    assert a.total.tolist() == b.total.tolist() == [1.0, 0.5, -1.0]
