"""The `rlhf` command: listed commands, one-line user errors, data tools."""

import json
import subprocess
import sys

import pytest

from rlhf.cli import main
from stages import STAGES


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in (*STAGES, "data", "generate"):
        assert command in out


@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "pipeline", "generate"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: rlhf " + command in capsys.readouterr().out


def test_sft_help_documents_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert "data.max_prompt_length" in out and "train.global_batch_size" in out


def test_pipeline_without_a_config_names_the_stage_and_field(capsys):
    assert main(["pipeline"]) == 2
    assert "sft section: model.path is required" in capsys.readouterr().err


def test_pipeline_rejects_stages_out_of_order(capsys):
    assert main(["pipeline", "--config", "configs/pipeline.yaml", "stages=[ppo,sft]"]) == 2
    assert "stages run in the order sft, rm, dpo, ppo" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_a_stage_without_a_model_fails_with_one_line(stage, capsys):
    assert main([stage]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.path is required") and err.count("\n") == 1


def test_user_mistake_exits_2_with_one_line_and_no_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  path: x\ntrain:\n  lrr: 1\n")
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "sft", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "accelerator" not in line]
    assert lines == [f"error: {config}:4: unknown key 'train.lrr'; valid keys in train: " + lines[0].split(": ", 3)[-1]]
    assert "Traceback" not in proc.stderr


def test_bad_data_row_is_one_clear_error(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "hi", "response": "yo"}\n{"prompt": "hi", "response": 3}\n')
    code = main(["sft", "model.tiny={}", f"data.train.path={data}", f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data}:2: field 'response'") and "\n" not in err
    assert not (tmp_path / "run" / "model").exists()


def test_missing_model_path_fails_before_training(tmp_path, quickstart_data, capsys):
    code = main(["sft", f"model.path={tmp_path / 'nope'}", f"data.train.path={quickstart_data['sft']}",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "no such directory" in capsys.readouterr().err


def test_data_inspect_counts_lengths_and_truncation(quickstart_data, tiny_model_dir, capsys):
    assert main(["data", "inspect", quickstart_data["rank"], "--kind", "rank", "--tokenizer", str(tiny_model_dir),
                 "--max-length", "12", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    rows = sum(1 for _ in open(quickstart_data["rank"]))
    assert stats["records"] == rows and stats["sequences"] == 4 * rows
    assert stats["length_p50"] <= stats["length_p90"] <= stats["length_p100"]
    assert 0 < stats["truncated_at_max_length"] <= stats["sequences"]
    assert stats["pairs"] > rows  # K=4 answers give up to 6 pairs each
    assert main(["data", "inspect", quickstart_data["sft"], "--kind", "sft", "--tokenizer", str(tiny_model_dir),
                 "--max-length", "10000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["truncated_at_max_length"] == 0


def test_data_inspect_bad_file_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    assert main(["data", "inspect", str(bad), "--kind", "pretrain"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_data_synth_writes_every_set_and_gold_reward_ranks_them(tmp_path, capsys):
    from rlhf.data.quickstart import gold_reward

    assert main(["data", "synth", "--out", str(tmp_path)]) == 0
    for name in ("sft", "rank", "prompts", "prompts_eval", "pretrain"):
        assert (tmp_path / f"{name}.jsonl").stat().st_size > 0
    train_prompts = {json.loads(l)["prompt"] for l in open(tmp_path / "prompts.jsonl")}
    eval_prompts = {json.loads(l)["prompt"] for l in open(tmp_path / "prompts_eval.jsonl")}
    assert not train_prompts & eval_prompts
    row = json.loads(open(tmp_path / "rank.jsonl").readline())
    assert row["scores"] == [round(gold_reward(row["prompt"], r), 6) for r in row["responses"]]


def test_generate_answers_prompts(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "List 2 cats.", "--prompt", "Name 3 owls.",
                 "--max-new-tokens", "5", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["List 2 cats.", "Name 3 owls."]
    assert all(isinstance(r["response"], str) for r in rows)


def test_rm_score_writes_one_score_per_answer_as_the_model_scores_them(tiny_model_dir, tmp_path, capsys):
    import torch
    from transformers import AutoTokenizer

    from rlhf.config_sections import ModelConfig
    from rlhf.models.export import export_pretrained
    from rlhf.models.reward import load_scalar_model

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_scalar_model(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), seed=3)
    model.config.pad_token_id = tok.pad_token_id
    export_pretrained(model, tok, tmp_path / "rm")
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "List 2 cats.", "chosen": "cat, lion", "rejected": "dog"},
            {"prompt": "Name 3 owls.", "responses": ["barn owl, snowy owl, eagle owl", "owl", "cat"]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    assert main(["rm", "score", "--model", str(tmp_path / "rm"), "--data", str(data), "--out", str(out)]) == 0
    assert f"wrote scores of 2 rows to {out}" in capsys.readouterr().out
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["scores"]) for r in scored] == [2, 3]
    again = tmp_path / "again.jsonl"
    assert main(["rm", "score", "--model", str(tmp_path / "rm"), "--data", str(data), "--out", str(again),
                 "--batch-size", "1"]) == 0
    for a, b in zip(scored, (json.loads(line) for line in again.read_text().splitlines())):
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)  # batching does not change a score
