"""`rlhf data inspect`: what a data file holds and what a max length would cut."""

from __future__ import annotations

from typing import Callable

import numpy as np

from rlhf.config_sections import DataSourceConfig
from rlhf.data.builders import load_records
from rlhf.data.records import PretrainRecord, PromptRecord, RankRecord, SFTRecord


def _record_texts(record) -> list[str]:
    """The texts whose lengths matter for this record kind (one per sequence the model sees)."""
    if isinstance(record, SFTRecord):
        return ["\n".join(m.content for m in record.messages)]
    if isinstance(record, RankRecord):
        prompt = "\n".join(m.content for m in record.prompt)
        return [prompt + "\n" + answer for answer in record.responses]
    if isinstance(record, PromptRecord):
        return ["\n".join(m.content for m in record.prompt)]
    assert isinstance(record, PretrainRecord)
    return [record.text]


def inspect_data(
    kind: str,
    source: DataSourceConfig,
    count_tokens: Callable[[str], int],
    max_length: int,
    on_error: str = "raise",
) -> dict:
    records, report = load_records(kind, source, on_error)
    lengths = np.array([count_tokens(text) for record in records for text in _record_texts(record)])
    stats: dict = {
        "file": source.path,
        "kind": kind,
        "rows": report.rows,
        "records": len(records),
        "skipped_rows": report.skipped,
        "sequences": int(lengths.size),
    }
    if kind == "rank":
        stats["pairs"] = sum(len(r.pairs()) for r in records)
        stats["answers_per_prompt"] = sorted({len(r.responses) for r in records})
    if lengths.size:
        for q in (50, 90, 95, 99, 100):
            stats[f"length_p{q}"] = int(np.percentile(lengths, q))
        stats["mean_length"] = round(float(lengths.mean()), 1)
    stats["max_length"] = max_length
    stats["truncated_at_max_length"] = int((lengths > max_length).sum())
    return stats
