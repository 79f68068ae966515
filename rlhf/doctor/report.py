"""The doctor's output: one row per check (PASS / FAIL / SKIP with a one-line detail), the table
it prints, the JSON report it writes, and the exit code (0 only when nothing failed).

A failure's traceback never reaches the terminal: it goes into the JSON (`error`) and the log
file the row names, so the table stays one line per check.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("PASS", "FAIL", "SKIP")
SCHEMA_VERSION = 1


@dataclass
class Check:
    name: str
    status: str
    detail: str
    """One line: the figure, the failure's cause, or why the check was skipped."""
    figures: dict[str, Any] = field(default_factory=dict)
    """Numbers behind the detail (seconds, GB/s, TFLOP/s, losses)."""
    seconds: float | None = None
    error: str | None = None
    """The full traceback or log tail of a failure."""
    log: str | None = None
    """The file holding the full output of the processes the check launched."""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        self.detail = " ".join(str(self.detail).split()) or "-"


@dataclass
class Report:
    environment: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]

    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def table(self) -> str:
        width = max([len("check")] + [len(c.name) for c in self.checks])
        lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  {'-' * 40}"]
        lines += [f"{c.name:<{width}}  {c.status:<6}  {c.detail}" for c in self.checks]
        counts = {s: sum(c.status == s for c in self.checks) for s in STATUSES}
        lines.append(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "ok": not self.failed, "environment": self.environment,
                "checks": [asdict(c) for c in self.checks]}

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(_finite(self.to_dict()), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)  # whole or not at all


def _finite(value: Any) -> Any:
    """JSON has no NaN: a non-finite figure is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


_CHECK_FIELDS = {"name": str, "status": str, "detail": str, "figures": dict, "seconds": (int, float, type(None)),
                 "error": (str, type(None)), "log": (str, type(None))}


def validate_report(data: Any) -> list[str]:
    """What is wrong with a parsed JSON report (empty when it is valid): the fields and their
    types, statuses among PASS/FAIL/SKIP, `ok` agreeing with the checks, figures numbers,
    strings or null."""
    if not isinstance(data, dict):
        return ["the report is not a JSON object"]
    errors = []
    for key, kind in (("schema_version", int), ("ok", bool), ("environment", dict), ("checks", list)):
        if not isinstance(data.get(key), kind):
            errors.append(f"{key}: missing or not a {kind.__name__}")
    if errors:
        return errors
    if data["schema_version"] != SCHEMA_VERSION:
        errors.append(f"schema_version: {data['schema_version']} is not {SCHEMA_VERSION}")
    names = set()
    for i, check in enumerate(data["checks"]):
        where = f"checks[{i}]"
        if not isinstance(check, dict):
            errors.append(f"{where}: not an object")
            continue
        for key, kind in _CHECK_FIELDS.items():
            if key not in check or not isinstance(check[key], kind) or isinstance(check[key], bool):
                errors.append(f"{where}.{key}: missing or of the wrong type")
        if check.get("status") not in STATUSES:
            errors.append(f"{where}.status: {check.get('status')!r} is not one of {', '.join(STATUSES)}")
        if check.get("name") in names:
            errors.append(f"{where}.name: {check.get('name')!r} appears twice")
        names.add(check.get("name"))
        for key, value in (check.get("figures") or {}).items():
            if not isinstance(value, (int, float, str, type(None))):
                errors.append(f"{where}.figures.{key}: not a number, string or null")
        if check.get("status") == "FAIL" and not check.get("detail"):
            errors.append(f"{where}: a FAIL without a detail")
    failed = any(isinstance(c, dict) and c.get("status") == "FAIL" for c in data["checks"])
    if data["ok"] == failed:
        errors.append(f"ok: {data['ok']} but {'a' if failed else 'no'} check failed")
    return errors
