"""The quickstart task's gold rule, by hand."""

import random

import pytest

from rlhf.data.quickstart import all_prompts, gold_reward, noisy_answer, parse_prompt


def test_gold_reward_by_hand():
    prompt = "List 3 fruits in uppercase."
    assert gold_reward(prompt, "APPLE, MANGO, PEAR") == 1.0
    # count 2/3 -> 1 - 1/3; all valid; all uppercase
    assert gold_reward(prompt, "APPLE, MANGO") == pytest.approx(2 / 3)
    # count ok; valid 1/3 (repeat and a color); case 1
    assert gold_reward(prompt, "APPLE, APPLE, RED") == pytest.approx(1 / 3)
    # count ok; valid 1; case 1/3
    assert gold_reward(prompt, "APPLE, mango, Pear") == pytest.approx(1 / 3)
    assert gold_reward(prompt, "") == 0.0
    assert gold_reward("Give me 2 birds capitalized, separated by commas.", "Owl, Crow") == 1.0


def test_parse_prompt_and_rejects_others():
    task = parse_prompt("Name 4 metals, in lowercase.")
    assert (task.n, task.category, task.case) == (4, "metals", "lowercase")
    with pytest.raises(ValueError):
        parse_prompt("Write a poem.")


def test_noisy_writer_leaves_room_above_it():
    rng = random.Random(0)
    prompts = all_prompts()
    scores = [gold_reward(p, noisy_answer(parse_prompt(p), rng, 0.6)) for p in prompts * 3]
    mean = sum(scores) / len(scores)
    assert 0.3 < mean < 0.6
    perfect = [gold_reward(p, noisy_answer(parse_prompt(p), rng, 1.0)) for p in prompts]
    assert min(perfect) == 1.0
