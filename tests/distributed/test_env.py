"""Launch detection, thread shares, launcher arguments: pure functions of the environment."""

import torch

from rlhf.distributed.env import (
    LaunchInfo,
    detect_launch,
    strip_launcher_args,
    threads_per_process,
)

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "abc"}
# The deepspeed launcher exports LOCAL_SIZE instead of LOCAL_WORLD_SIZE and no TORCHELASTIC_* variable.
DEEPSPEED = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29500", "CROSS_RANK": "1"}


def test_detect_launch_from_torchrun_deepspeed_and_none():
    assert detect_launch(TORCHRUN) == LaunchInfo(1, 4, 1, 2, "10.0.0.1", 29400, "torchrun")
    assert detect_launch(DEEPSPEED) == LaunchInfo(3, 4, 1, 2, "127.0.0.1", 29500, "env")
    assert detect_launch({}) == LaunchInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")
    # Without LOCAL_* every process is taken to be on this machine.
    assert detect_launch({"RANK": "0", "WORLD_SIZE": "2"}).local_world_size == 2


def test_threads_are_an_even_share_unless_omp_num_threads_says_otherwise(monkeypatch):
    monkeypatch.setattr("rlhf.distributed.env.available_cores", lambda: 2)
    assert threads_per_process(2, {}) == 1  # 2 cores, 2 processes
    assert threads_per_process(1, {}) == 2
    assert threads_per_process(4, {}) == 1  # never 0
    assert threads_per_process(2, {"OMP_NUM_THREADS": "3"}) == 3


def test_deepspeed_launcher_local_rank_argument_is_dropped():
    assert strip_launcher_args(["--local_rank=1", "sft", "--config", "a.yaml"]) == ["sft", "--config", "a.yaml"]
    assert strip_launcher_args(["--local_rank", "0", "sft", "x=1"]) == ["sft", "x=1"]
    assert strip_launcher_args(["sft", "train.lr=1e-5"]) == ["sft", "train.lr=1e-5"]


def test_auto_precision_is_fp32_on_a_cpu_pinned_to_it(monkeypatch):
    from rlhf.distributed.precision import resolve_precision

    monkeypatch.setenv("RLHF_CPU_BF16", "0")  # what the suite pins (tests/conftest.py)
    assert resolve_precision("auto", torch.device("cpu")) == "no"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
