"""benchmarks/report.py: results from two processors never share a table, each processor gets
its own targets table, and bf16 results meet issue 26's bf16 targets (SFT 3x, MFU of the bf16
peak) while fp32 results keep the earlier ones."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture()
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("common", "report"):
        sys.modules.pop(name, None)
    import report

    return report


def _machine(vendor: str, name: str, flags: list[str]) -> dict:
    return {"cpus": 2, "gpu": None, "processor": {"vendor": vendor, "model_name": name, "family": "6", "model": "143",
                                                  "cores": 2, "flags": flags}}


def _write(directory: Path, name: str, machine: dict, rows: list[dict]) -> None:
    (directory / f"{name}.json").write_text(json.dumps({"benchmark": name, "machine": machine, "rows": rows}))


def test_tables_and_targets_are_per_processor_and_per_precision(report, tmp_path, capsys):
    intel = _machine("GenuineIntel", "Intel Xeon Platinum", ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"])
    amd = _machine("AuthenticAMD", "AMD EPYC 9B45", ["avx2", "avx512f", "avx512_bf16"])
    _write(tmp_path, "sft_smollm2", intel, [{"side": "ours", "ratio": 1.7, "mfu": 0.54}, {"side": "trl"}])
    _write(tmp_path, "sft_smollm2_bf16", intel, [{"side": "ours", "ratio": 3.2, "mfu": 0.25}, {"side": "trl"}])
    _write(tmp_path, "rm_smollm2_bf16", intel, [{"side": "ours", "k": 2, "ratio": 1.6}])
    _write(tmp_path, "ppo_smollm2", amd, [{"side": "ours", "ratio": 2.1}])
    _write(tmp_path, "rollout_smollm2", amd, [{"batch": 8, "ours_tokens_per_s": 90.0, "generate_tokens_per_s": 80.0,
                                               "vllm_tokens_per_s": 320.0, "ratio": 1.12}])
    _write(tmp_path, "dpo_tiny", {"cpus": 2}, [{"side": "ours", "ratio": 2.0}])  # recorded no processor
    groups = report.by_processor(report.load_all(tmp_path))
    assert len(groups) == 3 and set(groups["unknown processor (not recorded)"]) == {"dpo_tiny"}
    intel_key = next(key for key in groups if "Xeon" in key)
    assert intel_key.startswith("GenuineIntel") and "amx_bf16" in intel_key
    assert set(groups[intel_key]) == {"sft_smollm2", "sft_smollm2_bf16", "rm_smollm2_bf16"}

    found = {(p, what): (need, got) for group in groups.values() for name, result in group.items()
             for _, p, _, what, need, got in report.checks(name, result, name.split("_")[1], "bf16" if
                                                               name.endswith("_bf16") else "fp32")}
    assert found[("bf16", report.TARGETS["sft_bf16"][1])] == (3.0, 3.2)
    assert found[("bf16", report.TARGETS["mfu_bf16"][1])] == (0.3, 0.25)
    assert found[("fp32", report.TARGETS["sft"][1])] == (1.2, 1.7)
    assert found[("bf16", report.TARGETS["rm_k2"][1])] == (1.5, 1.6)
    assert found[("fp32", report.TARGETS["rollout_b8"][1])] == (2.0, 4.0)  # vLLM's rate, the faster engine

    report.main(tmp_path)
    out = capsys.readouterr().out
    sections = out.split("\n## ")
    assert out.count("### Targets on GenuineIntel") == 1 and out.count("### Targets on AuthenticAMD") == 1
    intel_section = next(s for s in sections if "Xeon" in s.splitlines()[0])
    assert "ppo_smollm2" not in intel_section and "sft_smollm2_bf16" in intel_section


def test_precision_flag_names_results_and_pins_our_precision(report):
    import common

    args = argparse.Namespace(model="tiny", label="ours", precision="bf16")
    assert common.result_name("sft", args) == "sft_tiny_bf16"
    assert common.result_name("sft", argparse.Namespace(model="tiny", label="rows", precision="fp32")) == "sft_tiny_rows"
    assert common.precision_overrides("fp32") == ["strategy.mixed_precision=no"]
    assert common.precision_overrides("bf16") == ["strategy.mixed_precision=bf16"]
    parsed = common.stage_parser("x\n").parse_args(["--precision", "bf16"])
    assert parsed.precision == "bf16" and common.stage_parser("x\n").parse_args([]).precision == "fp32"
