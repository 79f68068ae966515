"""eval.json and eval.md of `rlhf eval`, each written whole (temp file + rename)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.files import write_text_atomic

EVAL_JSON, EVAL_MD = "eval.json", "eval.md"

_ROWS = (
    ("kl", "KL to reference (nats/answer)", "{:.3f}"),
    ("length", "mean answer length (tokens)", "{:.1f}"),
    ("eos_rate", "EOS rate", "{:.3f}"),
    ("repetition", "repetition rate", "{:.3f}"),
    ("rouge_l", "ROUGE-L F1 vs reference", "{:.3f}"),
    ("bleu", "BLEU vs reference", "{:.2f}"),
    ("perplexity", "perplexity (pretraining set)", "{:.2f}"),
)


def markdown(result: dict) -> str:
    """A table of every model's numbers (a column each) and one of the win rates."""
    models = list(result["models"])
    rows = [[f"reward ({judge})", *(_cell(result["models"][m].get(f"reward/{judge}"), "{:.3f}") for m in models)]
            for judge in result["judges"]]
    for key, label, fmt in _ROWS:
        if any(key in result["models"][m] for m in models):
            rows.append([label, *(_cell(result["models"][m].get(key), fmt) for m in models)])
    lines = [f"| metric | {' | '.join(models)} |", f"|---|{'---|' * len(models)}"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    if result.get("win_rate"):
        lines += ["", f"Win rate of the policy against the baseline ({result['win_rate_interval']}; ties count half):",
                  "", "| judge | win rate | 95% interval | wins / ties / losses |", "|---|---|---|---|"]
        for judge, w in result["win_rate"].items():
            lines.append(f"| {judge} | {w['rate']:.3f} | [{w['low']:.3f}, {w['high']:.3f}] | "
                         f"{w['wins']} / {w['ties']} / {w['losses']} |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def write_report(out_dir: str | Path, result: dict) -> tuple[Path, Path]:
    out = Path(out_dir)
    paths = out / EVAL_JSON, out / EVAL_MD
    for path, text in zip(paths, (json.dumps(result, indent=1) + "\n", markdown(result))):
        write_text_atomic(path, text)
    return paths


def read_report(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / EVAL_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
