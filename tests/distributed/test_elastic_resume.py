"""Elastic resume: a checkpoint saved by N workers resumes on M and continues the loss curve
of the uninterrupted N-worker run.

The fast tests check the rule (which layouts load each other, the batch fields that must
stay, what each rank restores of the client state). The slow ones chain SFT runs of the tiny
model, 8 steps, a checkpoint every 2, global batch 8 = micro 2 x accumulation 2 x 2 workers
(accumulation 4 on one):
- FSDP2: 2 workers straight; 1 FSDP2 worker from its step 2 (DCP resharded 2 -> 1); the
  single process from that run's step 4 (DCP into whole tensors); 2 FSDP2 workers from the
  single process's step 6 (its full state broadcast into the shards, 1 -> 2).
- ZeRO-3: 2 workers straight; 1 worker from its step 2 (DeepSpeed's universal checkpoint,
  converted on resume); 2 workers from that run's step 4 (converted again, 1 -> 2).
Weight decay is on, so that each parameter group's own hyperparameters must survive the load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.config import SFTConfig, load_config
from rlhf.distributed.checkpoint import CheckpointManager, batch_problem, resume_problem
from rlhf.distributed.strategy import World
from rlhf.errors import UserError
from rlhf.logging.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 8, 2
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "OMP_NUM_THREADS"}
TOLERANCE = 1e-6
"""Relative loss difference allowed against the uninterrupted run. M workers reduce the
gradient in another order than N (and accumulate another number of micro-batches each), so
fp32 rounding differs: ~1e-8 relative is what such runs show here. A wrong restore shows far
more: a missing Adam step count, another group's weight decay or a moment of the wrong
parameter moved the losses by 1e-5 to 1e-3 within 3 steps."""


# -- the rule ---------------------------------------------------------------------------------
def test_which_layouts_resume_at_another_number_of_workers():
    assert resume_problem("fsdp", 2, "fsdp", 2) is None
    assert resume_problem("fsdp", 2, "fsdp", 3) is None
    assert resume_problem("fsdp", 4, "single", 1) is None
    assert resume_problem("single", 1, "fsdp", 2) is None
    assert resume_problem("deepspeed", 2, "deepspeed", 1) is None
    switched = resume_problem("deepspeed", 2, "fsdp", 2)
    assert switched is not None and "\n" not in switched
    assert "deepspeed with 2 worker(s)" in switched and "this run uses fsdp with 2" in switched
    assert "strategy.name=deepspeed" in switched and "train.resume=never" in switched
    back = resume_problem("fsdp", 2, "deepspeed", 2)
    assert "strategy.name=single or strategy.name=fsdp" in back
    # Ray role groups: a layout of its own, resumed only as saved.
    roles = "deepspeed+roles:[['actor', 'critic']]x2"
    assert resume_problem(roles, 1, roles, 1) is None
    assert "resumes only as saved" in resume_problem(roles, 1, roles.replace("x2", "x4"), 1)


def test_the_batch_fields_must_stay():
    saved = {"train.global_batch_size": 8, "train.micro_batch_size": 2}
    assert batch_problem(saved, dict(saved)) is None
    assert batch_problem({}, saved) is None  # a checkpoint of older code records none
    message = batch_problem(saved, {"train.global_batch_size": 16, "train.micro_batch_size": 2})
    assert "train.global_batch_size=8" in message and "train.global_batch_size=16" in message
    assert "micro_batch_size" not in message


class Trainee:
    def __init__(self):
        self.module = torch.nn.Linear(4, 2)

    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), directory / "weights.pt")

    def load_state(self, directory: Path) -> None:
        self.module.load_state_dict(torch.load(directory / "weights.pt", weights_only=True))


class Worker(World):
    """Rank `rank` of `size` without a process group: each collective returns this rank's
    own values (every worker of these tests agrees)."""

    def __init__(self, rank: int, size: int, name: str = "fsdp"):
        super().__init__()
        self.rank, self.world_size, self.name = rank, size, name


def _save_two_workers(root: Path) -> dict[int, torch.Tensor]:
    """step-3 as 2 workers write it, each with its own RNG state; their torch RNG states."""
    rngs = {}
    for rank in (1, 0):
        trainee = Trainee()
        torch.manual_seed(100 + rank)
        rngs[rank] = torch.get_rng_state()
        # Rank 1 alone leaves its part in the temporary directory (rank 0 renames it into place).
        CheckpointManager(root / f"rank{rank}", Worker(rank, 2), batch={"train.global_batch_size": 8}).save(
            {"policy": trainee}, 3, {"step": 3, "state": {"rank": rank}})
    shutil.move(root / "rank0", root / "checkpoints")
    shutil.move(root / "rank1" / ".step-3.tmp" / "client_state_rank1.pt", root / "checkpoints" / "step-3")
    return rngs


def test_client_state_and_rng_on_another_number_of_workers(tmp_path):
    rngs = _save_two_workers(tmp_path)

    def load(rank: int, size: int) -> tuple[dict, torch.Tensor]:
        manager = CheckpointManager(tmp_path / "checkpoints", Worker(rank, size),
                                    batch={"train.global_batch_size": 8})
        state = manager.load({"policy": Trainee()}, tmp_path / "checkpoints" / "step-3")
        return state, torch.get_rng_state()

    # Same size: each rank its own file.
    assert load(1, 2)[0]["state"] == {"rank": 1}
    # 2 -> 3: rank 0's client state everywhere; ranks 0 and 1 their own RNG, rank 2 a new one
    # that is reproducible and its own.
    for rank in (0, 1):
        state, rng = load(rank, 3)
        assert state["state"] == {"rank": 0} and state["step"] == 3
        assert torch.equal(rng, rngs[rank])
    third, again = load(2, 3)[1], load(2, 3)[1]
    assert torch.equal(third, again)
    assert not any(torch.equal(third, saved) for saved in rngs.values())


def test_a_switch_of_engine_or_batch_is_one_clear_error(tmp_path):
    _save_two_workers(tmp_path)
    root = tmp_path / "checkpoints"
    deepspeed = CheckpointManager(root, Worker(0, 2, "deepspeed"), batch={"train.global_batch_size": 8})
    with pytest.raises(UserError, match=r"was written by fsdp with 2 worker\(s\); this run uses deepspeed with 2"):
        deepspeed.load({"policy": Trainee()}, deepspeed.resolve("auto"))
    bigger = CheckpointManager(root, Worker(0, 1), batch={"train.global_batch_size": 16})
    with pytest.raises(UserError, match=r"train.global_batch_size=8; this run sets train.global_batch_size=16"):
        bigger.load({"policy": Trainee()}, bigger.resolve("auto"))


# -- the runs ---------------------------------------------------------------------------------
def _overrides(data: str, model: Path, out: Path) -> list[str]:
    return [f"data.train.path={data}", f"model.path={model}", f"output_dir={out}", "logging.progress=false",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3", "train.weight_decay=0.1",
            "train.eval_every=0", f"train.max_steps={STEPS}", f"train.save_every={EVERY}", "train.keep_last=10",
            "data.max_length=128", "data.max_prompt_length=64"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["sft/loss"] for row in read_metrics(run_dir) if "sft/loss" in row}


def _from(src: Path, step: int, dst: Path) -> Path:
    """A new run directory holding only `src`'s checkpoint of `step`."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step-{step}", dst / "checkpoints" / f"step-{step}")
    (dst / "checkpoints" / "latest").write_text(f"step-{step}")
    return dst


