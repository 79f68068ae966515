"""Health alarms (rlhf/logging/alarms.py): each detector fires on a synthetic history that shows
its failure and stays quiet on a healthy one shaped like the quickstart PPO run; an alarm fires
once per episode; the `alarms` config section is typed."""

import random

import pytest

from rlhf.config import PPOConfig, load_config
from rlhf.config_sections import AlarmsConfig
from rlhf.errors import ConfigError
from rlhf.logging.alarms import DETECTORS, AlarmMonitor

ITERATIONS, EVAL_EVERY, KL_TARGET = 40, 10, 6.0


def healthy(step: int, noise: random.Random) -> dict[str, float]:
    """One iteration of a healthy run (the quickstart's shape: reward and KL rise and level off,
    length and EOS rate steady, entropy drifts down a little, the fresh critic's explained
    variance starts negative for a few iterations), with batch noise."""
    t = step / ITERATIONS
    jitter = lambda scale: noise.uniform(-scale, scale)  # noqa: E731
    row = {"ppo/reward_raw": 2.5 * t + jitter(0.5), "ppo/kl": 1.5 * t + jitter(0.3),
           "ppo/response_length": 11 + jitter(1), "ppo/eos_rate": 1 - abs(jitter(0.03)),
           "ppo/entropy": 1.1 - 0.2 * t + jitter(0.05), "ppo/repetition": 0.05 + jitter(0.02),
           "ppo/explained_variance": -7 / step if step <= 5 else 0.4 + jitter(0.2),
           "ppo/clip_frac": 0.012 + jitter(0.005), "ppo/approx_kl": 0.002 + jitter(0.001)}
    if step % EVAL_EVERY == 0:
        row.update({"eval/reward": 2.2 * t - 0.4 + jitter(0.1), "eval/gold_reward": 0.45 + 0.2 * t + jitter(0.01)})
    return row


def history(**changes) -> list[dict]:
    """metrics.jsonl rows of a healthy run (step 0 the initial evaluation), with `changes`:
    metric -> f(step, healthy value) -> the value logged instead."""
    noise = random.Random(0)
    rows = [{"step": 0, "eval/reward": -0.4, "eval/gold_reward": 0.45}]
    for step in range(1, ITERATIONS + 1):
        row = healthy(step, noise)
        for key, change in changes.items():
            if key in row:
                row[key] = change(step, row[key])
        rows.append({"step": step, **row})
    return rows


def late(value: float, start: int = 25):
    """From iteration `start` on, `value` instead of the healthy one."""
    return lambda step, healthy_value: value if step >= start else healthy_value


def fired(rows: list[dict], **settings) -> dict[str, int]:
    return {a.name: a.step for a in AlarmMonitor(AlarmsConfig(**settings), KL_TARGET).replay(rows)}


def test_a_healthy_run_stays_quiet():
    assert fired(history()) == {}


PROVOKED = {
    "overoptimization": {"eval/gold_reward": lambda step, gold: gold if step <= 20 else 0.6 - 0.01 * (step - 20)},
    "kl_budget": {"ppo/kl": late(8.0)},
    "length_growth": {"ppo/response_length": lambda step, length: length * (1 + max(step - 20, 0) / 10)},
    "repetition": {"ppo/repetition": late(0.5)},
    "eos_collapse": {"ppo/eos_rate": late(0.3)},
    "entropy_collapse": {"ppo/entropy": late(0.2)},
    "value_explained_variance": {"ppo/explained_variance": late(-0.5)},
    "clip_frac_high": {"ppo/clip_frac": late(0.45)},
    "approx_kl_high": {"ppo/approx_kl": late(0.2)},
}


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_each_alarm_fires_on_its_failure_and_only_it(name):
    alarms = fired(history(**PROVOKED[name]))
    assert list(alarms) == [name]
    assert alarms[name] >= 25 if name != "overoptimization" else alarms[name] == 40


def test_overoptimization_without_a_gold_reward_compares_training_and_held_out_reward():
    rows = [{k: v for k, v in row.items() if k != "eval/gold_reward"} for row in history()]
    assert fired(rows) == {}
    for row in rows[21:]:
        row.update({"eval/reward": 1.0 - 0.05 * (row["step"] - 20)} if "eval/reward" in row else {})
    assert fired(rows) == {"overoptimization": 40}


def test_an_alarm_fires_once_per_episode_and_again_after_it_cleared():
    # KL 9 in iterations 11-20 and again from 31 on: two episodes, two alarms. The mean of the
    # last 5 crosses the budget 6 at the fourth such iteration: (4·9 + KL ≥ 0) / 5 ≥ 7.2, while
    # after three (3·9 + 2 healthy KLs ≤ 2·(1.5·30/40 + 0.3)) / 5 ≤ 5.97.
    over = lambda step, kl: 9.0 if 11 <= step <= 20 or step >= 31 else kl  # noqa: E731
    monitor = AlarmMonitor(AlarmsConfig(), KL_TARGET)
    alarms = monitor.replay(history(**{"ppo/kl": over}))
    assert [(a.name, a.step) for a in alarms] == [("kl_budget", 14), ("kl_budget", 34)]
    line = alarms[0].line()
    assert "kl_budget" in line and "> budget 6" in line and "kl.coef" in line
    assert AlarmMonitor(AlarmsConfig(kl_budget=10.0), KL_TARGET).replay(history(**{"ppo/kl": over})) == []
    assert AlarmMonitor(AlarmsConfig(enabled=False), KL_TARGET).replay(history(**{"ppo/kl": over})) == []


def test_the_alarms_section_is_typed_and_checked(tmp_path):
    paths = ["model.path=m", "reward_model.path=r", "data.prompts.path=p.jsonl"]
    cfg = load_config(PPOConfig, [], [*paths, "alarms.window=3", "alarms.kl_budget=2.5"])
    assert (cfg.alarms.window, cfg.alarms.kl_budget) == (3, 2.5)
    with pytest.raises(ConfigError, match="alarms.*kl_bugdet"):
        load_config(PPOConfig, [], [*paths, "alarms.kl_bugdet=2"])
    with pytest.raises(ConfigError, match="alarms.eos_drop"):
        load_config(PPOConfig, [], [*paths, "alarms.eos_drop=1.5"])
