"""`rlhf report RUN_DIR [RUN_DIR ...]`: PNG plots and a Markdown summary from metrics.jsonl.

Each RUN_DIR is a stage's output directory (it holds metrics.jsonl) or a directory of them
(e.g. runs/quickstart with sft/, rm/ and ppo/). A run's stage is read from its metric
names (sft/..., rm/..., dpo/..., ppo/...); the run's config.yaml, when there, names the PPO
advantage estimator, samples per prompt and the DPO loss (without it, a PPO run that logs no
critic metrics is reported as critic-free). Plots: SFT train and eval loss; RM train and eval
accuracy and loss; DPO loss, preference accuracy, margin, implicit rewards and log-probs of
the preferred and the other answer (train and eval); PPO reward, KL and kl_coef, and the
diagnostics of docs/dashboards.md; for group sampling (GRPO, RLOO, ...) the group reward mean,
within-group std and uniform-group share; with reward functions (or an HTTP reward) each
source's and component's reward and the functions' failures; with two or more PPO runs, the
reward-KL frontier (each run's last eval reward, and gold reward when logged, against its
last eval KL).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rlhf.config import KLConfig
from rlhf.config_sections import AlarmsConfig
from rlhf.errors import UserError
from rlhf.logging.alarms import ADVICE, AlarmMonitor
from rlhf.logging.trackers import read_jsonl

STAGES = ("sft", "rm", "dpo", "ppo")
PPO_DIAGNOSTICS = (
    ("ppo/response_length", "response length (tokens)"),
    ("ppo/eos_rate", "EOS rate"),
    ("ppo/entropy", "entropy (nats/token)"),
    ("ppo/clip_frac", "clip fraction"),
    ("ppo/approx_kl", "approx KL (old vs new policy)"),
    ("ppo/explained_variance", "explained variance"),
)
CRITIC_METRICS = ("ppo/explained_variance", "ppo/value_loss", "ppo/value_mean")
"""Logged only by a PPO run with a critic (ppo.advantage=gae)."""
GROUP_STATS = ("ppo/group_reward_std_mean", "ppo/uniform_group_share")
"""Logged when rollout.n_samples_per_prompt > 1 (group estimators)."""
FAILURE_KINDS = ("errors", "timeouts", "nonfinite", "skipped")
REWARD_FAILURES = tuple(f"reward/function_{kind}" for kind in FAILURE_KINDS)
"""Per-iteration failure counts of the reward functions (rlhf/roles/rewards.py), logged by every
PPO iteration, skipped ones included."""
EVAL_FAILURES = tuple(f"eval/function_{kind}" for kind in FAILURE_KINDS)
"""The same for an evaluation's calls, logged only when one failed (rlhf/roles/evaluate.py)."""


