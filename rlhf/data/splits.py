"""Train/eval record sets for a stage: a separate eval source, or a held-out fraction."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config_sections import DataSourceConfig
from rlhf.data.builders import load_records, split_train_eval
from rlhf.data.records import LoadReport


@dataclass
class RecordSplit:
    train: list
    eval: list
    train_report: LoadReport
    eval_report: LoadReport | None

    def summary(self) -> str:
        parts = [f"{len(self.train)} train / {len(self.eval)} eval records"]
        for name, report in (("train", self.train_report), ("eval", self.eval_report)):
            if report is not None and report.skipped:
                parts.append(f"{report.skipped} malformed {name} rows skipped (first: {report.first_errors[0]})")
        return "; ".join(parts)


def load_split(
    kind: str,
    train: DataSourceConfig,
    eval: DataSourceConfig,
    eval_fraction: float,
    on_error: str,
    seed: int,
) -> RecordSplit:
    records, train_report = load_records(kind, train, on_error)
    if eval.given:
        eval_records, eval_report = load_records(kind, eval, on_error)
        return RecordSplit(records, eval_records, train_report, eval_report)
    train_records, eval_records = split_train_eval(records, eval_fraction, seed)
    return RecordSplit(train_records, eval_records, train_report, None)
