"""`rlhf doctor`: every check in turn, the table, the JSON report and the exit code.

Order: environment; CUDA init (or why skipped); the process-group check on every GPU (NCCL) or
2 CPU processes (gloo); bf16/fp32 parity; matmul FLOP/s and training tokens/s; then one launch
per strategy running one step of every stage. An in-process check that raises is a FAIL with
its message; its traceback goes to the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from rlhf.doctor import facts
from rlhf.doctor.launch import Launched, launch_worker
from rlhf.doctor.report import Check, Report
from rlhf.doctor.steps import STAGE_STEPS, STRATEGIES, write_data
from rlhf.errors import UserError

STAGE_TIMEOUT_S = 600
"""Per strategy launch (all five stages); a hang (a collective one rank never joins) ends here."""
COLLECTIVE_TIMEOUT_S = 180


def parse_strategies(text: str | None, quick: bool) -> list[str]:
    """--strategies: names from STRATEGIES; "deepspeed" means ZeRO-2 and ZeRO-3. Default: all
    of them, or with --quick the single process and FSDP2."""
    if not text:
        return ["single", "fsdp"] if quick else list(STRATEGIES)
    names: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        expanded = ["zero2", "zero3"] if name == "deepspeed" else [name]
        for one in expanded:
            if one not in STRATEGIES:
                raise UserError(f"--strategies: {name!r} is not one of {', '.join([*STRATEGIES, 'deepspeed'])}")
            if one not in names:
                names.append(one)
    return names


def _gpu_count(requested: int | None) -> int:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested is not None:
        if requested < 0 or requested > available:
            raise UserError(f"--gpus {requested}: this machine has {available} visible GPU(s)")
        return requested
    return available


def _guarded(report: Report, name: str, check: Callable[[], Check]) -> None:
    started = time.perf_counter()
    print(f"doctor: {name} ...", file=sys.stderr, flush=True)
    try:
        result = check()
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        result = Check(name, "FAIL", message, error=traceback.format_exc())
    if result.seconds is None:
        result.seconds = round(time.perf_counter() - started, 2)
    report.add(result)


def _no_gpu_reason() -> str:
    return "--gpus 0" if torch.cuda.is_available() else "no CUDA device"


def _cuda_check(gpus: int) -> Check:
    if gpus == 0:
        return Check("cuda", "SKIP", f"{_no_gpu_reason()}: CUDA init, NCCL and GPU checks skipped")
    for index in range(gpus):
        x = torch.ones(1024, device=f"cuda:{index}")
        torch.cuda.synchronize(index)
        if float(x.sum()) != 1024:
            return Check("cuda", "FAIL", f"cuda:{index} computed a wrong sum")
    names = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(gpus)}))
    return Check("cuda", "PASS", f"{gpus} device(s) initialised: {names}; CUDA {torch.version.cuda}")


def _collective_check(name: str, processes: int, quick: bool, gpus: int, work: Path,
                      child_env: dict[str, str]) -> Check:
    gpu = gpus > 0
    spec = {"megabytes": (64 if quick else 256) if gpu else (8 if quick else 32),
            "iterations": (10 if quick else 20) if gpu else (3 if quick else 5)}
    launched = launch_worker("collectives", spec, processes, work / "collectives", COLLECTIVE_TIMEOUT_S, child_env)
    failure = _launch_failure(name, launched, COLLECTIVE_TIMEOUT_S)
    if failure:
        return failure
    found = launched.result
    figures = {k: found[k] for k in ("world_size", "init_seconds", "megabytes", "allreduce_seconds", "algbw_gbps",
                                     "busbw_gbps")}
    if found["wrong"]:
        return Check(name, "FAIL", f"wrong result on some rank: {', '.join(found['wrong'])}", figures,
                     log=str(launched.log))
    bandwidth = (f"bus bandwidth {found['busbw_gbps']:.2f} GB/s (all_reduce of {found['megabytes']} MB)"
                 if found["world_size"] > 1 else "one rank: no bandwidth to measure")
    return Check(name, "PASS", f"init {found['init_seconds']:.1f} s; all_reduce, all_gather, broadcast correct on "
                 f"{found['world_size']} ranks ({found['backend']}); {bandwidth}", figures)


def _launch_failure(name: str, launched: Launched, timeout_s: float) -> Check | None:
    if launched.timed_out:
        return Check(name, "FAIL", f"timed out after {timeout_s:.0f} s (log: {launched.log})",
                     error=launched.log_tail(), log=str(launched.log))
    if launched.returncode != 0 or launched.result is None:
        return Check(name, "FAIL", f"{launched.last_error_line()} (exit {launched.returncode}; log: {launched.log})",
                     error=launched.log_tail(), log=str(launched.log))
    return None


def _parity_check(device: torch.device, env: Mapping[str, Any]) -> Check:
    from rlhf.doctor.parity import GRAD_NORM_TOLERANCE, LOSS_TOLERANCE, bf16_parity

    name = f"bf16 parity ({device.type})"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Check(name, "SKIP", f"{torch.cuda.get_device_name(device)} has no bf16")
    if device.type == "cpu" and not facts.cpu_has_fast_bf16(env["cpu"]["flags"]):
        return Check(name, "SKIP", "CPU without avx512_bf16 or amx_bf16: bf16 is emulated there and training "
                     "runs fp32 (strategy.mixed_precision=auto)")
    found = bf16_parity(device)
    figures = {k: v for k, v in found.items() if k != "ok"}
    detail = (f"loss rel. diff {found['loss_rel_diff']:.1e} (<= {LOSS_TOLERANCE:g}), grad norm rel. diff "
              f"{found['grad_norm_rel_diff']:.1e} (<= {GRAD_NORM_TOLERANCE:g})")
    return Check(name, "PASS" if found["ok"] else "FAIL", detail, figures)


def _matmul_check(device: torch.device, dtype: torch.dtype, env: Mapping[str, Any], quick: bool) -> Check:
    from rlhf.doctor.throughput import matmul_flops

    label = str(dtype).removeprefix("torch.")
    name = f"matmul {label} ({device.type})"
    if dtype == torch.bfloat16 and device.type == "cpu" and not facts.cpu_has_fast_bf16(env["cpu"]["flags"]):
        return Check(name, "SKIP", "CPU without avx512_bf16 or amx_bf16: bf16 products run emulated (~1 GFLOP/s)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Check(name, "SKIP", f"{torch.cuda.get_device_name(device)} has no bf16")
    size = (4096 if quick else 8192) if device.type == "cuda" else (1024 if quick else 2048)
    # On a CPU the linear layers may go through oneDNN rather than MKL (rlhf/kernels/onednn.py),
    # which differ by up to 2x on AMD processors: the figure is the faster one, named.
    kernels = ["torch.mm"] + (["onednn"] if device.type == "cpu" and torch.backends.mkldnn.is_available() else [])
    by_kernel = {k: matmul_flops(size, dtype, device, repeats=3 if quick else 5, kernel=k) / 1e12 for k in kernels}
    best = max(by_kernel, key=by_kernel.get)
    return Check(name, "PASS", f"{by_kernel[best]:.3g} TFLOP/s ({size}x{size}, {best})",
                 {"tflops": by_kernel[best], "size": size, "kernel": best,
                  **{f"tflops_{k}": v for k, v in by_kernel.items()}})


def _tokens_check(device: torch.device, quick: bool, peaks: Mapping[str, Check]) -> Check:
    """Training tokens/s in the precision strategy.mixed_precision=auto picks here, and its
    MFU against the measured matmul peak of that precision (`peaks`: the matmul checks)."""
    from rlhf.distributed.precision import resolve_precision
    from rlhf.doctor.throughput import training_tokens_per_s

    bf16 = resolve_precision("auto", device) == "bf16"
    shape = dict(batch=32, length=512) if device.type == "cuda" else dict(batch=8, length=128)
    found = training_tokens_per_s(device, bf16, steps=3 if quick else 10, **shape)
    peak = peaks.get("bfloat16" if bf16 else "float32")
    mfu = ""
    if peak is not None and peak.status == "PASS":
        found["mfu"] = 6 * found["matmul_params"] * found["tokens_per_s"] / (peak.figures["tflops"] * 1e12)
        mfu = f"; MFU {found['mfu']:.3f} of the {peak.name.split()[1]} peak"
    return Check(f"train tokens/s ({device.type})", "PASS",
                 f"{found['tokens_per_s']:,.0f} tokens/s ({found['dtype']}, tiny model h={found['hidden']}, "
                 f"{found['batch']}x{found['length']}){mfu}", found)


def _stage_checks(report: Report, strategy: str, processes: int, data: Mapping[str, str], work: Path,
                  child_env: dict[str, str]) -> None:
    label = lambda stage: f"{stage} step [{strategy}]"  # noqa: E731
    print(f"doctor: one step of {', '.join(STAGE_STEPS)} under {strategy} ({processes} process(es)) ...",
          file=sys.stderr, flush=True)
    spec = {"work": str(work / "stages"), "strategy": strategy, "data": dict(data), "stages": list(STAGE_STEPS)}
    launched = launch_worker("stages", spec, processes, work / "launch" / strategy, STAGE_TIMEOUT_S, child_env)
    found = launched.result or {}
    failure = _launch_failure(strategy, launched, STAGE_TIMEOUT_S)
    # The stages run in order and a raising one ends the launch: the last one with a result is
    # the one that stopped it.
    stopped_by = next((label(s) for s in reversed(STAGE_STEPS) if s in found), None)
    for stage in STAGE_STEPS:
        row = found.get(stage)
        if row is None:
            cause = f"{stopped_by} failed before it" if stopped_by else (failure.detail if failure else "no result")
            report.add(Check(label(stage), "FAIL", f"not run: {cause}", log=str(launched.log),
                             error=failure.error if failure else None))
            continue
        check = Check(label(stage), row["status"], row.get("detail", ""), row.get("figures", {}),
                      row.get("seconds"), row.get("traceback"), str(launched.log))
        if check.status == "FAIL" and failure is not None and row.get("traceback") is None:
            check.detail, check.error = f"{check.detail}: {failure.detail}", failure.error
        report.add(check)
    if failure is not None and all(found.get(s, {}).get("status") == "PASS" for s in STAGE_STEPS):
        # Every step passed, then the launch failed (a crash at exit): still a failure.
        failure.name = f"{strategy} launch"
        report.add(failure)


def run_doctor(args: argparse.Namespace) -> int:
    strategies = parse_strategies(args.strategies, args.quick)
    gpus = _gpu_count(args.gpus)
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name, e.g. {out / 'doctor.json'}")
    if args.work_dir and not Path(args.work_dir).is_dir():
        raise UserError(f"--work-dir {args.work_dir}: no such directory")
    work = Path(tempfile.mkdtemp(prefix="rlhf-doctor-", dir=args.work_dir))
    started = time.perf_counter()
    report = Report(environment=facts.environment(work))
    report.environment.update({"strategies": strategies, "gpus": gpus, "quick": bool(args.quick)})
    device = torch.device("cuda", 0) if gpus else torch.device("cpu")
    sharded_processes = gpus if gpus else 2
    # --gpus 0 on a GPU machine: the workers must not find the GPUs either (they pick CUDA
    # whenever they see one).
    child_env = {"CUDA_VISIBLE_DEVICES": ""} if gpus == 0 and torch.cuda.is_available() else {}

    report.add(Check("environment", "PASS", facts.summary(report.environment)))
    _guarded(report, "cuda", lambda: _cuda_check(gpus))
    if gpus:
        _guarded(report, "collectives (nccl)",
                 lambda: _collective_check("collectives (nccl)", gpus, args.quick, gpus, work, child_env))
    else:
        report.add(Check("collectives (nccl)", "SKIP", f"{_no_gpu_reason()}: NCCL checks skipped"))
        _guarded(report, "collectives (gloo)",
                 lambda: _collective_check("collectives (gloo)", 2, args.quick, 0, work, child_env))
    _guarded(report, f"bf16 parity ({device.type})", lambda: _parity_check(device, report.environment))
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        label = f"matmul {str(dtype).removeprefix('torch.')} ({device.type})"
        _guarded(report, label, lambda dtype=dtype: _matmul_check(device, dtype, report.environment, args.quick))
        peaks[str(dtype).removeprefix("torch.")] = report.checks[-1]
    _guarded(report, f"train tokens/s ({device.type})", lambda: _tokens_check(device, args.quick, peaks))
    if gpus:
        torch.cuda.empty_cache()  # the launches below get cuda:0 back
    else:
        report.add(Check("gpu throughput", "SKIP",
                         f"{_no_gpu_reason()}: GPU matmul and tokens/s skipped (CPU measured)"))

    try:
        data = write_data(work / "data", sharded_processes)
    except OSError as exc:  # a full or read-only disk: nothing to train on
        report.add(Check("stage data", "FAIL", f"{type(exc).__name__}: {exc}", error=traceback.format_exc()))
        strategies = []
    for strategy in strategies:
        processes = 1 if strategy == "single" else sharded_processes
        _stage_checks(report, strategy, processes, data, work, child_env)

    report.environment["seconds"] = round(time.perf_counter() - started, 1)
    report.write(out)
    print(report.table())
    print(f"report: {out} ({report.environment['seconds']:.0f} s)")
    if report.failed:
        print(f"logs of the launched processes: {work}", file=sys.stderr)
    elif not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return report.exit_code()


def run_worker(args: argparse.Namespace, stages: Mapping[str, Any]) -> int:
    """The `--worker` side of a launch (see launch.py)."""
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    result = Path(spec["result"])
    if args.worker == "collectives":
        from rlhf.doctor.collectives import run_collectives

        run_collectives(spec, result)
    else:
        from rlhf.doctor.steps import run_stage_steps

        run_stage_steps(spec, stages, result)
    return 0
