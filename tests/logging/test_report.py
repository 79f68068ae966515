"""`rlhf report`: PNG plots and report.md from metrics.jsonl, for one run and several."""

from __future__ import annotations

import json
import shutil

from rlhf.cli import main
from rlhf.logging.report import make_report


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


# ---------------------------------------------------------------------------------------
# DPO and critic-free PPO runs, from synthetic metrics.jsonl files (the names the stages log)


def _write_run(path, rows, config=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (path / "config.yaml").write_text(config)


def _dpo_rows() -> list[dict]:
    """6 steps, eval at 0, 3 and 6: loss from ln 2 down, accuracy and margin up, the preferred
    answer's implicit reward up and the other's down, gold reward of sampled answers up."""
    rows = []
    for step in range(7):
        row = {"step": step, "time": float(step), "perf/peak_memory_gb": 0.5, "perf/mfu": 0.01}
        names = (["dpo"] if step else []) + (["eval"] if step % 3 == 0 else [])
        for prefix in names:
            row.update({f"{prefix}/loss": 0.6931 - 0.03 * step, f"{prefix}/accuracy": 0.1 * step,
                        f"{prefix}/margin": 0.2 * step, f"{prefix}/reward_chosen": 0.1 * step,
                        f"{prefix}/reward_rejected": -0.1 * step, f"{prefix}/chosen_logps": -60.0 - step,
                        f"{prefix}/rejected_logps": -70.0 - 3 * step})
        if step:
            row.update({"dpo/lr": 1e-3, "dpo/grad_norm": 0.5, "dpo/skipped_nonfinite": 0.0, "perf/pairs_per_s": 20.0,
                        "perf/step_seconds": 1.0})
        if step % 3 == 0:
            row.update({"eval/pairs": 60.0, "eval/gold_reward": 0.4 + 0.05 * step, "eval/response_length": 9.0,
                        "eval/eos_rate": 1.0})
        rows.append(row)
    return rows


FAILURES = ("errors", "timeouts", "nonfinite", "skipped")


def _grpo_rows(functions: bool = True) -> list[dict]:
    """5 iterations of a critic-free run, 4 answers per prompt, eval at 0 and 5; with
    `functions`, reward sources model, `rw:gold` and `rw:parts` (components length, upper) and
    one timeout at iteration 3."""
    rows = [{"step": 0, "time": 0.0, "eval/reward": 0.2, "eval/kl": 0.0, "eval/response_length": 6.0,
             "eval/eos_rate": 0.5, "eval/gold_reward": 0.3}]
    for step in range(1, 6):
        row = {"step": step, "time": float(step), "ppo/skipped_nonfinite": 0.0, "ppo/reward_raw": 0.2 + 0.1 * step,
               "ppo/reward_normalized": 0.1 * step, "ppo/kl": 0.05 * step, "ppo/kl_coef": 0.05,
               "ppo/response_length": 6.0, "ppo/eos_rate": 0.5, "ppo/advantage_mean": 0.0, "ppo/advantage_std": 0.9,
               "ppo/group_reward_std_mean": 0.5 - 0.05 * step, "ppo/uniform_group_share": 0.1 * step,
               "ppo/policy_loss": -0.01, "ppo/clip_frac": 0.1, "ppo/approx_kl": 0.01, "ppo/ratio_mean": 1.0,
               "ppo/entropy": 6.0, "ppo/actor_grad_norm": 1.0, "perf/samples_per_s": 8.0, "perf/mfu": 0.01,
               "perf/peak_memory_gb": 0.5, "reward/model": 0.1 * step}
        row.update({f"reward/function_{kind}": 0.0 for kind in FAILURES})
        if functions:
            row.update({"reward/rw:gold": 0.05 * step, "reward/rw:parts": 0.2, "reward/rw:parts/length": 0.15,
                        "reward/rw:parts/upper": 0.05, "reward/function_timeouts": 1.0 if step == 3 else 0.0})
        rows.append(row)
    rows[-1].update({"eval/reward": 0.6, "eval/kl": 0.3, "eval/response_length": 5.0, "eval/eos_rate": 0.75,
                     "eval/gold_reward": 0.5})
    return rows


GRPO_CONFIG = """rollout:
  n_samples_per_prompt: 4
reward:
  functions: [rw:gold, rw:parts]
ppo:
  advantage: grpo
"""


def test_report_on_a_dpo_and_a_grpo_run_draws_every_new_panel_and_summary_row(tmp_path, capsys):
    _write_run(tmp_path / "dpo", _dpo_rows(), "loss:\n  beta: 0.1\n  loss_type: sigmoid\n")
    _write_run(tmp_path / "grpo", _grpo_rows(), GRPO_CONFIG)
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "dpo"), str(tmp_path / "grpo"), "--out", str(out)]) == 0
    assert "wrote 5 plots" in capsys.readouterr().out
    report = make_report([tmp_path / "dpo", tmp_path / "grpo"], out)
    # Every panel, by the titles of those that drew data: a missing metric or plot fails here.
    assert report.panels == {
        "dpo_curves.png": ["DPO loss (ln 2 dotted: the start)",
                           "preference accuracy (0.5 dotted)",
                           "implicit reward margin, preferred − other", "implicit rewards β·log(π/π_ref)",
                           "policy log-probs of the answers", "gradient norm",
                           "gold reward of sampled held-out answers"],
        "ppo_curves.png": ["PPO reward", "KL to the SFT reference", "KL coefficient β"],
        "ppo_diagnostics.png": ["response length (tokens)", "EOS rate", "entropy (nats/token)", "clip fraction",
                                "approx KL (old vs new policy)"],  # no explained variance: no critic
        "ppo_groups.png": ["group reward mean (the rewards groups compare)",
                           "within-group reward std (mean over groups)", "share of groups with all rewards equal"],
        "ppo_rewards.png": ["reward by source", "reward-function components", "reward-function failures per iteration"],
    }
    for name in report.panels:
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name

    text = (out / "report.md").read_text()
    assert "`" + str(tmp_path / "dpo") + "` (dpo, loss sigmoid β=0.1)" in text
    assert "`" + str(tmp_path / "grpo") + "` (ppo, advantage grpo)" in text
    # DPO: loss 0.6931 - 0.03·6 = 0.5131; eval accuracy 0 → 0.6; margin 1.2; implicit rewards
    # 0.6 / -0.6; log-probs -66 / -88; gold 0.4 → 0.7; 20 pairs/s.
    assert ("| dpo | sigmoid β=0.1 | 6 | 0.5131 | 0.6931 → 0.5131 | 0 → 0.6 | 0.6 | 1.2 | 0.6 / -0.6 | -66 / -88 "
            "| 0.4 → 0.7 | 0 | 20 | 0.01 | 0.5 |") in text
    assert "![DPO loss, accuracy, margin, implicit rewards and log-probs](dpo_curves.png)" in text
    # PPO: the estimator, then groups (mean 0.1 → 0.5, std 0.45 → 0.25, uniform share 0.1 → 0.5,
    # median 0.3), every source's last value and one timeout.
    assert "| grpo | grpo | 5 | 0.2 → 0.6 | 0.3 → 0.5 | 0.3 | 0.05 | 0.75 | 5 |" in text
    assert ("| grpo | 4 | 0.1 → 0.5 | 0.45 → 0.25 | 0.1 → 0.5 | 0.3 | `model` 0.5, `rw:gold` 0.25, "
            "`rw:parts` 0.2, `rw:parts/length` 0.15, `rw:parts/upper` 0.05 | 0 / 1 / 0 / 0 | 0 |") in text
    for name in ("ppo_groups.png", "ppo_rewards.png"):
        assert f"({name})" in text


