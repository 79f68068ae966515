"""Trackers: W&B offline history and config, TensorBoard scalars, sample tables, no network,
no secrets in any file a run writes; the JSONL files on fresh and resumed runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from logging_helpers import SECRETS, wandb_history, wandb_run_record

from rlhf.config import SFTConfig, load_config
from rlhf.errors import ConfigError
from rlhf.logging.metrics import MetricsWriter, read_metrics, read_samples
from rlhf.logging.trackers import REDACTED, public_config

SFT_KEYS = {"sft/loss", "sft/lr", "sft/grad_norm", "perf/tokens_per_s", "perf/mfu", "perf/peak_memory_gb", "eval/loss"}
PPO_KEYS = {"ppo/reward_raw", "ppo/kl", "ppo/kl_coef", "perf/generate_seconds", "perf/train_seconds", "perf/mfu",
            "perf/peak_memory_gb", "eval/reward"}


def numeric_keys(rows: list[dict]) -> set[str]:
    return {k for row in rows for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------------
# Fast: no model


def test_public_config_removes_secret_keys_and_secret_env_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-abcdef123456")
    config = {"model": {"path": "/models/x", "tokenizer": "tok", "hf_token": "hf_xyz", "max_new_tokens": 8},
              "logging": {"api_key": "k" * 12, "password": None, "note": "uses tok-abcdef123456 inside"},
              "list": ["tok-abcdef123456"]}
    clean = public_config(config)
    assert clean["model"] == {"path": "/models/x", "tokenizer": "tok", "hf_token": REDACTED, "max_new_tokens": 8}
    assert clean["logging"] == {"api_key": REDACTED, "password": None, "note": f"uses {REDACTED} inside"}
    assert clean["list"] == [REDACTED]


def test_jsonl_fresh_run_starts_over_and_resumed_run_keeps_rows_up_to_its_step(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(5):
        writer.log(step, {"a": float(step), "bad": math.nan})
    writer.log_table("t", 2, [{"x": "p", "y": 1.0}])
    writer.log_table("t", 4, [{"x": "q", "y": 2.0}])
    writer.finish()
    assert read_metrics(tmp_path)[1]["bad"] == "nan"

    MetricsWriter(tmp_path, resume_step=2).finish()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert read_samples(tmp_path, "t") == [{"table": "t", "step": 2, "x": "p", "y": 1.0}]

    MetricsWriter(tmp_path).finish()
    assert read_metrics(tmp_path) == [] and not (tmp_path / "samples.jsonl").exists()


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False)
    writer.log(1, {"a": 1.0})
    writer.log_table("t", 1, [{"a": 1}])
    writer.finish()
    assert not (tmp_path / "run").exists()


def test_logging_config_checks_mode_and_peak():
    with pytest.raises(ConfigError, match="wandb_mode"):
        load_config(SFTConfig, [], ["data.train.path=x.jsonl", "model.tiny={}", "logging.wandb_mode=cloud"])
    with pytest.raises(ConfigError, match="peak_flops"):
        load_config(SFTConfig, [], ["data.train.path=x.jsonl", "model.tiny={}", "logging.peak_flops=-1"])
    cfg = load_config(SFTConfig, [], ["data.train.path=x.jsonl", "model.tiny={}", "logging.peak_flops=2.5e14",
                                      "logging.group=p1"])
    assert cfg.logging.peak_flops == 2.5e14 and cfg.logging.group == "p1"


# ---------------------------------------------------------------------------------------
# Tiny runs (conftest.logged_runs)


def test_wandb_offline_run_history_has_the_stage_metrics(logged_runs):
    sft_dir = logged_runs["sft"]
    history = wandb_history(sft_dir)
    logged = {k for row in history for k in row}
    assert SFT_KEYS <= logged
    assert numeric_keys(read_metrics(sft_dir)) <= logged  # every JSONL scalar reached W&B
    assert sorted({row["_step"] for row in history}) == [r["step"] for r in read_metrics(sft_dir)]
    run = wandb_run_record(sft_dir)
    assert (run.job_type, run.run_group, run.project) == ("sft", "pipeline-test", "rlhf")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["max_steps"] == 4 and config["logging"]["group"] == "pipeline-test"

    ppo_history = wandb_history(logged_runs["ppo"])
    assert PPO_KEYS <= {k for row in ppo_history for k in row}
    tables = {k.rsplit("/", 1)[0] for row in ppo_history for k in row if k.endswith("/_type") and row[k] == "table-file"}
    assert tables == {"eval/samples", "ppo/samples"}


def test_tensorboard_holds_the_same_scalars_as_metrics_jsonl(logged_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in ("sft", "rm", "ppo"):
        rows = read_metrics(logged_runs[stage])
        events = EventAccumulator(str(logged_runs[stage] / "tensorboard")).Reload()
        assert set(events.Tags()["scalars"]) == numeric_keys(rows), stage
        for key in ("sft/loss", "rm/accuracy", "ppo/kl"):
            if key in events.Tags()["scalars"]:
                expected = [(r["step"], r[key]) for r in rows if key in r]
                assert [(e.step, e.value) for e in events.Scalars(key)] == [(s, pytest.approx(v, rel=1e-6))
                                                                            for s, v in expected]


def test_every_stage_row_has_mfu_and_peak_memory(logged_runs):
    for stage in ("sft", "rm", "ppo"):
        rows = read_metrics(logged_runs[stage])
        train_rows = [r for r in rows if r["step"] > 0]
        assert train_rows and all(0 < r["perf/mfu"] < 1 for r in train_rows), stage
        assert all(r["perf/peak_memory_gb"] > 0.05 for r in rows), stage


def test_sample_tables_hold_prompt_response_reward_kl_length(logged_runs):
    ppo_dir = logged_runs["ppo"]
    rollouts = read_samples(ppo_dir, "ppo/samples")
    assert sorted({r["step"] for r in rollouts}) == [1, 2]  # ppo.sample_every=1, two iterations
    assert {"prompt", "response", "reward", "kl", "length"} <= set(rollouts[0])
    assert all(0 < r["length"] <= 6 for r in rollouts)
    evals = read_samples(ppo_dir, "eval/samples")
    assert sorted({r["step"] for r in evals}) == [0, 1, 2] and "length" in evals[0]
    assert list(ppo_dir.glob("wandb/offline-run-*/files/media/table/ppo/samples_*.table.json"))

    rm_rows = read_samples(logged_runs["rm"], "eval/rm_samples")
    assert rm_rows and {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"} <= set(rm_rows[0])
    assert all(r["chosen"] != r["rejected"] for r in rm_rows)


def test_no_connection_left_the_machine(logged_runs):
    assert logged_runs["connections"] == []


def test_no_secret_appears_in_any_file_the_runs_wrote(logged_runs):
    checked = 0
    for stage in ("sft", "rm", "ppo"):
        for path in Path(logged_runs[stage]).rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                checked += 1
                for name, value in SECRETS.items():
                    assert value.encode() not in data, f"{name} found in {path}"
    assert checked > 20
