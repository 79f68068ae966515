"""The verifiable-reward task: its rule by hand, its files, and what the careless calculator
leaves for RL to gain."""

import json
import random

import pytest

from rlhf.data.arithmetic import Problem, all_prompts, gold_reward, noisy_answer, parse_prompt, synthesize
from rlhf.rewards.builtin import exact_match


def test_gold_reward_by_hand():
    assert gold_reward("What is 7 + 5?", "Answer: 12") == 1.0
    assert gold_reward("What is 7 + 5?", "answer:12.") == 1.0
    assert gold_reward("Compute 9 - 4.", "Answer: 5") == 1.0
    assert gold_reward("Compute 9 - 4.", "Answer: 13") == 0.0
    assert gold_reward("9 + 4 = ?", "13") == 1.0  # no marker: the last line is the final answer, as exact_match reads it
    assert gold_reward("9 + 4 = ?", "Answer: 14, no, 13") == 1.0  # the last number of the final answer
    assert gold_reward("9 + 4 = ?", "Answer: 13 or 14") == 0.0
    assert gold_reward("What is 4 + 1?", "Answer:: 5") == exact_match("What is 4 + 1?", "Answer:: 5", answer="5")
    assert gold_reward("9 + 4 = ?", "") == 0.0


def test_parse_prompt_and_rejects_others():
    assert parse_prompt("Calculate 8 - 3.") == Problem(8, "-", 3) and Problem(8, "-", 3).value == 5
    with pytest.raises(ValueError):
        parse_prompt("List 3 fruits in uppercase.")


def test_prompts_cover_every_sum_and_no_negative_difference():
    prompts = all_prompts()
    values = [parse_prompt(p).value for p in prompts]
    assert len(set(prompts)) == len(prompts) and min(values) == 0 and max(values) == 12
    assert len(prompts) == 4 * (49 + 28)


def test_the_calculator_is_right_about_as_often_as_its_quality():
    rng = random.Random(0)
    problems = [parse_prompt(p) for p in all_prompts()] * 4
    right = [noisy_answer(p, rng, 0.5) == f"Answer: {p.value}" for p in problems]
    assert 0.45 < sum(right) / len(right) < 0.55
    assert all(noisy_answer(p, rng, 1.0) == f"Answer: {p.value}" for p in problems)
    assert all(int(noisy_answer(p, rng, 0.0).split()[-1]) >= 0 for p in problems)


def test_synthesized_files_hold_the_exact_answers_and_hold_out_prompt_strings(tmp_path):
    files = synthesize(tmp_path, seed=3, sft_rows=200, prompt_rows=100)
    read = {name: [json.loads(line) for line in open(path)] for name, path in files.items()}
    assert set(read) == {"sft", "prompts", "prompts_eval"}
    for row in read["prompts"] + read["prompts_eval"]:
        assert row["answer"] == str(parse_prompt(row["prompt"]).value)
        # the built-in rule scores the right answer 1 and a wrong one 0 from the row's field
        assert exact_match(row["prompt"], f"Answer: {row['answer']}", answer=row["answer"]) == 1.0
        assert exact_match(row["prompt"], f"Answer: {int(row['answer']) + 1}", answer=row["answer"]) == 0.0
    held_out = {r["prompt"] for r in read["prompts_eval"]}
    assert not held_out & ({r["prompt"] for r in read["sft"]} | {r["prompt"] for r in read["prompts"]})
    assert synthesize(tmp_path / "again", seed=3, sft_rows=200, prompt_rows=100) and \
        open(tmp_path / "again" / "sft.jsonl").read() == open(files["sft"]).read()