def test_report_tells_a_critic_free_run_without_config_and_counts_failed_iterations(tmp_path):
    # No config.yaml: critic-free from the metrics (no explained variance / value loss). The
    # reward functions failed in iteration 2 (every one of 8 calls raised): only the failure
    # counts were logged and the iteration was skipped.
    rows = _grpo_rows(functions=False)
    rows[2] = {"step": 2, "time": 2.0, "reward/function_errors": 8.0, "reward/function_timeouts": 0.0,
               "reward/function_nonfinite": 0.0, "reward/function_skipped": 0.0, "ppo/skipped_nonfinite": 1.0,
               # per-function counts (logged when there are several functions) are no reward source
               "reward/function_errors/rw:gold": 8.0, "reward/function_errors/rw:parts": 0.0}
    # The last evaluation's calls: 2 timeouts (an evaluation logs its failures only when there are some).
    rows[5].update({"eval/function_errors": 0.0, "eval/function_timeouts": 2.0, "eval/function_nonfinite": 0.0,
                    "eval/function_skipped": 0.0})
    _write_run(tmp_path / "rloo", rows)
    report = make_report([tmp_path / "rloo"], tmp_path / "out")
    assert report.runs[0].critic_free and report.runs[0].estimator == "critic-free"
    # Only the model as source: no components panel, but the failures (and the groups) are drawn.
    assert report.panels["ppo_rewards.png"] == ["reward by source", "reward-function failures per iteration"]
    assert "ppo_groups.png" in report.panels
    # Uniform-group share median over the iterations that trained: 0.1, 0.3, 0.4, 0.5 -> 0.35.
    row = ("| rloo | – | 0.1 → 0.5 | 0.45 → 0.25 | 0.1 → 0.5 | 0.35 | `model` 0.5 | 8 / 0 / 0 / 0 (eval: 0 / 2 / 0 / 0) "
           "| 1 |")
    assert row in report.text


def test_report_on_a_gae_run_draws_no_group_or_source_panels(tmp_path):
    # A critic run with one reward model, 1 sample per prompt: the PPO plots as before.
    rows = _grpo_rows(functions=False)
    for row in rows[1:]:
        for key in ("ppo/group_reward_std_mean", "ppo/uniform_group_share"):
            del row[key]
        row.update({"ppo/explained_variance": 0.5, "ppo/value_loss": 0.1})
    _write_run(tmp_path / "ppo", rows)
    report = make_report([tmp_path / "ppo"], tmp_path / "out")
    assert report.runs[0].estimator == "gae" and not report.runs[0].critic_free
    assert sorted(report.panels) == ["ppo_curves.png", "ppo_diagnostics.png"]
    assert "explained variance" in report.panels["ppo_diagnostics.png"]
    assert "Groups and reward sources" not in report.text