def _launch(workers: int, out: Path, data: str, model: Path, strategy: list[str]) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers),
           "-m", "rlhf", "sft", *_overrides(data, model, out), *strategy]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{out.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _single(out: Path, data: str, model: Path) -> None:
    from stages import sft

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's other core may be busy: one thread, as each worker has
    try:
        sft.main(load_config(SFTConfig, [], _overrides(data, model, out) + ["strategy.name=single"]))
    finally:
        torch.set_num_threads(threads)


def _assert_continues(straight: dict[int, float], resumed: dict[int, float], first: int, what: str) -> None:
    assert sorted(resumed) == list(range(first, STEPS + 1)), what
    worst = max(abs(resumed[s] - straight[s]) / abs(straight[s]) for s in resumed)
    assert worst < TOLERANCE, f"{what}: losses differ from the uninterrupted run by up to {worst:.2e} (relative)"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_resumes_on_one_worker_the_single_process_and_two_again(tmp_path, quickstart_data, tiny_model_dir):
    data, fsdp = quickstart_data["sft"], ["strategy.name=fsdp"]
    straight = tmp_path / "two"
    _launch(2, straight, data, tiny_model_dir, fsdp)
    one = _from(straight, 2, tmp_path / "one")
    _launch(1, one, data, tiny_model_dir, fsdp)
    single = _from(one, 4, tmp_path / "single")
    _single(single, data, tiny_model_dir)
    two = _from(single, 6, tmp_path / "two-again")
    _launch(2, two, data, tiny_model_dir, fsdp)
    expected = _losses(straight)
    _assert_continues(expected, _losses(one), 3, "FSDP2 2 -> 1")
    _assert_continues(expected, _losses(single), 5, "FSDP2 1 -> single process")
    _assert_continues(expected, _losses(two), 7, "single process -> FSDP2 2")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_resumes_on_one_worker_and_two_again(tmp_path, quickstart_data, tiny_model_dir):
    data = quickstart_data["sft"]
    raw = tmp_path / "zero3.json"  # every weight partitioned, so that resharding has work to do
    raw.write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
    zero3 = ["strategy.name=deepspeed", "strategy.zero_stage=3", f"strategy.deepspeed_config={raw}"]
    straight = tmp_path / "two"
    _launch(2, straight, data, tiny_model_dir, zero3)
    one = _from(straight, 2, tmp_path / "one")
    printed = _launch(1, one, data, tiny_model_dir, zero3)
    assert "saved by 2 ZeRO worker(s), this run has 1: converted to DeepSpeed's universal checkpoint" in printed
    two = _from(one, 4, tmp_path / "two-again")
    printed = _launch(2, two, data, tiny_model_dir, zero3)
    assert "saved by 1 ZeRO worker(s), this run has 2" in printed
    expected = _losses(straight)
    _assert_continues(expected, _losses(one), 3, "ZeRO-3 2 -> 1")
    _assert_continues(expected, _losses(two), 5, "ZeRO-3 1 -> 2")
