"""`rlhf doctor` on a CPU-only machine: the CPU checks pass and the GPU ones are skipped with a
reason; a broken stage step (made NaN, or raising, through the tests' fault variable) fails the
run with one line per check and no traceback on the terminal; the JSON report validates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.cli import main
from rlhf.doctor.report import Check, Report, validate_report
from rlhf.doctor.run import parse_strategies
from rlhf.doctor.steps import FAULT_VARIABLE, STAGE_STEPS, injected_faults
from rlhf.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what a machine without CUDA reports")


def doctor(tmp_path: Path, *args: str, fault: str = "") -> tuple[subprocess.CompletedProcess, dict, dict]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES | {FAULT_VARIABLE}}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if fault:
        env[FAULT_VARIABLE] = fault
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "rlhf", "doctor", "--quick", "--out", str(out), "--work-dir",
                           str(tmp_path), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    return proc, report, {c["name"]: c for c in report["checks"]}


def table_row(stdout: str, name: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(name + "  "))


@cpu_only
@pytest.mark.slow
def test_quick_run_on_cpu_passes_and_says_what_it_skipped(tmp_path):
    proc, report, checks = doctor(tmp_path, "--strategies", "single,fsdp")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert validate_report(report) == [] and report["ok"] is True
    assert "no CUDA device" in table_row(proc.stdout, "cuda") and " SKIP " in table_row(proc.stdout, "cuda")
    assert checks["collectives (nccl)"]["status"] == "SKIP" and "NCCL" in checks["collectives (nccl)"]["detail"]
    gloo = checks["collectives (gloo)"]
    assert gloo["status"] == "PASS" and gloo["figures"]["world_size"] == 2 and gloo["figures"]["busbw_gbps"] > 0
    assert checks["matmul float32 (cpu)"]["figures"]["tflops"] > 0
    assert checks["train tokens/s (cpu)"]["figures"]["tokens_per_s"] > 0
    for strategy in ("single", "fsdp"):
        for stage in STAGE_STEPS:
            row = checks[f"{stage} step [{strategy}]"]
            assert row["status"] == "PASS", row
            assert row["figures"]["param_change"] > 0 and row["figures"]["loss"] is not None
    assert "value loss" in checks["ppo step [fsdp]"]["detail"]  # PPO trained its critic too
    assert {c["status"] for c in report["checks"]} <= {"PASS", "SKIP"}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # a clean run leaves only the report


@pytest.mark.slow
def test_a_broken_step_fails_the_run_with_one_line_and_no_traceback(tmp_path):
    # sft: its loss turns NaN (the guard skips the step); ppo: the stage raises mid-launch, so
    # the process exits and the stages after it never run. rm starts from the SFT export and passes.
    proc, report, checks = doctor(tmp_path, "--strategies", "single", fault="sft,ppo:raise")
    assert proc.returncode == 1
    assert validate_report(report) == [] and report["ok"] is False
    assert "Traceback" not in proc.stdout + proc.stderr
    sft, ppo = table_row(proc.stdout, "sft step [single]"), table_row(proc.stdout, "ppo step [single]")
    assert " FAIL " in sft and "non-finite sft/loss" in sft
    assert " FAIL " in ppo and "RuntimeError: fault injected" in ppo
    assert checks["rm step [single]"]["status"] == "PASS"
    for stage in ("grpo", "dpo"):
        assert checks[f"{stage} step [single]"]["detail"] == "not run: ppo step [single] failed before it"
    assert "Traceback" in checks["ppo step [single]"]["error"]  # the full story is in the JSON
    assert Path(checks["ppo step [single]"]["log"]).is_file()  # and the log is kept


def test_report_table_json_and_exit_code(tmp_path):
    report = Report({"gpu": {"available": False}})
    report.add(Check("a", "PASS", "fine", {"x": 1.0}))
    report.add(Check("b", "SKIP", "no CUDA device: skipped"))
    assert report.exit_code() == 0
    report.add(Check("c", "FAIL", "broke\nover two lines", {"loss": float("nan")}, error="Traceback ..."))
    assert report.exit_code() == 1
    lines = report.table().splitlines()
    assert lines[-2].split() == ["c", "FAIL", "broke", "over", "two", "lines"]  # one line per check
    assert lines[-1] == "1 passed, 1 failed, 1 skipped"
    report.write(tmp_path / "r.json")
    written = json.loads((tmp_path / "r.json").read_text())
    assert validate_report(written) == [] and written["checks"][2]["figures"]["loss"] is None
    written["ok"] = True
    written["checks"][0]["status"] = "MAYBE"
    del written["checks"][1]["detail"]
    errors = validate_report(written)
    assert any("checks[0].status" in e for e in errors) and any("checks[1].detail" in e for e in errors)
    assert any(e.startswith("ok:") for e in errors)
    with pytest.raises(ValueError):
        Check("d", "OK", "not a status")


def test_strategy_names_and_faults_parse():
    assert parse_strategies("single,deepspeed", quick=False) == ["single", "zero2", "zero3"]
    assert parse_strategies(None, quick=True) == ["single", "fsdp"]
    assert parse_strategies(None, quick=False) == ["single", "zero2", "zero3", "fsdp"]
    with pytest.raises(UserError, match="'zero4' is not one of"):
        parse_strategies("single,zero4", quick=False)
    assert injected_faults("sft, dpo:raise") == {"sft": "nan", "dpo": "raise"}


def test_a_bad_option_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["doctor", "--strategies", "zero4", "--out", str(out), "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --strategies: 'zero4'") and err.count("\n") == 1
    assert main(["doctor", "--work-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: --work-dir {tmp_path / 'nope'}: no such directory\n"
    assert list(tmp_path.iterdir()) == []


def test_a_step_that_leaves_the_weights_as_they_were_fails(tmp_path):
    from safetensors.torch import save_file

    from rlhf.doctor.steps import check_stage

    # std 0.02, as transformers initialises the tiny model
    weights = {"model.embed_tokens.weight": 0.02 * torch.randn(64, 16, generator=torch.Generator().manual_seed(0))}
    (tmp_path / "start").mkdir()
    (tmp_path / "run" / "model").mkdir(parents=True)
    save_file(weights, tmp_path / "start" / "model.safetensors")
    rounded = {k: v.bfloat16().float() for k, v in weights.items()}  # a bf16 round trip is no step
    save_file(rounded, tmp_path / "run" / "model" / "model.safetensors")
    row = {"step": 1, "sft/loss": 2.5, "sft/skipped_nonfinite": 0.0}
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    found = check_stage("sft", tmp_path / "run", tmp_path / "start")
    assert found["status"] == "FAIL" and "unchanged" in found["detail"]
    moved = {k: v - 1e-3 * torch.sign(v) for k, v in weights.items()}  # what AdamW's first step does at lr 1e-3
    save_file(moved, tmp_path / "run" / "model" / "model.safetensors")
    found = check_stage("sft", tmp_path / "run", tmp_path / "start")
    assert found["status"] == "PASS" and found["figures"]["loss"] == 2.5


def test_cpu_facts_name_the_flags_that_decide_bf16():
    from rlhf.doctor.facts import cpu_has_fast_bf16, cpu_info

    intel = cpu_info("model name\t: Intel Xeon\nflags\t\t: fpu avx2 fma avx512f amx_tile amx_bf16\n")
    assert intel["model"] == "Intel Xeon" and intel["flags"] == ["avx2", "fma", "avx512f", "amx_tile", "amx_bf16"]
    assert cpu_has_fast_bf16(intel["flags"])
    assert not cpu_has_fast_bf16(cpu_info("model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n")["flags"])


def test_a_failed_launch_is_named_by_the_workers_exception_not_torchruns_summary(tmp_path):
    from rlhf.doctor.launch import Launched

    log = tmp_path / "output.log"
    log.write_text("Traceback (most recent call last):\n  File \"w.py\", line 1\n"
                   "[rank1]: torch.distributed.DistBackendError: NCCL error: unhandled system error\n"
                   "ERROR:torch.distributed.elastic:failed (exitcode: 1)\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n=====\n")
    line = Launched(1, False, None, log).last_error_line()
    assert line == "[rank1]: torch.distributed.DistBackendError: NCCL error: unhandled system error"
