"""`rlhf doctor`: a self-check a user runs before trusting a machine with a run, in under five
minutes on GPUs: CUDA and NCCL, one step of each stage under each strategy, bf16 against fp32,
throughput. On a CPU-only machine it runs the CPU checks and says what it skipped. One module
per job:

- `facts`: versions, CUDA / driver / NCCL, GPUs, CPU flags, memory, disk;
- `collectives`: process-group init, all_reduce / all_gather / broadcast answers, bus bandwidth;
- `steps`: one optimizer step of SFT, RM, PPO (with a critic), GRPO and DPO under a strategy;
- `parity`: bf16 autocast against fp32 on the tiny model;
- `throughput`: matmul FLOP/s per dtype, training tokens/s;
- `launch`: N local worker processes with a time limit and a log;
- `report`: the table, the JSON and the exit code;
- `run`: the command, in that order.
"""

from __future__ import annotations

import argparse


def add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="Self-check of this machine: devices, collectives, one step per stage and strategy, bf16, speed.",
        description="Checks CUDA/NCCL (or gloo on CPU), one optimizer step of SFT, RM, PPO, GRPO and DPO under each "
        "strategy, bf16 against fp32, matmul TFLOP/s and training tokens/s; prints a PASS/FAIL/SKIP table and "
        "writes a JSON report. Exit 0 only when nothing failed. Sized for under 5 minutes on GPUs.")
    doctor.add_argument("--quick", action="store_true",
                        help="smaller measurements, and only the strategies single and fsdp unless --strategies")
    doctor.add_argument("--out", default="rlhf-doctor.json", help="JSON report (default: %(default)s)")
    doctor.add_argument("--strategies", metavar="LIST",
                        help="comma-separated: single, zero2, zero3, fsdp, deepspeed (= zero2,zero3); default all")
    doctor.add_argument("--gpus", type=int, metavar="N", help="use the first N GPUs (default: every visible one)")
    doctor.add_argument("--work-dir", metavar="DIR",
                        help="where the temporary runs and logs go (default: the system's temp directory); "
                        "kept when a check fails")
    doctor.add_argument("--keep", action="store_true", help="keep the temporary runs and logs after a clean run")
    # The launched worker processes re-enter here (rlhf/doctor/launch.py).
    doctor.add_argument("--worker", choices=("collectives", "stages"), help=argparse.SUPPRESS)
    doctor.add_argument("--spec", help=argparse.SUPPRESS)


def run_doctor(args: argparse.Namespace, stages: dict) -> int:
    """The command (or, with --worker, one launched process); `stages` is the stage registry."""
    from rlhf.doctor.run import run_doctor as run, run_worker

    if args.worker:
        return run_worker(args, stages)
    return run(args)
