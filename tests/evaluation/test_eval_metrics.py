"""The numbers of `rlhf eval` and `rlhf rm eval` on hand-computed cases (no model)."""

import pytest

from rlhf.config import judge_kind
from rlhf.data.records import Message, PromptRecord, RankRecord
from rlhf.evaluation.judges import FunctionJudge, reference_answers
from rlhf.evaluation.metrics import bleu, repetition_rate, rouge_l, wilson_interval, win_rate
from rlhf.errors import UserError
from rlhf.scoring import pair_accuracy


def test_wilson_interval_of_8_in_10():
    # z = 1.96: centre = (0.8 + z²/20) / (1 + z²/10) = 0.99208 / 1.38416 = 0.71674;
    # half = z·sqrt(0.8·0.2/10 + z²/400) / 1.38416 = 1.96·sqrt(0.025604) / 1.38416 = 0.22658
    low, high = wilson_interval(8, 10, z=1.96)
    assert low == pytest.approx(0.71674 - 0.22658, abs=1e-4) and high == pytest.approx(0.71674 + 0.22658, abs=1e-4)
    # never outside [0, 1], and not zero-width at 0 successes: [0, z²/(n + z²)] = [0, 3.8416 / 13.8416]
    assert wilson_interval(0, 10, z=1.96) == pytest.approx((0.0, 0.27754), abs=1e-4)


def test_win_rate_counts_ties_half_and_pairs_answers():
    # wins: 1 > 0, 4 > 1; tie: 2 = 2 (and 7 vs 7 + 1e-9, within the tolerance); loss: 3 < 5
    w = win_rate([1.0, 2.0, 3.0, 4.0, 7.0], [0.0, 2.0, 5.0, 1.0, 7.0 + 1e-9])
    assert (w.wins, w.ties, w.losses) == (2, 2, 1)
    assert w.rate == pytest.approx(3 / 5)
    assert (w.low, w.high) == pytest.approx(wilson_interval(3, 5))
    assert w.low < w.rate < w.high
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_repetition_rate_is_the_share_of_repeated_word_ngrams():
    # "A b a, b a": bigrams ab ba ab ba -> 2 of 4 repeat; "x y": 1 bigram, none; "z": no bigram
    assert repetition_rate(["A b a, b a", "x y", "z"], n=2) == pytest.approx(2 / 5)
    assert repetition_rate(["z"], n=2) == 0.0


def test_rouge_l_and_bleu_through_their_packages():
    # LCS of "the cat sat" and "the cat sat down" is 3: P = 1, R = 3/4, F1 = 1.5 / 1.75
    assert rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx([6 / 7])
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["dogs bark loudly at night"], ["the cat sat on the mat"]) == pytest.approx(0.0)


def test_pair_accuracy_takes_every_pair_of_a_k_way_ranking():
    prompt = [Message("user", "q")]
    records = [RankRecord(prompt, ["a", "b", "c"], [3.0, 2.0, 1.0]),  # C(3,2) = 3 pairs
               RankRecord(prompt, ["d", "e", "f"], [1.0, 1.0, 0.0])]  # the tie d = e gives no pair: 2 pairs
    model = [[0.5, 0.9, 0.1],  # (a,b) wrong, (a,c) right, (b,c) right; margins -0.4, 0.4, 0.8
             [0.2, 0.2, 0.2]]  # (d,f), (e,f): the model ties them: wrong, margins 0, 0
    out = pair_accuracy(records, model)
    assert out["pairs"] == 5 and out["accuracy"] == pytest.approx(2 / 5)
    assert out["mean_margin"] == pytest.approx(0.8 / 5)


def test_judge_specs_and_reference_answers():
    assert [judge_kind(s) for s in ("reference", "rlhf.data.quickstart:gold_reward", "runs/rm/model")] == \
        ["reference", "function", "model"]
    with pytest.raises(UserError, match="cannot import"):
        FunctionJudge("rlhf.data.quickstart:no_such_rule")
    rows = [PromptRecord([Message("user", "List 2 fruits in lowercase.")], "p.jsonl:1", {"reference": "apple, pear"}),
            PromptRecord([Message("user", "List 2 fruits in uppercase.")], "p.jsonl:2", {})]
    # gold_reward(prompt, response) takes no row fields: the reference column is not passed to it
    assert FunctionJudge("rlhf.data.quickstart:gold_reward")(rows[:1], ["apple, pear"]) == [1.0]
    assert reference_answers(rows[1:], "reference") is None
    with pytest.raises(UserError, match="p.jsonl:2: field 'reference'"):
        reference_answers(rows, "reference")
