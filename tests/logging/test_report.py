"""`rlhf report`: PNG plots and report.md from metrics.jsonl, for one run and several."""

from __future__ import annotations

import json
import shutil

from rlhf.cli import main


def test_report_on_one_run_writes_plots_and_summary(logged_runs, tmp_path, capsys):
    assert main(["report", str(logged_runs["sft"]), "--out", str(tmp_path / "out")]) == 0
    png = tmp_path / "out" / "sft_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## SFT" in text and "eval loss (first → last)" in text and "sft_loss.png" in text
    assert "wrote 1 plots" in capsys.readouterr().out


def test_report_on_several_runs_plots_each_stage_and_the_frontier(logged_runs, tmp_path, capsys):
    # A second PPO run: the real one with its eval KL and rewards shifted.
    other = tmp_path / "beta_low" / "ppo"
    other.mkdir(parents=True)
    rows = [json.loads(line) for line in (logged_runs["ppo"] / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ("eval/kl", "eval/reward", "eval/gold_reward"):
            if key in row:
                row[key] += 0.5 * row["step"]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipeline = tmp_path / "pipeline"  # a directory of stage directories, as runs/quickstart
    for stage in ("sft", "rm"):
        shutil.copytree(logged_runs[stage], pipeline / stage, ignore=shutil.ignore_patterns("wandb", "model*"))

    out = tmp_path / "out"
    assert main(["report", str(pipeline), str(logged_runs["ppo"]), str(other), "--out", str(out)]) == 0
    for name in ("sft_loss", "rm_accuracy", "ppo_curves", "ppo_diagnostics", "ppo_frontier"):
        assert (out / f"{name}.png").stat().st_size > 5000, name
    text = (out / "report.md").read_text()
    for heading in ("## SFT", "## Reward model", "## PPO", "ppo_frontier.png"):
        assert heading in text
    assert "beta_low/ppo" in text  # runs with the same directory name are told apart
    assert "wrote 5 plots" in capsys.readouterr().out


def test_report_on_a_directory_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
