"""Load a whole data source as canonical records of one set kind, and split off an eval set."""

from __future__ import annotations

import random
from typing import Callable

from rlhf.config_sections import DataSourceConfig
from rlhf.data.formats import (
    CANONICAL_FIELDS,
    check_format,
    parse_prompt_row,
    parse_pretrain_row,
    parse_rank_row,
    parse_sft_row,
)
from rlhf.data.records import LoadReport
from rlhf.data.sources import iter_rows
from rlhf.errors import DataError, UserError

KINDS = ("sft", "rank", "prompt", "pretrain")
_FIRST_ERRORS_KEPT = 5


def _row_parser(kind: str) -> Callable[..., list]:
    """The parser for `kind`, always returning a list (SFT rows may give several records)."""
    if kind == "sft":
        return parse_sft_row
    single = {"rank": parse_rank_row, "prompt": parse_prompt_row, "pretrain": parse_pretrain_row}[kind]
    return lambda *args: [single(*args)]


def load_records(kind: str, source: DataSourceConfig, on_error: str = "raise") -> tuple[list, LoadReport]:
    """Every record of `source` as set kind `kind` ("sft", "rank", "prompt" or "pretrain").

    on_error="raise" stops at the first malformed row; "skip" drops malformed rows and counts
    them in the report, but still fails when no row at all is usable.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data set kind {kind!r}; expected one of {', '.join(KINDS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    check_format(kind, source.format)
    unknown = sorted(set(source.columns) - set(CANONICAL_FIELDS))
    if unknown:
        raise UserError(f"{source.path}: unknown field(s) in columns: {', '.join(unknown)}; "
                        f"known fields: {', '.join(CANONICAL_FIELDS)}")
    parse = _row_parser(kind)
    records: list = []
    report = LoadReport()
    for row in iter_rows(source):
        report.rows += 1
        try:
            if row.error is not None:
                raise row.error
            records.extend(parse(row.data, row.location, source.columns, source.format))
        except DataError as err:
            if on_error == "raise":
                raise
            report.skipped += 1
            if len(report.first_errors) < _FIRST_ERRORS_KEPT:
                report.first_errors.append(str(err))
    if not records:
        raise UserError(f"{source.path}: all {report.rows} rows are malformed; first error: {report.first_errors[0]}")
    report.records = len(records)
    return records, report


def split_train_eval(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic (train, eval) split; eval gets at least one record when it can."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0 or len(records) < 2:
        return list(records), []
    eval_count = min(len(records) - 1, max(1, round(len(records) * eval_fraction)))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    eval_indices = set(order[:eval_count])
    # Both parts keep the file's order, so a split is easy to inspect.
    train = [record for index, record in enumerate(records) if index not in eval_indices]
    evaluation = [record for index, record in enumerate(records) if index in eval_indices]
    return train, evaluation
