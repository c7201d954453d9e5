"""The built-in reward functions: ``math_exact``, ``format`` and ``overlong``.

Each is deterministic and pure python (no model, no network); the exact rule is in its docstring.
"""

from __future__ import annotations

import re
from fractions import Fraction

from ppo.core.errors import UserError
from ppo.rewards.base import RewardFunction

# A number as written in answers: optional sign (not right after a word character or closing
# bracket, so '10-5' holds 10 and 5), digits with optional 3-digit comma groups, optional decimals,
# optionally '/ denominator'.
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER = re.compile(rf"(?:(?<![\w)\]}}])[-+])?(?<![\d.,]){_UNSIGNED}(?:\s*/\s*[-+]?{_UNSIGNED})?")
_WHOLE_NUMBER = re.compile(rf"[-+]?{_UNSIGNED}(?:/[-+]?{_UNSIGNED})?")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def parse_number(text: str) -> Fraction | None:
    """The exact value of ``text`` when the whole of it is one number, else None.

    Accepted: an optional ``+``/``-`` sign, digits with optional thousands commas (``1,234``),
    optional decimals (trailing zeros do not matter: ``2.50`` = ``2.5``), an optional fraction
    ``a/b`` (compared as a value: ``1/2`` = ``0.5``; ``\\frac{a}{b}`` reads as ``a/b``), surrounding
    spaces, ``$`` signs, and one trailing ``.`` (end of sentence).  A zero denominator is no number.
    """
    s = _FRAC.sub(r"(\1)/(\2)", text.strip())
    s = s.replace("$", "").replace(" ", "").replace("(", "").replace(")", "")
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1]
    if not _WHOLE_NUMBER.fullmatch(s):
        return None
    num, _, den = s.replace(",", "").partition("/")
    try:
        value = Fraction(num)
        if den:
            value /= Fraction(den)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` of ``text`` (braces balanced), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
        start = text.rfind("\\boxed", 0, start)  # unclosed: try the one before
    return None


def extract_answer(text: str) -> str | None:
    """The final answer written in ``text``, as a string, or None when it has none.

    In this order: after the last ``####`` (GSM8K), the first number there (or the rest of that
    line when it holds no number); else the content of the last ``\\boxed{...}``; else the last
    number of the text (see ``parse_number`` for what a number is).
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        if match:
            return match.group(0)
        line = tail.strip().split("\n", 1)[0].strip()
        return line or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def reference_answer(reference: str) -> str | None:
    """The answer of a reference: its ``extract_answer`` when it holds ``####`` or ``\\boxed``
    (a full worked solution), else the whole reference, stripped."""
    if "####" in reference or "\\boxed" in reference:
        return extract_answer(reference)
    return reference.strip() or None


def answers_equal(a: str, b: str) -> bool:
    """Equal values when both are numbers (``parse_number``), else equal text after removing spaces and ``$``."""
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return x == y
    if x is not None or y is not None:
        return False

    def norm(s: str) -> str:
        return s.replace("$", "").replace(" ", "").strip()
    return norm(a) == norm(b)


class MathExact(RewardFunction):
    """1.0 when the response's final answer equals the reference's, else 0.0.

    Response answer: ``extract_answer`` (after the last ``####``; else the last ``\\boxed{...}``;
    else the last number).  Reference answer: ``extract_answer`` of the reference when it holds
    ``####`` or ``\\boxed`` (a full GSM8K solution ending in ``#### 72`` works), else the whole
    reference.  Equality:
    ``answers_equal`` (numbers by exact value after removing commas, ``+`` signs, ``$`` and trailing
    zeros, fractions ``a/b`` as values; other answers by text without spaces).  A response with no
    answer scores 0.0.  A sample without a reference is a UserError naming it.
    """

    NAME = "math_exact"

    def __call__(self, prompts, responses, response_ids, references, **context):
        scores = []
        for i, (prompt, response, reference) in enumerate(zip(prompts, responses, references)):
            if reference is None:
                raise UserError(f"reward function 'math_exact' needs a reference answer for every prompt, but "
                                f"sample {i} of the batch (prompt {prompt[:60]!r}) has none; use a dataset with "
                                "references (gsm8k, prompt-reference, arithmetic-prompts)")
            expected = reference_answer(reference)
            answer = extract_answer(response)
            scores.append(float(answer is not None and expected is not None and answers_equal(answer, expected)))
        return scores


DEFAULT_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"


class Format(RewardFunction):
    """1.0 when the whole response matches ``reward_format_pattern``, else 0.0.

    Full match (``re.fullmatch``) of the response with its leading and trailing whitespace
    stripped, with ``re.DOTALL`` (``.`` also matches newlines).  For a partial match, wrap the
    pattern in ``.*``.  Default: ``<think>.*?</think>\\s*<answer>.*?</answer>`` (reasoning, then
    the answer, as in DeepSeek-R1).
    """

    NAME = "format"

    def __init__(self, reward_format_pattern: str = DEFAULT_FORMAT_PATTERN):
        if not isinstance(reward_format_pattern, str) or not reward_format_pattern:
            raise UserError(f"reward_format_pattern={reward_format_pattern!r} must be a non-empty regular expression")
        try:
            self.pattern = re.compile(reward_format_pattern, re.DOTALL)
        except re.error as e:
            raise UserError(f"reward_format_pattern {reward_format_pattern!r} is not a valid regular expression "
                            f"({e}); give a Python re pattern the whole response must match") from None

    def __call__(self, prompts, responses, response_ids, references, **context):
        return [float(self.pattern.fullmatch(r.strip()) is not None) for r in responses]


class Overlong(RewardFunction):
    """DAPO's soft overlong penalty on the response length ``L = len(response_ids[i])`` (generated
    tokens, including a final eos).

    With ``M = max_new_tokens`` (from the call's context) and buffer ``K = reward_overlong_buffer``:
    ``0`` when ``L <= M - K``; ``(M - K - L) / K`` when ``M - K < L <= M`` (linear from 0 down to
    -1 at ``L = M``); ``-1`` beyond ``M``.  Needs ``1 <= K < M``.
    """

    NAME = "overlong"

    def __init__(self, reward_overlong_buffer: int = 16, max_new_tokens: int | None = None):
        if isinstance(reward_overlong_buffer, bool) or not isinstance(reward_overlong_buffer, int) \
                or reward_overlong_buffer < 1:
            raise UserError(f"reward_overlong_buffer={reward_overlong_buffer!r} must be an integer >= 1 (tokens "
                            "before max_new_tokens over which the overlong penalty grows to -1)")
        self.buffer = reward_overlong_buffer
        if max_new_tokens is not None:
            self._check(max_new_tokens)

    def _check(self, max_new_tokens: int) -> None:
        if self.buffer >= max_new_tokens:
            raise UserError(f"reward_overlong_buffer={self.buffer} must be smaller than max_new_tokens="
                            f"{max_new_tokens}, or every response would be penalised")

    def __call__(self, prompts, responses, response_ids, references, **context):
        if "max_new_tokens" not in context:
            raise ValueError("the overlong reward needs max_new_tokens in the call's context")
        M, K = context["max_new_tokens"], self.buffer
        self._check(M)
        return [max(-1.0, min(0.0, (M - K - len(ids)) / K)) for ids in response_ids]