@dataclass
class Run:
    path: Path
    stage: str
    rows: list[dict]
    label: str = ""
    config: dict = field(default_factory=dict)
    """The run's config.yaml ({} when absent or unreadable)."""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the rows that logged `key` as a finite number."""
        steps, values = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps.append(row["step"])
                values.append(float(value))
        return steps, values

    def first(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[0] if values else None

    def last(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[-1] if values else None

    def best(self, key: str) -> float | None:
        values = self.series(key)[1]
        return max(values) if values else None

    def median(self, key: str) -> float | None:
        values = self.series(key)[1]
        return statistics.median(values) if values else None

    def total(self, key: str) -> float:
        return sum(self.series(key)[1])

    def has(self, key: str) -> bool:
        return any(key in row for row in self.rows)

    def setting(self, dotted: str):
        """A value of the run's config.yaml ("ppo.advantage"), or None."""
        value = self.config
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return value

    @property
    def steps(self) -> int:
        return max((row["step"] for row in self.rows), default=0)

    @property
    def estimator(self) -> str | None:
        """A PPO run's advantage estimator: ppo.advantage from its config, else "gae" when it
        logged critic metrics and "critic-free" when it trained without them."""
        if self.stage != "ppo":
            return None
        configured = self.setting("ppo.advantage")
        if isinstance(configured, str):
            return configured
        if any(self.has(k) for k in CRITIC_METRICS):
            return "gae"
        return "critic-free" if self.has("ppo/policy_loss") or self.has("ppo/reward_raw") else None

    @property
    def critic_free(self) -> bool:
        return self.estimator not in (None, "gae")

    @property
    def reward_sources(self) -> list[str]:
        """The per-source reward metrics: reward/model, reward/http, reward/<module:function>
        and its components reward/<module:function>/<name> (not the failure counts, total or
        per function)."""
        keys = sorted({k for row in self.rows for k in row if k.startswith("reward/")})
        return [k for k in keys if k not in REWARD_FAILURES and not k.startswith(tuple(f + "/" for f in REWARD_FAILURES))]

    @property
    def uses_functions(self) -> bool:
        """Rewards came (also) from reward functions: a function's reward was logged, the
        config lists some, or a function failed (a run whose every iteration failed logs no reward)."""
        return (any(":" in k for k in self.reward_sources) or bool(self.setting("reward.functions"))
                or any(self.total(k) > 0 for k in REWARD_FAILURES + EVAL_FAILURES))

    @property
    def skipped_iterations(self) -> int:
        """PPO iterations (DPO steps) skipped for a non-finite reward, log-prob or loss."""
        return sum(v > 0 for v in self.series(f"{self.stage}/skipped_nonfinite")[1])

    @property
    def alarms(self) -> list[tuple[int, str, str]]:
        """(iteration, alarm, what it saw) of each alarm the run logged (alarms/<name> = 1); what
        it saw is replayed from the metrics with the run's `alarms` config (empty when the
        replay does not find it, e.g. metrics of a run cut short)."""
        logged = [(row["step"], key[len("alarms/"):]) for row in self.rows for key in sorted(row)
                  if key.startswith("alarms/")]
        if not logged:
            return []
        settings = self.setting("alarms") or {}
        known = {f.name for f in dataclasses.fields(AlarmsConfig)}
        monitor = AlarmMonitor(AlarmsConfig(**{k: v for k, v in settings.items() if k in known}),
                               float(self.setting("kl.target") or KLConfig.target))
        seen = {(a.step, a.name): a.seen for a in monitor.replay(self.rows)}
        return [(step, name, seen.get((step, name), "")) for step, name in logged]

    @property
    def kind(self) -> str:
        if self.stage == "ppo" and self.estimator:
            return f"ppo, advantage {self.estimator}"
        if self.stage == "dpo" and self.setting("loss.loss_type"):
            return f"dpo, loss {self.setting('loss.loss_type')} β={self.setting('loss.beta')}"
        return self.stage


@dataclass
class Report:
    out: Path
    runs: list[Run]
    images: list[Path] = field(default_factory=list)
    panels: dict[str, list[str]] = field(default_factory=dict)
    """Image file name -> titles of its panels that have data."""
    markdown: Path | None = None
    text: str = ""


def _stage(rows: list[dict]) -> str:
    keys = {k for row in rows for k in row}
    for stage in ("ppo", "dpo", "rm", "sft"):
        if any(k.startswith(f"{stage}/") for k in keys):
            return stage
    return "unknown"


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Runs in the given directories: a directory with metrics.jsonl, or its sub-directories
    that have one (sorted by name, stages in sft, rm, dpo, ppo order)."""
    runs = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise UserError(f"{path}: no such run directory")
        if (path / "metrics.jsonl").is_file():
            found = [path]
        else:
            found = sorted(p.parent for p in path.glob("*/metrics.jsonl"))
            if not found:
                raise UserError(f"{path}: no metrics.jsonl here or in its sub-directories (is it a run directory?)")
        for run_dir in found:
            rows = _last_run(read_jsonl(run_dir / "metrics.jsonl"))
            if rows:
                runs.append(Run(run_dir, _stage(rows), rows, config=_config(run_dir)))
    if not runs:
        raise UserError("the given run directories have empty metrics.jsonl files")
    _label(runs)
    return sorted(runs, key=lambda r: STAGES.index(r.stage) if r.stage in STAGES else len(STAGES))


def _config(run_dir: Path) -> dict:
    """The run's config.yaml as a dict; {} when absent or not readable (the report then goes
    by the metric names alone)."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _last_run(rows: list[dict]) -> list[dict]:
    """The rows of the last run when a file holds several appended ones (its step goes back)."""
    start = 0
    for index in range(1, len(rows)):
        if rows[index]["step"] < rows[index - 1]["step"]:
            start = index
    return rows[start:]


