"""`rlhf report RUN_DIR [RUN_DIR ...]`: PNG plots and a Markdown summary from metrics.jsonl.

Each RUN_DIR is a stage's output directory (it holds metrics.jsonl) or a directory of them
(e.g. runs/quickstart with sft/, rm/ and ppo/). A run's stage is read from its metric
names (sft/..., rm/..., ppo/...). Plots: SFT train and eval loss; RM train and eval
accuracy and loss; PPO reward, KL and kl_coef, and the diagnostics of docs/dashboards.md;
with two or more PPO runs, the reward-KL frontier (each run's last eval reward, and gold
reward when logged, against its last eval KL).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rlhf.errors import UserError
from rlhf.logging.trackers import read_jsonl

STAGES = ("sft", "rm", "ppo")
PPO_DIAGNOSTICS = (
    ("ppo/response_length", "response length (tokens)"),
    ("ppo/eos_rate", "EOS rate"),
    ("ppo/entropy", "entropy (nats/token)"),
    ("ppo/clip_frac", "clip fraction"),
    ("ppo/approx_kl", "approx KL (old vs new policy)"),
    ("ppo/explained_variance", "explained variance"),
)


@dataclass
class Run:
    path: Path
    stage: str
    rows: list[dict]
    label: str = ""

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

    @property
    def steps(self) -> int:
        return max((row["step"] for row in self.rows), default=0)


@dataclass
class Report:
    out: Path
    runs: list[Run]
    images: list[Path] = field(default_factory=list)
    markdown: Path | None = None
    text: str = ""


def _stage(rows: list[dict]) -> str:
    keys = {k for row in rows for k in row}
    for stage in ("ppo", "rm", "sft"):
        if any(k.startswith(f"{stage}/") for k in keys):
            return stage
    return "unknown"


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Runs in the given directories: a directory with metrics.jsonl, or its sub-directories
    that have one (sorted by name, stages in sft, rm, ppo order)."""
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
                runs.append(Run(run_dir, _stage(rows), rows))
    if not runs:
        raise UserError("the given run directories have empty metrics.jsonl files")
    _label(runs)
    return sorted(runs, key=lambda r: STAGES.index(r.stage) if r.stage in STAGES else len(STAGES))


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


