"""`rlhf eval` and `rlhf rm eval` end to end: a model against itself ties, the quickstart PPO
export beats the SFT export by the gold rule, the quickstart RM ranks hand-made answers as the
gold rule does, and user mistakes are one line."""

import json
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.summary import eval_rows


def _eval(tmp_path: Path, *overrides: str) -> int:
    return main(["eval", f"output_dir={tmp_path / 'eval'}", *overrides])


def test_a_model_against_itself_ties_with_no_kl(tmp_path, tiny_model_dir, quickstart_data, capsys):
    """The same weights sampled with the same seed give the same answers: every judge ties
    (win rate 0.5 exactly) and the KL to the reference (the baseline) is 0."""
    rows = [json.loads(line) for line in Path(quickstart_data["prompts_eval"]).read_text().splitlines()[:6]]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({**r, "reference": "apple, pear"}) + "\n" for r in rows))
    assert _eval(tmp_path, f"policy.path={tiny_model_dir}", f"baseline.path={tiny_model_dir}",
                 f"prompts.path={prompts}", f"pretrain.path={quickstart_data['pretrain']}", "pretrain_max_rows=8",
                 "judges=[rlhf.data.quickstart:gold_reward,reference]", "max_new_tokens=8",
                 "samples_per_prompt=2") == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["answers"] == 12 and result["judges"] == ["gold_reward", "reference_rougeL"]
    for judge in result["judges"]:
        assert result["win_rate"][judge]["ties"] == 12 and result["win_rate"][judge]["rate"] == 0.5
    policy = result["models"]["policy"]
    assert policy["kl"] == pytest.approx(0.0, abs=1e-4)
    assert 1 <= policy["length"] <= 8 and 0 <= policy["eos_rate"] <= 1 and 0 <= policy["repetition"] <= 1
    assert {"rouge_l", "bleu", "perplexity"} <= set(policy) and policy["perplexity"] > 1
    assert "| reward (gold_reward) |" in (tmp_path / "eval" / "eval.md").read_text()
    assert ("Eval win rate vs baseline (gold_reward)", "0.500 [0.254, 0.746]") in eval_rows(tmp_path / "eval" / "eval.json")


@pytest.mark.parametrize("overrides, message", [
    (["prompts.path={missing}"], "no_such_prompts.jsonl"),
    (["judges=[no/such/rm_dir]"], "judges[0]='no/such/rm_dir' is not 'reference', a module:function"),
    (["judges=[rlhf.data.quickstart:no_such_rule]"], "judge 'rlhf.data.quickstart:no_such_rule': cannot import"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, quickstart_data, capsys, overrides,
                                                  message):
    overrides = [o.format(missing=tmp_path / "no_such_prompts.jsonl") for o in overrides]
    code = _eval(tmp_path, f"policy.path={tiny_model_dir}", f"prompts.path={quickstart_data['prompts_eval']}",
                 *overrides)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "eval").exists()


def test_rm_eval_with_a_missing_model_is_one_line(tmp_path, quickstart_data, capsys):
    assert main(["rm", "eval", "--model", str(tmp_path / "nope"), "--data", quickstart_data["rank"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.claim
def test_quickstart_ppo_beats_sft_and_the_rm_ranks_as_the_gold_rule(tmp_path, quickstart_ppo, quickstart_models,
                                                                    quickstart_data, capsys):
    """The issue's check: `rlhf eval` on the quickstart PPO export against the SFT export
    reports a win rate > 0.5 by the gold rule. And `rlhf rm eval` of the quickstart RM on
    hand-made rankings (a perfect answer, one word of the wrong category, a repeat and the
    wrong case, nothing of the category) agrees with the gold rule's order."""
    cfg, ppo_result = quickstart_ppo
    assert _eval(tmp_path, f"policy.path={ppo_result.model_dir}", f"baseline.path={quickstart_models['sft']}",
                 f"prompts.path={quickstart_data['prompts_eval']}", f"pretrain.path={quickstart_data['pretrain']}",
                 f"judges=[rlhf.data.quickstart:gold_reward,{quickstart_models['rm']}]",
                 f"max_new_tokens={cfg.rollout.max_new_tokens}", "samples_per_prompt=2",
                 f"max_prompt_length={cfg.data.max_prompt_length}") == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    gold = result["win_rate"]["gold_reward"]
    assert gold["rate"] > 0.5, gold
    assert result["models"]["policy"]["reward/gold_reward"] > result["models"]["baseline"]["reward/gold_reward"]
    assert 0 < result["models"]["policy"]["kl"] < cfg.kl.target
    capsys.readouterr()

    # Hand-made 3-way rankings, strictly ordered by the gold rule (1.0 > 0.4-0.67 > 0); the
    # same file reversed must give exactly the complementary accuracy and the opposite margin.
    rows = [("List 3 fruits in uppercase.", ["APPLE, PEAR, MANGO", "APPLE, PEAR, DOG", "RED, BLUE"]),
            ("Name 2 animals, in lowercase.", ["cat, dog", "cat, red", "iron, gold"]),
            ("Give me 4 colors capitalized, separated by commas.",
             ["Red, Blue, Green, Pink", "Red, Blue, Tin, Duck", "Cow, Goat, Lion, Duck"]),
            ("List 5 metals in lowercase.", ["iron, gold, silver, copper, tin", "iron, gold, dog, cat, red",
                                             "apple, pear, plum, cow, owl"])]
    out = {}
    for name, scores in (("gold", [2, 1, 0]), ("reversed", [0, 1, 2])):
        rank = tmp_path / f"{name}.jsonl"
        rank.write_text("".join(json.dumps({"prompt": p, "responses": r, "scores": scores}) + "\n" for p, r in rows))
        assert main(["rm", "eval", "--model", str(quickstart_models["rm"]), "--data", str(rank),
                     "--out", str(tmp_path / f"{name}_eval.json")]) == 0
        out[name] = json.loads((tmp_path / f"{name}_eval.json").read_text())
        assert out[name]["pairs"] == 4 * 3  # C(3,2) pairs per row
        assert f"pairwise accuracy {out[name]['accuracy']:.4f} over 12 pairs" in capsys.readouterr().out
    assert out["gold"]["accuracy"] >= 0.75 and out["gold"]["mean_margin"] > 0, out
    assert out["reversed"]["accuracy"] == pytest.approx(1 - out["gold"]["accuracy"])
    assert out["reversed"]["mean_margin"] == pytest.approx(-out["gold"]["mean_margin"], rel=1e-5)