def _label(runs: list[Run]) -> None:
    """The shortest path suffix that tells the runs apart: 'ppo', else 'beta1/ppo', ..."""
    parts = [r.path.resolve().parts for r in runs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            break
    for run, label in zip(runs, labels):
        run.label = label


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _arrow(first: float | None, last: float | None) -> str:
    return "–" if first is None and last is None else f"{_fmt(first)} → {_fmt(last)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _perf(run: Run) -> list[str]:
    memory = run.last("perf/peak_memory_gb")
    return [_fmt(run.median("perf/mfu"), 3), _fmt(memory, 3)]


# ---------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish_axes(ax, title: str, ylabel: str, drawn: bool) -> bool:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def _plot_lines(ax, runs: list[Run], keys: Sequence[tuple[str, str, str]], title: str, ylabel: str) -> bool:
    """keys: (metric, legend suffix, line style); one colour per run. Returns whether anything
    was drawn."""
    drawn = False
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        for key, suffix, style in keys:
            steps, values = run.series(key)
            if not steps:
                continue
            marker = "o" if len(steps) <= 20 or key.startswith("eval/") else None
            ax.plot(steps, values, style, color=color, marker=marker, markersize=3, label=f"{run.label} {suffix}".strip())
            drawn = True
    return _finish_axes(ax, title, ylabel, drawn)


def _plot_each(ax, runs: list[Run], keys_of: Callable[[Run], Sequence[str]], name_of: Callable[[str], str],
               title: str, ylabel: str) -> bool:
    """Every metric `keys_of(run)` names, one colour per metric and one line style per run
    (for metric sets that differ between runs: reward sources, failure kinds)."""
    drawn, color = False, 0
    styles = ("-", "--", ":", "-.")
    for index, run in enumerate(runs):
        for key in keys_of(run):
            steps, values = run.series(key)
            if not steps:
                continue
            label = f"{run.label} {name_of(key)}" if len(runs) > 1 else name_of(key)
            ax.plot(steps, values, styles[index % len(styles)], color=f"C{color % 10}",
                    marker="o" if len(steps) <= 20 else None, markersize=3, label=label)
            drawn, color = True, color + 1
    return _finish_axes(ax, title, ylabel, drawn)


def _save(fig, path: Path, report: Report, titles: Sequence[str]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    report.images.append(path)
    report.panels[path.name] = list(titles)


def _grid(panels: Sequence[Callable], cols: int, path: Path, report: Report, height: float = 3.8) -> None:
    """One figure of the panels (each `panel(ax) -> title or None`, None: nothing to draw),
    those with data first; written only when one has data."""
    plt = _pyplot()
    rows = max((len(panels) + cols - 1) // cols, 1)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, height * rows), squeeze=False)
    titles = [title for ax, panel in zip(axes.flat, panels) if (title := panel(ax))]
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if titles:
        _save(fig, path, report, titles)
    else:
        plt.close(fig)


def _plot_sft(runs: list[Run], out: Path, report: Report) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    _plot_lines(ax, runs, [("sft/loss", "train", "-"), ("eval/loss", "eval", "--")], "SFT loss", "loss (nats/token)")
    _save(fig, out / "sft_loss.png", report, ["SFT loss"])


def _plot_rm(runs: list[Run], out: Path, report: Report) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _plot_lines(axes[0], runs, [("rm/accuracy", "train", "-"), ("eval/accuracy", "eval", "--")],
                "RM pairwise accuracy", "accuracy")
    _plot_lines(axes[1], runs, [("rm/loss", "train", "-"), ("eval/loss", "eval", "--")], "RM ranking loss", "loss")
    _save(fig, out / "rm_accuracy.png", report, ["RM pairwise accuracy", "RM ranking loss"])


def _train_eval(name: str) -> list[tuple[str, str, str]]:
    return [(f"dpo/{name}", "train", "-"), (f"eval/{name}", "eval", "--")]


def _chosen_rejected(chosen: str, rejected: str) -> list[tuple[str, str, str]]:
    return [(f"dpo/{chosen}", "train preferred", "-"), (f"dpo/{rejected}", "train other", ":"),
            (f"eval/{chosen}", "eval preferred", "--"), (f"eval/{rejected}", "eval other", "-.")]


def _plot_dpo(runs: list[Run], out: Path, report: Report) -> None:
    sigmoid = all(r.setting("loss.loss_type") in (None, "sigmoid") for r in runs)

    def panel(keys, title, ylabel, line=None):
        def draw(ax):
            drawn = _plot_lines(ax, runs, keys, title, ylabel)
            if drawn and line is not None:
                ax.axhline(line, color="grey", linewidth=0.8, linestyle=":")
            return title if drawn else None
        return draw

    panels = [
        panel(_train_eval("loss"), "DPO loss" + (" (ln 2 dotted: the start)" if sigmoid else ""), "loss",
              math.log(2) if sigmoid else None),
        panel(_train_eval("accuracy"), "preference accuracy (0.5 dotted)",
              "accuracy", 0.5),
        panel(_train_eval("margin"), "implicit reward margin, preferred − other", "β·Δ log-ratio", 0.0),
        panel(_chosen_rejected("reward_chosen", "reward_rejected"), "implicit rewards β·log(π/π_ref)", "reward",
              0.0),
        panel(_chosen_rejected("chosen_logps", "rejected_logps"), "policy log-probs of the answers", "log π(y|x)"),
        panel([("dpo/grad_norm", "", "-")], "gradient norm", "norm"),
    ]
    if any(r.has("eval/gold_reward") for r in runs):  # eval.gold_reward: answers sampled from the policy
        panels.append(panel([("eval/gold_reward", "eval", "--")], "gold reward of sampled held-out answers",
                            "gold reward"))
    _grid(panels, 3, out / "dpo_curves.png", report)


def _function_keys(run: Run, components: bool) -> list[str]:
    return [k for k in run.reward_sources if ("/" in k[len("reward/"):]) == components]


def _failure_keys(run: Run) -> list[str]:
    """The failure kinds that happened (a run without any: its errors, a line at 0)."""
    return [k for k in REWARD_FAILURES + EVAL_FAILURES if run.total(k) > 0] or [REWARD_FAILURES[0]]


def _plot_ppo(runs: list[Run], out: Path, report: Report) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _plot_lines(axes[0], runs, [("ppo/reward_raw", "train", "-"), ("eval/reward", "eval", "--"),
                                ("eval/gold_reward", "eval gold", ":")], "PPO reward", "reward")
    _plot_lines(axes[1], runs, [("ppo/kl", "train", "-"), ("eval/kl", "eval", "--")], "KL to the SFT reference",
                "nats per response")
    _plot_lines(axes[2], runs, [("ppo/kl_coef", "", "-")], "KL coefficient β", "β")
    _save(fig, out / "ppo_curves.png", report, ["PPO reward", "KL to the SFT reference", "KL coefficient β"])

    present = [(k, t) for k, t in PPO_DIAGNOSTICS if any(r.series(k)[0] for r in runs)]
    _grid([lambda ax, k=k, t=t: t if _plot_lines(ax, runs, [(k, "", "-")], t, "") else None for k, t in present],
          3, out / "ppo_diagnostics.png", report, height=3.6)

    if any(r.has(k) for r in runs for k in GROUP_STATS):
        grouped = [r for r in runs if any(r.has(k) for k in GROUP_STATS)]
        panels = [("ppo/reward_normalized", "group reward mean (the rewards groups compare)", "reward"),
                  ("ppo/group_reward_std_mean", "within-group reward std (mean over groups)", "std"),
                  ("ppo/uniform_group_share", "share of groups with all rewards equal", "share")]

        def group_panel(ax, key, title, ylabel):
            drawn = _plot_lines(ax, grouped, [(key, "", "-")], title, ylabel)
            if key == "ppo/uniform_group_share":
                ax.set_ylim(-0.05, 1.05)
            return title if drawn else None

        _grid([lambda ax, p=p: group_panel(ax, *p) for p in panels], 3, out / "ppo_groups.png", report)

    sourced = [r for r in runs if r.uses_functions or any(k != "reward/model" for k in r.reward_sources)]
    if sourced:
        failing = [r for r in sourced if r.uses_functions]
        source = lambda key: key[len("reward/"):]  # noqa: E731
        failure = lambda key: key.replace("reward/function_", "").replace("eval/function_", "eval ")  # noqa: E731
        specs = [(sourced, lambda r: _function_keys(r, False), source, "reward by source", "mean raw reward"),
                 (sourced, lambda r: _function_keys(r, True), source, "reward-function components", "mean"),
                 (failing, _failure_keys, failure,
                  "reward-function failures per iteration", "calls")]
        if not any(_function_keys(r, True) for r in sourced):
            specs.pop(1)
        panels = [lambda ax, s=s: s[3] if _plot_each(ax, *s) else None for s in specs]
        _grid(panels, len(panels), out / "ppo_rewards.png", report)


def _plot_frontier(runs: list[Run], out: Path, report: Report) -> None:
    plt = _pyplot()
    ys = [("eval/reward", "reward (held-out)")]
    if all(r.last("eval/gold_reward") is not None for r in runs):
        ys.append(("eval/gold_reward", "gold reward (held-out)"))
    fig, axes = plt.subplots(1, len(ys), figsize=(6 * len(ys), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes.flat, ys):
        points = sorted((r.last("eval/kl"), r.last(key), r.label) for r in runs
                        if r.last("eval/kl") is not None and r.last(key) is not None)
        starts = [(r.first("eval/kl"), r.first(key)) for r in runs if r.first(key) is not None]
        if starts:
            ax.scatter([s[0] for s in starts], [s[1] for s in starts], marker="x", color="grey", label="start (SFT policy)")
        for index, (kl, value, label) in enumerate(points):
            ax.scatter([kl], [value], color=f"C{index % 10}", zorder=3)
            ax.annotate(label, (kl, value), fontsize=7, xytext=(4, 4), textcoords="offset points")
        best, frontier = -math.inf, []
        for kl, value, _ in points:  # sorted by KL: keep each run that beats every cheaper one
            if value > best:
                best = value
                frontier.append((kl, value))
        if len(frontier) > 1:
            ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "-", color="black", alpha=0.5, label="frontier")
        ax.set_title(f"{title} vs KL, last eval of each run")
        ax.set_xlabel("KL to the SFT reference (nats per response)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out / "ppo_frontier.png", report, [f"{title} vs KL" for _, title in ys])


# ---------------------------------------------------------------------------------------
# Markdown


def _image(report: Report, name: str, alt: str) -> list[str]:
    return [f"![{alt}]({name})", ""] if name in report.panels else []


def _sft_section(runs: list[Run], report: Report) -> list[str]:
    rows = [[r.label, str(r.steps), _fmt(r.last("sft/loss")), _arrow(r.first("eval/loss"), r.last("eval/loss")),
             _fmt(r.last("eval/ppl")), _fmt(r.median("perf/tokens_per_s"), 4), *_perf(r)] for r in runs]
    return ["## SFT", "", *_table(["run", "steps", "final train loss", "eval loss (first → last)", "eval ppl",
                                   "tokens/s (median)", "MFU (median)", "peak memory GB"], rows),
            "", *_image(report, "sft_loss.png", "SFT loss")]


def _rm_section(runs: list[Run], report: Report) -> list[str]:
    rows = [[r.label, str(r.steps), _fmt(r.last("rm/accuracy")), _arrow(r.first("eval/accuracy"), r.last("eval/accuracy")),
             _fmt(r.best("eval/accuracy")), _fmt(r.last("eval/margin")), _fmt(r.median("perf/pairs_per_s"), 4), *_perf(r)]
            for r in runs]
    return ["## Reward model", "", *_table(["run", "steps", "final train accuracy", "eval accuracy (first → last)",
                                            "best eval accuracy", "eval margin", "pairs/s (median)", "MFU (median)",
                                            "peak memory GB"], rows),
            "", *_image(report, "rm_accuracy.png", "RM accuracy")]


def _pair(run: Run, first: str, second: str) -> str:
    a, b = run.last(first), run.last(second)
    return "–" if a is None and b is None else f"{_fmt(a)} / {_fmt(b)}"


def _dpo_section(runs: list[Run], report: Report) -> list[str]:
    rows = []
    for r in runs:
        loss = r.setting("loss.loss_type")
        rows.append([r.label, f"{loss} β={r.setting('loss.beta')}" if loss else "–", str(r.steps),
                     _fmt(r.last("dpo/loss")), _arrow(r.first("eval/loss"), r.last("eval/loss")),
                     _arrow(r.first("eval/accuracy"), r.last("eval/accuracy")), _fmt(r.best("eval/accuracy")),
                     _fmt(r.last("eval/margin")), _pair(r, "eval/reward_chosen", "eval/reward_rejected"),
                     _pair(r, "eval/chosen_logps", "eval/rejected_logps"),
                     _arrow(r.first("eval/gold_reward"), r.last("eval/gold_reward")), str(r.skipped_iterations),
                     _fmt(r.median("perf/pairs_per_s"), 4), *_perf(r)])
    return ["## DPO", "", *_table(["run", "loss", "steps", "final train loss", "eval loss (first → last)",
                                   "eval accuracy (first → last)", "best eval accuracy", "eval margin",
                                   "eval implicit reward preferred / other", "eval log-prob preferred / other",
                                   "eval gold (first → last)", "skipped steps", "pairs/s (median)", "MFU (median)",
                                   "peak memory GB"], rows),
            "", *_image(report, "dpo_curves.png", "DPO loss, accuracy, margin, implicit rewards and log-probs")]


def _sources(run: Run) -> str:
    return ", ".join(f"`{k[len('reward/'):]}` {_fmt(run.last(k), 3)}" for k in run.reward_sources) or "–"


def _failures(run: Run) -> str:
    """Total failures of the training calls, then of the evaluations' when any failed."""
    if not run.uses_functions:
        return "–"
    text = " / ".join(str(int(run.total(k))) for k in REWARD_FAILURES)
    if any(run.total(k) for k in EVAL_FAILURES):
        text += " (eval: " + " / ".join(str(int(run.total(k))) for k in EVAL_FAILURES) + ")"
    return text


def _ppo_section(runs: list[Run], report: Report) -> list[str]:
    rows = []
    for r in runs:
        rows.append([r.label, r.estimator or "–", str(r.steps), _arrow(r.first("eval/reward"), r.last("eval/reward")),
                     _arrow(r.first("eval/gold_reward"), r.last("eval/gold_reward")), _fmt(r.last("eval/kl")),
                     _fmt(r.last("ppo/kl_coef")), _fmt(r.last("eval/eos_rate")), _fmt(r.last("eval/response_length")),
                     _fmt(r.median("perf/samples_per_s"), 3), *_perf(r)])
    lines = ["## PPO", "", *_table(["run", "advantage", "iterations", "eval reward (first → last)",
                                    "eval gold (first → last)", "eval KL", "kl_coef", "EOS rate", "length",
                                    "samples/s (median)", "MFU (median)", "peak memory GB"], rows),
             "", *_image(report, "ppo_curves.png", "PPO reward, KL and kl_coef"),
             *_image(report, "ppo_diagnostics.png", "PPO diagnostics")]
    detailed = [r for r in runs if any(r.has(k) for k in GROUP_STATS) or r.uses_functions
                or any(k != "reward/model" for k in r.reward_sources)]
    if detailed:
        rows = [[r.label, str(r.setting("rollout.n_samples_per_prompt") or "–"),
                 _arrow(r.first("ppo/reward_normalized"), r.last("ppo/reward_normalized"))
                 if any(r.has(k) for k in GROUP_STATS) else "–",
                 _arrow(r.first("ppo/group_reward_std_mean"), r.last("ppo/group_reward_std_mean")),
                 _arrow(r.first("ppo/uniform_group_share"), r.last("ppo/uniform_group_share")),
                 _fmt(r.median("ppo/uniform_group_share"), 3), _sources(r), _failures(r), str(r.skipped_iterations)]
                for r in detailed]
        lines += ["### Groups and reward sources", "",
                  *_table(["run", "samples/prompt", "group reward mean (first → last)",
                           "within-group std (first → last)", "uniform-group share (first → last)",
                           "uniform-group share (median)", "last train reward by source",
                           "function errors / timeouts / nonfinite / skipped (total)", "skipped iterations"], rows),
                  "", *_image(report, "ppo_groups.png", "Group reward mean, within-group std, uniform-group share"),
                  *_image(report, "ppo_rewards.png", "Reward by source, components and function failures")]
    lines += _image(report, "ppo_frontier.png", "Reward-KL frontier")
    return lines + _alarms_section(runs)


def _alarms_section(runs: list[Run]) -> list[str]:
    """The health alarms each run logged (rlhf/logging/alarms.py), with what to try."""
    lines = ["### Health alarms", ""]
    for run in runs:
        alarms = run.alarms
        if not alarms:
            lines.append(f"- `{run.label}`: no health alarms")
        for step, name, seen in alarms:
            lines.append(f"- `{run.label}` iteration {step}: **{name}**" + (f": {seen}" if seen else "")
                         + f". Try: {ADVICE.get(name, 'see docs/dashboards.md')}")
    return lines + [""]


def make_report(run_dirs: Sequence[str | Path], out: str | Path) -> Report:
    """Write the plots and report.md into `out`; returns what was written."""
    runs = find_runs(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, runs)
    by_stage = {stage: [r for r in runs if r.stage == stage] for stage in STAGES}
    lines = ["# Training report", "", "Runs: " + ", ".join(f"`{r.path}` ({r.kind})" for r in runs), ""]
    if by_stage["sft"]:
        _plot_sft(by_stage["sft"], out, report)
        lines += _sft_section(by_stage["sft"], report)
    if by_stage["rm"]:
        _plot_rm(by_stage["rm"], out, report)
        lines += _rm_section(by_stage["rm"], report)
    if by_stage["dpo"]:
        _plot_dpo(by_stage["dpo"], out, report)
        lines += _dpo_section(by_stage["dpo"], report)
    if by_stage["ppo"]:
        _plot_ppo(by_stage["ppo"], out, report)
        if len(by_stage["ppo"]) >= 2 and sum(r.last("eval/kl") is not None for r in by_stage["ppo"]) >= 2:
            _plot_frontier(by_stage["ppo"], out, report)
        lines += _ppo_section(by_stage["ppo"], report)
    unknown = [r for r in runs if r.stage not in STAGES]
    if unknown:
        lines += ["Not plotted (no sft/, rm/, dpo/ or ppo/ metrics): " + ", ".join(f"`{r.path}`" for r in unknown), ""]
    report.text = "\n".join(lines)
    report.markdown = out / "report.md"
    report.markdown.write_text(report.text + "\n", encoding="utf-8")
    return report
