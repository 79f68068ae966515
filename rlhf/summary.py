"""A short table of a quickstart-style run: SFT eval loss, RM held-out accuracy, DPO held-out
accuracy and gold reward, PPO (or GRPO, ...) gold reward before/after, reward and KL, and where
the pipeline ran `rlhf eval`: the final policy's win rate against SFT, reward and KL.
`python -m rlhf.summary runs/quickstart`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _summary(stage_dir: Path) -> dict:
    path = stage_dir / "model" / "rlhf_summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _before_after(summary: dict, key: str) -> str:
    before, after = summary.get(f"initial_{key}", float("nan")), summary[key]
    gain = f" ({(after / before - 1) * 100:+.0f}%)" if before and before == before else ""
    return f"{before:.3f} -> {after:.3f}{gain}"


def summary_rows(root: str | Path) -> list[tuple[str, str]]:
    root = Path(root)
    sft, rm, dpo, ppo = (_summary(root / name) for name in ("sft", "rm", "dpo", "ppo"))
    rows = []
    if sft:
        rows.append(("SFT eval loss", f"{sft.get('eval/initial_loss', float('nan')):.3f} -> {sft['eval/loss']:.3f}"))
    if rm:
        rows.append(("RM held-out pairwise accuracy", f"{rm['eval/accuracy']:.3f}"))
    if dpo:
        if "eval/accuracy" in dpo:
            rows.append(("DPO held-out preference accuracy", f"{dpo['eval/accuracy']:.3f}"))
        if "eval/gold_reward" in dpo:
            rows.append(("DPO gold reward (held-out)", _before_after(dpo, "eval/gold_reward")))
    if ppo:
        if "eval/gold_reward" in ppo:
            rows.append(("PPO gold reward (held-out)", _before_after(ppo, "eval/gold_reward")))
        rows.append(("PPO reward (held-out)", f"{ppo.get('initial_eval/reward', float('nan')):.3f} -> {ppo['eval/reward']:.3f}"))
        rows.append(("PPO KL to reference (nats/answer)", f"{ppo['eval/kl']:.3f}"))
    return rows + eval_rows(root / "eval" / "eval.json")


def eval_rows(path: Path) -> list[tuple[str, str]]:
    """The headline numbers of an `rlhf eval` run: win rate against the baseline and reward per
    judge, and the KL to the reference."""
    if not path.is_file():
        return []
    result = json.loads(path.read_text(encoding="utf-8"))
    policy, baseline = result["models"]["policy"], result["models"].get("baseline")
    rows = []
    for judge in result["judges"]:
        win = result["win_rate"].get(judge)
        if win:
            rows.append((f"Eval win rate vs baseline ({judge})", f"{win['rate']:.3f} [{win['low']:.3f}, {win['high']:.3f}]"))
        before = f"{baseline[f'reward/{judge}']:.3f} -> " if baseline else ""
        rows.append((f"Eval reward ({judge}{', baseline -> policy' if baseline else ''})",
                     f"{before}{policy[f'reward/{judge}']:.3f}"))
    if "kl" in policy:
        rows.append(("Eval KL to reference (nats/answer)", f"{policy['kl']:.3f}"))
    return rows


def print_table(rows: list[tuple[str, str]]) -> None:
    if not rows:
        return
    width = max(len(name) for name, _ in rows)
    print(f"| {'metric':<{width}} | value |")
    print(f"| {'-' * width} | ----- |")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rows = summary_rows(argv[0] if argv else "runs/quickstart")
    if not rows:
        print("no finished stages found", file=sys.stderr)
        return 1
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
