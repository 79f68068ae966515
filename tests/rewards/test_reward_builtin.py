"""The built-in reward functions on hand-written cases."""

from __future__ import annotations

import pytest

from rlhf.rewards.builtin import exact_match, final_answer, format_match, normalize, numeric_match


@pytest.mark.parametrize("text, expected", [
    ("  **The  Answer.** ", "the answer"),  # bold, inner whitespace, closing period, case
    ("$42$", "42"),
    ("(B)", "b"),
    ('"Paris"!', "paris"),
    ("-3", "-3"),  # a sign is not punctuation to strip
    (".5", ".5"),
    ("3.", "3"),
    (42, "42"),  # str() of a non-string answer
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("response, final", [
    ("so \\boxed{\\frac{1}{2}} then \\boxed{7}", "7"),  # the last box, braces balanced
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Thinking...\nThe answer is 42 apples.\nDone", "42 apples."),  # the marker wins over the last line
    ("Answer: yes", "yes"),
    ("step 1\nstep 2\n#### 1,234", "1,234"),
    ("first line\n\nlast line\n\n", "last line"),
    ("", ""),
])
def test_final_answer(response, final):
    assert final_answer(response) == final


@pytest.mark.parametrize("response, answer, reward", [
    ("42", "42", 1.0),
    ("  **42.** ", "42", 1.0),
    ("The answer is Paris.", "paris", 1.0),  # after the marker, case-folded, period stripped
    ("Let me think.\nParis", "Paris", 1.0),  # the last line
    ("\\boxed{B}", "(B)", 1.0),
    ("So x = 7", "7", 1.0),  # the last number of the final answer
    ("step 1\n#### 1,234", "1234", 1.0),  # thousands commas removed from numbers
    ("The answer is 42 apples", 42, 1.0),  # a number given as a number
    ("So x = 7.0", "7", 0.0),  # text, not value: numeric_match says 1
    ("-3", "3", 0.0),
    ("41\n42 and 43", "42", 0.0),  # only the final answer's last number counts
    ("The answer is Rome", "Paris", 0.0),
    ("Paris or Rome", "Paris", 0.0),
    ("Rome", ["Paris", "rome"], 1.0),  # a list: any of them
])
def test_exact_match(response, answer, reward):
    assert exact_match("the prompt", response, answer=answer) == reward


def test_exact_match_without_an_answer_is_a_data_error():
    with pytest.raises(ValueError, match="'answer' field"):
        exact_match("p", "42")
    assert exact_match("p", "42", answer="42", unrelated="ignored") == 1.0


@pytest.mark.parametrize("response, answer, reward", [
    ("\\frac{1}{2}", "0.5", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("3", "3.0", 1.0),
    ("The answer is $\\boxed{\\frac{1}{2}}$", "0.5", 1.0),
    ("$2\\sqrt{2}$", "\\sqrt{8}", 1.0),  # a bare LaTeX answer is read inside $...$
    ("1/2", "0.5", 1.0),
    ("I first thought 3, but the answer is 5", "5", 1.0),
    ("4", "3", 0.0),
    ("3.0001", "3", 0.0),
    ("The answer is $\\boxed{\\frac{1}{3}}$", "0.5", 0.0),
    ("I don't know", "3", 0.0),
    ("", "3", 0.0),
    ("7", ["3", "7"], 1.0),
])
def test_numeric_match(response, answer, reward):
    assert numeric_match("the prompt", response, answer=answer) == reward


def test_numeric_match_refuses_an_answer_it_cannot_read():
    with pytest.raises(ValueError, match="'answer' field"):
        numeric_match("p", "3")
    with pytest.raises(ValueError, match="cannot read the answer"):
        numeric_match("p", "3", answer="")


@pytest.mark.parametrize("response, reward", [
    ("so \\boxed{3}", 1.0),
    ("so \\boxed{\\frac{1}{2}}", 1.0),
    ("so \\boxed{ }", 0.0),  # empty
    ("work\nAnswer: 3", 1.0),
    ("work\nfinal answer: x", 1.0),  # case-insensitive
    ("Answer:", 0.0),  # nothing after it
    ("The answer is 3", 0.0),  # not at the start of a line
    ("3", 0.0),
])
def test_format_match_default(response, reward):
    assert format_match("p", response) == reward


def test_format_match_with_the_row_pattern():
    pattern = r"^<think>.*</think>\s*<answer>.*</answer>\Z"
    assert format_match("p", "<think>a\nb</think>\n<answer>3</answer>", pattern=pattern) == 1.0  # '.' spans lines
    assert format_match("p", "<think>a</think><answer>3</answer> extra", pattern=pattern) == 0.0
    assert format_match("p", "no tags", pattern=pattern) == 0.0
    assert format_match("p", "ANSWER", pattern="(?i)answer") == 1.0
    with pytest.raises(ValueError, match="not a valid regex"):
        format_match("p", "x", pattern="(")


def test_the_builtins_run_in_the_pool():
    from rlhf.rewards.functions import RewardFunctionPool

    specs = ["rlhf.rewards.builtin:exact_match", "rlhf.rewards.builtin:numeric_match", "rlhf.rewards.builtin:format_match"]
    with RewardFunctionPool(specs, workers=1, timeout_s=30) as pool:
        result = pool(["p", "p", "p"], ["Answer: 0.5", "\\boxed{\\frac{1}{2}}", "2"],
                      [{"answer": "0.5"}, {"answer": "0.5"}, {"answer": "0.5"}])
    assert result.rewards[specs[0]].tolist() == [1.0, 0.0, 0.0]
    assert result.rewards[specs[1]].tolist() == [1.0, 1.0, 0.0]
    assert result.rewards[specs[2]].tolist() == [1.0, 1.0, 0.0]
    assert result.failures["errors"] == 0


def test_numeric_match_works_outside_the_main_thread():
    # math-verify's signal-based time limits refuse threads; numeric_match turns them off there
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as threads:
        assert threads.submit(numeric_match, "p", "\\frac{1}{2}", answer="0.5").result() == 1.0
