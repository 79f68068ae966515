"""PPO end to end on the quickstart task (tiny models, CPU): the gold reward rises within
the KL budget, β controls the KL, PPO-ptx keeps the pretraining loss, resume is exact."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.config import PPOConfig, load_config
from rlhf.logging.metrics import read_metrics
from stages import ppo

REPO = Path(__file__).resolve().parents[2]


def ppo_config(tmp_path: Path, data: dict, models: dict, *overrides: str) -> PPOConfig:
    return load_config(PPOConfig, [str(REPO / "configs" / "ppo.yaml")], [
        f"model.path={models['sft']}", f"reward_model.path={models['rm']}",
        f"data.prompts.path={data['prompts']}", f"data.eval_prompts.path={data['prompts_eval']}",
        f"data.pretrain.path={data['pretrain']}", f"output_dir={tmp_path}", "logging.progress=false", *overrides])


def test_ppo_smoke_on_tiny_models_logs_every_metric(tmp_path, quickstart_data, tiny_model_dir):
    models = {"sft": tiny_model_dir, "rm": tiny_model_dir}
    cfg = ppo_config(tmp_path, quickstart_data, models, "ppo.iterations=2", "ppo.eval_every=1",
                     "reward.normalize=running", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
                     "ppo.micro_batch_size=2", "rollout.max_new_tokens=6", "eval.max_prompts=4", "ppo.ptx_coef=0.5")
    result = ppo.main(cfg)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("ppo/reward_raw", "ppo/reward_normalized", "ppo/kl", "ppo/kl_coef", "ppo/entropy", "ppo/policy_loss",
                "ppo/value_loss", "ppo/clip_frac", "ppo/approx_kl", "ppo/explained_variance", "ppo/advantage_mean",
                "ppo/return_mean", "ppo/response_length", "ppo/eos_rate", "ppo/ptx_loss", "perf/generate_seconds",
                "perf/score_seconds", "perf/train_seconds", "perf/generate_tokens_per_s", "eval/gold_reward"):
        assert key in rows[1], key
    assert rows[1]["ppo/kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout comes from the reference itself
    assert (result.model_dir / "model.safetensors").is_file()
    assert (tmp_path / "samples.jsonl").is_file()


@pytest.fixture(scope="session")  # session: the always-run check and the budgeted ones that reuse it run apart
def baseline(tmp_path_factory, quickstart_data, quickstart_models):
    out = tmp_path_factory.mktemp("ppo_baseline")
    cfg = ppo_config(out, quickstart_data, quickstart_models)
    return cfg, ppo.main(cfg)


@pytest.mark.slow
@pytest.mark.core
def test_gold_reward_rises_30_percent_within_the_kl_budget(baseline):
    cfg, result = baseline
    before, after = result.metrics["initial_eval/gold_reward"], result.metrics["eval/gold_reward"]
    assert after >= 1.3 * before, f"gold reward {before:.3f} -> {after:.3f}"
    assert result.metrics["eval/kl"] < cfg.kl.target
    assert result.metrics["eval/reward"] > result.metrics["initial_eval/reward"]


@pytest.mark.slow
def test_ten_times_the_kl_coefficient_ends_with_lower_kl(tmp_path, baseline, quickstart_data, quickstart_models):
    cfg, result = baseline
    strong = ppo.main(ppo_config(tmp_path, quickstart_data, quickstart_models, f"kl.coef={cfg.kl.coef * 10}"))
    assert strong.metrics["eval/kl"] < result.metrics["eval/kl"]


def pretrain_loss(model: torch.nn.Module, cfg: PPOConfig) -> float:
    from rlhf.models.loading import load_tokenizer
    from rlhf.training.lm import evaluate_lm
    from rlhf.roles.build import build_pretrain_batches

    batches = build_pretrain_batches(cfg, load_tokenizer(cfg.model))
    nll, tokens = evaluate_lm(model, batches.epoch(0), torch.device("cpu"))
    return nll / tokens


@pytest.mark.slow
def test_ptx_keeps_the_pretraining_loss_closer_to_sft(tmp_path, baseline, quickstart_data, quickstart_models):
    from transformers import AutoModelForCausalLM

    cfg, plain = baseline
    ptx = ppo.main(ppo_config(tmp_path, quickstart_data, quickstart_models, "ppo.ptx_coef=1.0"))
    sft_loss = pretrain_loss(AutoModelForCausalLM.from_pretrained(quickstart_models["sft"]), cfg)
    plain_gap = abs(pretrain_loss(plain.model, cfg) - sft_loss)
    ptx_gap = abs(pretrain_loss(ptx.model, cfg) - sft_loss)
    assert ptx_gap < plain_gap


@pytest.mark.slow
def test_resume_mid_ppo_reproduces_the_uninterrupted_run(tmp_path, quickstart_data, quickstart_models):
    short = ("ppo.iterations=4", "train.save_every=2", "ppo.eval_every=2", "ppo.rollout_batch_size=32",
             "ppo.mini_batch_size=16", "ppo.micro_batch_size=16", "kl.adaptive=true", "reward.normalize=running",
             "eval.max_prompts=16")
    straight = ppo.main(ppo_config(tmp_path / "straight", quickstart_data, quickstart_models, *short))
    # A run stopped after iteration 2: its directory holds the checkpoint of iteration 2.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-2", resumed_dir / "checkpoints" / "step-2")
    (resumed_dir / "checkpoints" / "latest").write_text("step-2")
    kept = [r for r in read_metrics(tmp_path / "straight") if r["step"] <= 2]
    (resumed_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    resumed = ppo.main(ppo_config(resumed_dir, quickstart_data, quickstart_models, *short))

    def numbers(run_dir):
        return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}
                for r in read_metrics(run_dir) if r["step"] > 2]

    assert numbers(resumed_dir) == numbers(tmp_path / "straight")
    assert resumed.metrics["kl_coef"] == straight.metrics["kl_coef"] != 0.05


def _nan_scores_on(monkeypatch, training_calls: set[int] | None, rollout_batch_size: int) -> None:
    """RewardModel.scores returns NaN on the chosen training-rollout calls (all when None)."""
    from rlhf.roles.roles import RewardModel

    real = RewardModel.scores
    seen = {"n": 0}

    def scores(self, rollout):
        out = real(self, rollout)
        if len(out) == rollout_batch_size:
            seen["n"] += 1
            if training_calls is None or seen["n"] in training_calls:
                return out * float("nan")
        return out

    monkeypatch.setattr(RewardModel, "scores", scores)


SMALL = ("ppo.iterations=4", "ppo.eval_every=4", "reward.normalize=running", "ppo.rollout_batch_size=8",
         "ppo.mini_batch_size=8", "ppo.micro_batch_size=8", "rollout.max_new_tokens=6", "eval.max_prompts=4")


def test_a_nan_reward_skips_that_update_and_is_counted(tmp_path, monkeypatch, quickstart_data, tiny_model_dir):
    _nan_scores_on(monkeypatch, {2}, 8)
    models = {"sft": tiny_model_dir, "rm": tiny_model_dir}
    result = ppo.main(ppo_config(tmp_path, quickstart_data, models, *SMALL))
    rows = {r["step"]: r for r in read_metrics(tmp_path)}
    assert rows[2]["ppo/skipped_nonfinite"] == 1 and "ppo/policy_loss" not in rows[2]
    assert rows[3]["ppo/skipped_nonfinite"] == 1 and "ppo/policy_loss" in rows[3]
    assert all(v == v for v in result.metrics.values())  # the final eval is finite


def test_nan_rewards_in_a_row_stop_the_run_without_a_checkpoint(tmp_path, monkeypatch, quickstart_data,
                                                                tiny_model_dir):
    from rlhf.errors import UserError

    _nan_scores_on(monkeypatch, None, 8)
    models = {"sft": tiny_model_dir, "rm": tiny_model_dir}
    cfg = ppo_config(tmp_path, quickstart_data, models, *SMALL, "train.save_every=1")
    with pytest.raises(UserError, match=r"ppo: 3 steps in a row with non-finite reward \(last at step 3, train.max_consecutive_nonfinite=3\)"):
        ppo.main(cfg)
    assert not list((tmp_path / "checkpoints").glob("step-*"))
