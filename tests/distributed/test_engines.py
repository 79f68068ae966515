"""Every engine trains the same model as the single process, resumes exactly and exports
plain weights. Two CPU processes (gloo), the tiny model, fp32, 10 optimizer steps.

Each engine runs once straight through (saving at step 5) and, where resume is checked, once
more in fresh processes from a copy of that step-5 checkpoint; the runs are shared by the
tests below. Global batch 8 = micro 2 x accumulation 2 x 2 workers (accumulation 4 in the
single process), with gradient clipping active (the norms are ~1.3-1.5 > 1.0).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import SFTConfig, load_config
from rlhf.distributed.env import free_port
from rlhf.logging.metrics import read_metrics
from stages import sft

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_AT = 10, 5
ENGINES = {
    "zero1": ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    "zero3_offload": ["strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.offload_optimizer=true",
                      "strategy.offload_params=true"],
    "fsdp": ["strategy.name=fsdp"],
}
# ZeRO-1 goes through the deepspeed launcher, the others through torchrun.
LAUNCHER = {"zero1": "deepspeed"}
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "OMP_NUM_THREADS"}


def _overrides(data: str, model: Path, out: Path) -> list[str]:
    return [f"data.train.path={data}", f"model.path={model}", f"output_dir={out}", "logging.progress=false",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3", "train.eval_every=0",
            f"train.max_steps={STEPS}", f"train.save_every={SAVE_AT}", "data.max_length=128",
            "data.max_prompt_length=64"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["sft/loss"] for row in read_metrics(run_dir) if "sft/loss" in row}


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """A new run directory holding only the step-5 checkpoint: resuming there replays 6..10."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step-{SAVE_AT}", dst / "checkpoints" / f"step-{SAVE_AT}")
    (dst / "checkpoints" / "latest").write_text(f"step-{SAVE_AT}")


class Runs:
    """Runs on demand, each at most once per module."""

    def __init__(self, root: Path, data: str, model: Path):
        self.root, self.data, self.model = root, data, model
        self.done: dict[str, Path] = {}

    def single(self, resumed: bool = False) -> Path:
        key = "single-resumed" if resumed else "single"
        if key not in self.done:
            out = self.root / key
            if resumed:
                _copy_checkpoint(self.single(), out)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # the machine's other core may be busy: one thread each
            try:
                sft.main(load_config(SFTConfig, [], _overrides(self.data, self.model, out)))
            finally:
                torch.set_num_threads(threads)
            self.done[key] = out
        return self.done[key]

    def engine(self, name: str, resumed: bool = False) -> Path:
        key = f"{name}-resumed" if resumed else name
        if key not in self.done:
            out = self.root / key
            if resumed:
                _copy_checkpoint(self.engine(name), out)
            args = ["-m", "rlhf", "sft", *_overrides(self.data, self.model, out), *ENGINES[name]]
            if LAUNCHER.get(name) == "deepspeed":
                cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                       "--master_port", str(free_port()), "--module", *args[1:]]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
            # The launcher sets these; values left by an in-process run of this session must not leak in.
            env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
            env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
            assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="session")  # session: the always-run checks and the budgeted ones that reuse it run apart
def runs(tmp_path_factory, quickstart_data, tiny_model_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("engines"), quickstart_data["sft"], tiny_model_dir)


def marked(names, **marks):
    """`names` as parameters, each name in a `marks` list carrying that marker."""
    return [pytest.param(n, marks=[getattr(pytest.mark, m) for m, chosen in marks.items() if n in chosen])
            for n in names]


# One ZeRO-3 and one FSDP2 run are always run (marker core); the deepspeed launcher (ZeRO-1)
# and offload are the budgeted proofs of the README's strategy claims (marker claim).
@pytest.mark.parametrize("name", marked(ENGINES, core=("zero3", "fsdp"), claim=("zero1", "zero3_offload")))
def test_two_workers_match_the_single_process(runs, name):
    single, sharded = _losses(runs.single()), _losses(runs.engine(name))
    assert sorted(single) == sorted(sharded) == list(range(1, STEPS + 1))
    worst = max(abs(sharded[s] - single[s]) / abs(single[s]) for s in single)
    assert worst < 1e-4, f"{name}: max relative loss difference {worst:.2e}"


@pytest.mark.parametrize("name", ["single", "zero2", "zero3", "fsdp"])
def test_resume_replays_the_second_half_exactly(runs, name):
    straight = _losses(runs.single() if name == "single" else runs.engine(name))
    resumed = _losses(runs.single(resumed=True) if name == "single" else runs.engine(name, resumed=True))
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    if name == "single":
        assert [resumed[s] for s in resumed] == [straight[s] for s in resumed]  # bitwise
    else:
        worst = max(abs(resumed[s] - straight[s]) for s in resumed)
        assert worst <= 1e-6, f"{name}: resumed losses differ by up to {worst:.2e}"


@pytest.mark.parametrize("name", marked(["zero3", "fsdp"], core=("zero3", "fsdp")))  # the core runs, no new one
def test_exported_weights_give_the_single_process_logits(runs, name):
    reference = AutoModelForCausalLM.from_pretrained(runs.single() / "model").eval()
    exported = AutoModelForCausalLM.from_pretrained(runs.engine(name) / "model").eval()
    assert list((runs.engine(name) / "model").glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(runs.engine(name) / "model")
    ids = tokenizer(["List 3 fruits in uppercase.", "Name 2 birds, in lowercase."], return_tensors="pt",
                    padding=True)
    with torch.no_grad():
        torch.testing.assert_close(exported(**ids).logits, reference(**ids).logits, rtol=0, atol=1e-5)
