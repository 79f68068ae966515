"""Health alarms of a PPO / GRPO run: pure detectors over the history of its metrics, and the
monitor that checks them each iteration and fires each one once per episode.

A detector takes a `MetricHistory` and the `alarms` config section and returns what it saw
(the numbers, as one sentence) or None. What each alarm means and what to try is in `ADVICE`
and docs/dashboards.md. The thresholds are `AlarmsConfig` fields (rlhf/config_sections.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from rlhf.config_sections import AlarmsConfig

EVAL_REWARD, GOLD_REWARD, TRAIN_REWARD = "eval/reward", "eval/gold_reward", "ppo/reward_raw"


@dataclass
class MetricHistory:
    """The per-iteration series of a run's scalar metrics, and its evaluations."""

    series: dict[str, list[float]] = field(default_factory=dict)
    """metric name -> its finite values, in step order."""
    evals: list[dict[str, float]] = field(default_factory=list)
    """One entry per evaluation: step, eval/reward, eval/gold_reward when logged, and
    ppo/reward_raw as the mean training reward of the iterations since the previous evaluation
    (absent at step 0)."""
    _since_eval: list[float] = field(default_factory=list)

    def add(self, step: int, row: Mapping[str, float]) -> None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.series.setdefault(key, []).append(float(value))
        if isinstance(row.get(TRAIN_REWARD), (int, float)):
            self._since_eval.append(float(row[TRAIN_REWARD]))
        if isinstance(row.get(EVAL_REWARD), (int, float)):
            point = {"step": float(step), EVAL_REWARD: float(row[EVAL_REWARD])}
            if isinstance(row.get(GOLD_REWARD), (int, float)):
                point[GOLD_REWARD] = float(row[GOLD_REWARD])
            if self._since_eval:
                point[TRAIN_REWARD] = _mean(self._since_eval)
            self.evals.append(point)
            self._since_eval = []

    @classmethod
    def of(cls, rows: Iterable[Mapping[str, float]]) -> "MetricHistory":
        """From metrics.jsonl rows (each with its "step")."""
        history = cls()
        for row in rows:
            history.add(int(row.get("step", 0)), row)
        return history

    def last(self, key: str, n: int) -> list[float] | None:
        """The last n values of `key`, or None when fewer were logged."""
        values = self.series.get(key, [])
        return values[-n:] if len(values) >= n else None

    def first_and_last(self, key: str, n: int) -> tuple[float, float] | None:
        """Mean of the first n and of the last n values, once 2n were logged (no overlap)."""
        values = self.series.get(key, [])
        return (_mean(values[:n]), _mean(values[-n:])) if len(values) >= 2 * n else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _slope(values: list[float]) -> float:
    """Least-squares slope against 0, 1, 2, ... (per evaluation)."""
    n = len(values)
    centre = (n - 1) / 2
    return sum((i - centre) * (v - _mean(values)) for i, v in enumerate(values)) / sum((i - centre) ** 2 for i in range(n))


# ---------------------------------------------------------------------------------------
# Detectors: (history, config) -> what was seen, or None


def overoptimization(history: MetricHistory, cfg: AlarmsConfig) -> str | None:
    k = cfg.overoptimization_evals
    gold = bool(history.evals) and all(GOLD_REWARD in e for e in history.evals)
    proxy, truth = (EVAL_REWARD, GOLD_REWARD) if gold else (TRAIN_REWARD, EVAL_REWARD)
    points = [e for e in history.evals if proxy in e and truth in e][-k:] if k else []
    if k < 2 or len(points) < k:
        return None
    proxies, truths = [p[proxy] for p in points], [p[truth] for p in points]
    every = [e[truth] for e in history.evals if truth in e]
    fall = -_slope(truths) * (k - 1)  # of the fitted line over the window
    if not (_slope(proxies) > 0 and fall > cfg.overoptimization_min_fall * (max(every) - min(every))):
        return None
    names = ("held-out reward-model score", "gold reward") if gold else ("training reward", "held-out reward")
    return (f"{names[0]} {proxies[0]:.4g} -> {proxies[-1]:.4g} while {names[1]} {truths[0]:.4g} -> {truths[-1]:.4g} "
            f"over the last {k} evaluations (iterations {int(points[0]['step'])}-{int(points[-1]['step'])})")


def kl_budget(history: MetricHistory, cfg: AlarmsConfig) -> str | None:
    values = history.last("ppo/kl", cfg.window)
    if cfg.kl_budget is None or values is None or _mean(values) <= cfg.kl_budget:
        return None
    return f"KL to the reference {_mean(values):.4g} nats/answer (mean of the last {cfg.window}) > budget {cfg.kl_budget:.4g}"


def _growth(history: MetricHistory, cfg: AlarmsConfig, key: str, what: str, factor: float, rising: bool) -> str | None:
    """The last window's mean beyond `factor` times the first window's (above when rising)."""
    ends = history.first_and_last(key, cfg.window) if factor else None
    if ends is None:
        return None
    start, now = ends
    if (now > factor * start) if rising else (now < factor * start):
        return (f"{what} {start:.4g} -> {now:.4g} (first vs last {cfg.window} iterations, "
                f"{'above' if rising else 'below'} {factor:g}x the start)")
    return None


def length_growth(history: MetricHistory, cfg: AlarmsConfig) -> str | None:
    return _growth(history, cfg, "ppo/response_length", "response length (tokens)", cfg.length_growth, rising=True)


