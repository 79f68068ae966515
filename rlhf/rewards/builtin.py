"""Built-in reward functions, for `reward.functions` ("rlhf.rewards.builtin:exact_match", ...).

Each is called as f(prompt, response, **fields) with the prompt row's other columns and returns
1.0 or 0.0. A row that lacks the field a function needs (or holds one it cannot use) raises
ValueError: the pool counts that sample as an error (NaN) and reports the message.

- `exact_match`: the response's final answer equals the row's `answer`, as text.
- `numeric_match`: the response's final answer equals the row's `answer` as a number or
  expression, through math-verify (HuggingFace's checker: "\\frac{1}{2}" = "0.5", "3" = "3.0").
- `format_match`: the response has the expected shape: the row's `pattern` (a regex), or by
  default a final answer in "\\boxed{...}" or on an "Answer: ..." line.
"""

from __future__ import annotations

import re
import threading

__all__ = ["exact_match", "numeric_match", "format_match", "normalize", "final_answer", "DEFAULT_FORMAT"]

_EDGE = "\"'`“”‘’«»()[]{}<>*_$"
"""Stripped from both ends of a normalised answer: quotes, brackets, markdown emphasis, '$'."""
_EDGE_END = ".,;:!?"
"""Also stripped from its end: closing punctuation ('42.' is '42'; a leading '.' or '-' stays)."""

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
"""A number as written: optional sign, digits (thousands may be grouped by commas), decimals."""
_MARKER = re.compile(r"(?:\banswer\s*(?:is\b\s*:?|:)|^[ \t]*####)[ \t]*(\S[^\n]*)", re.IGNORECASE | re.MULTILINE)
"""An answer marker ("Answer:", "the answer is", "Final answer:", a GSM8K "####" line) and the
rest of its line."""

DEFAULT_FORMAT = r"\\boxed\{\s*[^\s}]|^[ \t]*(?:final[ \t]+)?answer[ \t]*:[ \t]*\S"
"""`format_match`'s pattern when the row has none (searched case-insensitively, '^' at every
line): a non-empty "\\boxed{...}", or a line that starts with "Answer:" or "Final answer:"
followed by something."""
_DEFAULT_FORMAT = re.compile(DEFAULT_FORMAT, re.IGNORECASE | re.MULTILINE)


def normalize(text) -> str:
    """`text` (str() of it) case-folded, every run of whitespace made one space, and the
    characters of `_EDGE` stripped from both ends and those of `_EDGE_END` from the end,
    repeatedly: ' **The Answer.** ' -> 'the answer'; '$42$' -> '42'; '(B)' -> 'b'; '-3' and
    '.5' keep their sign and point."""
    text = " ".join(str(text).split()).casefold()
    both, end = set(_EDGE) | {" "}, set(_EDGE) | set(_EDGE_END) | {" "}
    start, stop = 0, len(text)
    while start < stop and text[start] in both:
        start += 1
    while stop > start and text[stop - 1] in end:
        stop -= 1
    return text[start:stop]


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    at = text.rfind("\\boxed{")
    while at >= 0:
        depth, start = 0, at + len("\\boxed{")
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                if depth == 0:
                    return text[start:i]
                depth -= 1
        at = text.rfind("\\boxed{", 0, at)  # unbalanced: try an earlier one
    return None


def final_answer(response: str) -> str:
    """The part of a response that states its final answer, by the first rule that applies:
    the content of the last "\\boxed{...}"; else the rest of the line after the last answer
    marker ("Answer:", "answer is", "Final answer:", a line starting with "####"); else the last
    non-empty line; else ""."""
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed
    markers = _MARKER.findall(response)
    if markers:
        return markers[-1]
    lines = [line for line in response.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _numbers(text: str) -> list[str]:
    return [n.replace(",", "") for n in _NUMBER.findall(text)]


def _answers(answer, name: str) -> list:
    if answer is None:
        raise ValueError(f"{name} needs the prompt row's 'answer' field")
    answers = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    if not answers:
        raise ValueError(f"{name}: the row's 'answer' is an empty list")
    return answers


def exact_match(prompt: str, response: str, answer=None, **_) -> float:
    """1.0 if the response gives the row's `answer` (a list: any of them), as text.

    With norm = `normalize` (case-folded, whitespace collapsed, surrounding quotes, brackets,
    '*', '_', '$' and closing punctuation stripped), it matches when norm(answer) equals:
      1. norm(response): the response is the answer;
      2. norm(final_answer(response)): the last \\boxed{}, the line after the last "Answer:" /
         "answer is" / "####", or the last non-empty line;
      3. when norm(answer) is a number: the last number in that final answer, both with
         thousands commas removed ('1,000' = '1000'; but '3' != '3.0': use numeric_match).
    Only the one final answer is looked at, so listing several answers does not help."""
    final = final_answer(response)
    candidates = {normalize(response), normalize(final)}
    numbers = _numbers(final)
    for item in _answers(answer, "exact_match"):
        target = normalize(item)
        if target in candidates:
            return 1.0
        if numbers and _NUMBER.fullmatch(target) and numbers[-1] == target.replace(",", ""):
            return 1.0
    return 0.0


def numeric_match(prompt: str, response: str, answer=None, **_) -> float:
    """1.0 if math-verify finds the response's final answer equal to the row's `answer` (a
    list: any of them): `verify(parse(answer), parse(response))`.

    math-verify (https://github.com/huggingface/Math-Verify) extracts the answer from the text
    (a \\boxed{} first, else LaTeX or plain expressions, the last one) and compares values and
    expressions with sympy: "\\frac{1}{2}" = "0.5" = "1/2", "3" = "3.0", "2\\sqrt{2}" =
    "\\sqrt{8}". A response with nothing it can read scores 0. An `answer` it cannot read raises
    ValueError (a data error); a bare LaTeX answer ("\\sqrt{8}") is read as "$\\sqrt{8}$".
    math-verify's own time limits (signals) work only in a main thread, as in the pool's
    workers; elsewhere they are off and the pool's timeout is the limit."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    predicted = None
    for item in _answers(answer, "numeric_match"):
        text = str(item)
        gold = parse(text, parsing_timeout=timeout)
        if not gold and "$" not in text:  # bare LaTeX such as "\\sqrt{8}" is read inside $...$
            gold = parse(f"${text}$", parsing_timeout=timeout)
        if not gold:
            raise ValueError(f"numeric_match: math-verify cannot read the answer {str(item)[:100]!r}")
        if predicted is None:
            predicted = parse(response, parsing_timeout=timeout)
        if predicted and verify(gold, predicted, timeout_seconds=timeout):
            return 1.0
    return 0.0


def format_match(prompt: str, response: str, pattern=None, **_) -> float:
    """1.0 if the response has the expected format.

    With the row's `pattern`: `re.search(pattern, response, re.DOTALL)` finds a match ('.'
    also matches newlines; anchor with '^' and '\\Z' to require the whole response; inline
    flags such as '(?i)' work). Without one: `DEFAULT_FORMAT`, a non-empty "\\boxed{...}" or a
    line starting with "Answer:" / "Final answer:" followed by text (case-insensitive). A
    pattern that is not a valid regex raises ValueError."""
    if pattern is None:
        return 1.0 if _DEFAULT_FORMAT.search(response) else 0.0
    if not isinstance(pattern, str):
        raise ValueError(f"format_match: the row's 'pattern' is a {type(pattern).__name__}, not a regex string")
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as error:
        raise ValueError(f"format_match: the row's pattern {pattern[:100]!r} is not a valid regex: {error}") from None
    return 1.0 if compiled.search(response) else 0.0