def _plot_lines(ax, runs: list[Run], keys: Sequence[tuple[str, str, str]], title: str, ylabel: str) -> bool:
    """keys: (metric, legend suffix, line style). Returns whether anything was drawn."""
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
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def _save(fig, path: Path, images: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    images.append(path)


def _plot_sft(runs: list[Run], out: Path, images: list[Path]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    _plot_lines(ax, runs, [("sft/loss", "train", "-"), ("eval/loss", "eval", "--")], "SFT loss", "loss (nats/token)")
    _save(fig, out / "sft_loss.png", images)


def _plot_rm(runs: list[Run], out: Path, images: list[Path]) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _plot_lines(axes[0], runs, [("rm/accuracy", "train", "-"), ("eval/accuracy", "eval", "--")],
                "RM pairwise accuracy", "accuracy")
    _plot_lines(axes[1], runs, [("rm/loss", "train", "-"), ("eval/loss", "eval", "--")], "RM ranking loss", "loss")
    _save(fig, out / "rm_accuracy.png", images)


def _plot_ppo(runs: list[Run], out: Path, images: list[Path]) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _plot_lines(axes[0], runs, [("ppo/reward_raw", "train RM", "-"), ("eval/reward", "eval RM", "--"),
                                ("eval/gold_reward", "eval gold", ":")], "PPO reward", "reward")
    _plot_lines(axes[1], runs, [("ppo/kl", "train", "-"), ("eval/kl", "eval", "--")], "KL to the SFT reference",
                "nats per response")
    _plot_lines(axes[2], runs, [("ppo/kl_coef", "", "-")], "KL coefficient β", "β")
    _save(fig, out / "ppo_curves.png", images)

    present = [(k, t) for k, t in PPO_DIAGNOSTICS if any(r.series(k)[0] for r in runs)]
    if present:
        cols = 3
        rows = (len(present) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(15, 3.6 * rows), squeeze=False)
        for ax, (key, title) in zip(axes.flat, present):
            _plot_lines(ax, runs, [(key, "", "-")], title, "")
        for ax in list(axes.flat)[len(present):]:
            ax.axis("off")
        _save(fig, out / "ppo_diagnostics.png", images)


def _plot_frontier(runs: list[Run], out: Path, images: list[Path]) -> None:
    plt = _pyplot()
    ys = [("eval/reward", "RM reward (held-out)")]
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
    _save(fig, out / "ppo_frontier.png", images)


# ---------------------------------------------------------------------------------------
# Markdown


def _sft_section(runs: list[Run]) -> list[str]:
    rows = [[r.label, str(r.steps), _fmt(r.last("sft/loss")), _arrow(r.first("eval/loss"), r.last("eval/loss")),
             _fmt(r.last("eval/ppl")), _fmt(r.median("perf/tokens_per_s"), 4), *_perf(r)] for r in runs]
    return ["## SFT", "", *_table(["run", "steps", "final train loss", "eval loss (first → last)", "eval ppl",
                                   "tokens/s (median)", "MFU (median)", "peak memory GB"], rows),
            "", "![SFT loss](sft_loss.png)", ""]


def _rm_section(runs: list[Run]) -> list[str]:
    rows = [[r.label, str(r.steps), _fmt(r.last("rm/accuracy")), _arrow(r.first("eval/accuracy"), r.last("eval/accuracy")),
             _fmt(r.best("eval/accuracy")), _fmt(r.last("eval/margin")), _fmt(r.median("perf/pairs_per_s"), 4), *_perf(r)]
            for r in runs]
    return ["## Reward model", "", *_table(["run", "steps", "final train accuracy", "eval accuracy (first → last)",
                                            "best eval accuracy", "eval margin", "pairs/s (median)", "MFU (median)",
                                            "peak memory GB"], rows),
            "", "![RM accuracy](rm_accuracy.png)", ""]


def _ppo_section(runs: list[Run], frontier: bool, diagnostics: bool) -> list[str]:
    rows = []
    for r in runs:
        rows.append([r.label, str(r.steps), _arrow(r.first("eval/reward"), r.last("eval/reward")),
                     _arrow(r.first("eval/gold_reward"), r.last("eval/gold_reward")), _fmt(r.last("eval/kl")),
                     _fmt(r.last("ppo/kl_coef")), _fmt(r.last("eval/eos_rate")), _fmt(r.last("eval/response_length")),
                     _fmt(r.median("perf/samples_per_s"), 3), *_perf(r)])
    lines = ["## PPO", "", *_table(["run", "iterations", "eval RM reward (first → last)", "eval gold (first → last)",
                                    "eval KL", "kl_coef", "EOS rate", "length", "samples/s (median)", "MFU (median)",
                                    "peak memory GB"], rows),
             "", "![PPO reward, KL and kl_coef](ppo_curves.png)", ""]
    if diagnostics:
        lines += ["![PPO diagnostics](ppo_diagnostics.png)", ""]
    if frontier:
        lines += ["![Reward-KL frontier](ppo_frontier.png)", ""]
    return lines


def make_report(run_dirs: Sequence[str | Path], out: str | Path) -> Report:
    """Write the plots and report.md into `out`; returns what was written."""
    runs = find_runs(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, runs)
    by_stage = {stage: [r for r in runs if r.stage == stage] for stage in STAGES}
    lines = ["# Training report", "", "Runs: " + ", ".join(f"`{r.path}` ({r.stage})" for r in runs), ""]
    if by_stage["sft"]:
        _plot_sft(by_stage["sft"], out, report.images)
        lines += _sft_section(by_stage["sft"])
    if by_stage["rm"]:
        _plot_rm(by_stage["rm"], out, report.images)
        lines += _rm_section(by_stage["rm"])
    if by_stage["ppo"]:
        _plot_ppo(by_stage["ppo"], out, report.images)
        frontier = len(by_stage["ppo"]) >= 2 and sum(r.last("eval/kl") is not None for r in by_stage["ppo"]) >= 2
        if frontier:
            _plot_frontier(by_stage["ppo"], out, report.images)
        lines += _ppo_section(by_stage["ppo"], frontier, (out / "ppo_diagnostics.png") in report.images)
    unknown = [r for r in runs if r.stage not in STAGES]
    if unknown:
        lines += ["Not plotted (no sft/, rm/ or ppo/ metrics): " + ", ".join(f"`{r.path}`" for r in unknown), ""]
    report.text = "\n".join(lines)
    report.markdown = out / "report.md"
    report.markdown.write_text(report.text + "\n", encoding="utf-8")
    return report