def repetition(history: MetricHistory, cfg: AlarmsConfig) -> str | None:
    ends = history.first_and_last("ppo/repetition", cfg.window) if cfg.repetition_rise else None
    if ends is None or ends[1] - ends[0] <= cfg.repetition_rise:
        return None
    return (f"repeated {cfg.repetition_ngram}-gram share {ends[0]:.3g} -> {ends[1]:.3g} (first vs last {cfg.window} "
            f"iterations, a rise above {cfg.repetition_rise:g})")


def eos_collapse(history: MetricHistory, cfg: AlarmsConfig) -> str | None:
    return _growth(history, cfg, "ppo/eos_rate", "EOS rate", cfg.eos_drop, rising=False)


def entropy_collapse(history: MetricHistory, cfg: AlarmsConfig) -> str | None:
    return _growth(history, cfg, "ppo/entropy", "entropy (nats/token)", cfg.entropy_drop, rising=False)


def value_explained_variance(history: MetricHistory, cfg: AlarmsConfig) -> str | None:
    n = cfg.explained_variance_patience
    values = history.last("ppo/explained_variance", n) if n else None
    if values is None or max(values) >= 0:
        return None
    return f"critic explained variance negative {n} iterations in a row (mean {_mean(values):.3g}, last {values[-1]:.3g})"


def _ceiling(history: MetricHistory, cfg: AlarmsConfig, key: str, what: str, limit: float) -> str | None:
    values = history.last(key, cfg.window) if limit else None
    if values is None or _mean(values) <= limit:
        return None
    return f"{what} {_mean(values):.4g} (mean of the last {cfg.window}) > {limit:g}"


def clip_frac_high(history: MetricHistory, cfg: AlarmsConfig) -> str | None:
    return _ceiling(history, cfg, "ppo/clip_frac", "clip fraction", cfg.clip_frac_max)


def approx_kl_high(history: MetricHistory, cfg: AlarmsConfig) -> str | None:
    return _ceiling(history, cfg, "ppo/approx_kl", "approx KL of an update (per token)", cfg.approx_kl_max)


DETECTORS: dict[str, Callable[[MetricHistory, AlarmsConfig], str | None]] = {
    "overoptimization": overoptimization,
    "kl_budget": kl_budget,
    "length_growth": length_growth,
    "repetition": repetition,
    "eos_collapse": eos_collapse,
    "entropy_collapse": entropy_collapse,
    "value_explained_variance": value_explained_variance,
    "clip_frac_high": clip_frac_high,
    "approx_kl_high": approx_kl_high,
}
ADVICE = {
    "overoptimization": "the policy exploits the reward model: stop at the best evaluation's checkpoint, raise kl.coef, "
                        "or train the reward model on more (and on-policy) data",
    "kl_budget": "raise kl.coef or set kl.adaptive=true (it steers towards kl.target), lower ppo.actor_lr",
    "length_growth": "length hacking? read samples.jsonl; raise kl.coef, check whether the reward favours long answers, "
                     "set reward.missing_eos_penalty",
    "repetition": "repetition hacking? read samples.jsonl; raise kl.coef or ppo.entropy_coef, lower ppo.actor_lr, "
                  "check what the reward model pays for",
    "eos_collapse": "answers run to rollout.max_new_tokens: set reward.missing_eos_penalty, raise kl.coef",
    "entropy_collapse": "the policy turns deterministic: raise ppo.entropy_coef or kl.coef, lower ppo.actor_lr",
    "value_explained_variance": "the critic does not learn the returns: raise ppo.critic_lr or "
                                "ppo.critic_warmup_iterations, check reward.normalize and reward.clip",
    "clip_frac_high": "updates leave the trust region: lower ppo.actor_lr or ppo.ppo_epochs, raise ppo.mini_batch_size",
    "approx_kl_high": "updates move the policy too far: lower ppo.actor_lr or ppo.ppo_epochs, raise ppo.mini_batch_size",
}


@dataclass(frozen=True)
class Alarm:
    name: str
    step: int
    seen: str
    """What the detector saw, with the numbers."""

    @property
    def metric(self) -> str:
        return f"alarms/{self.name}"

    def line(self) -> str:
        return f"ALARM {self.name} at iteration {self.step}: {self.seen}; try: {ADVICE[self.name]}"


class AlarmMonitor:
    """Checks every detector after each iteration; an alarm fires when its condition starts to
    hold, and again only after the condition cleared in between (once per episode)."""

    def __init__(self, cfg: AlarmsConfig, kl_target: float):
        budget = cfg.kl_budget if cfg.kl_budget is not None else kl_target
        self.cfg = dataclasses.replace(cfg, kl_budget=budget)
        self.history = MetricHistory()
        self.active: set[str] = set()

    def check(self, step: int, row: Mapping[str, float]) -> list[Alarm]:
        """Add step's row to the history; the alarms that start firing at it."""
        self.history.add(step, row)
        if not self.cfg.enabled:
            return []
        fired = []
        for name, detect in DETECTORS.items():
            seen = detect(self.history, self.cfg)
            if seen is None:
                self.active.discard(name)
            elif name not in self.active:
                self.active.add(name)
                fired.append(Alarm(name, step, seen))
        return fired

    def replay(self, rows: Iterable[Mapping[str, float]]) -> list[Alarm]:
        """Check metrics.jsonl rows in order (a resumed run's, or a finished run's for the
        report); every alarm they fire."""
        return [alarm for row in rows for alarm in self.check(int(row.get("step", 0)), row)]
