"""A process killed while saving leaves the previous checkpoint complete, loadable, and
`latest` pointing at it; the next save goes through."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.config_sections import ModelConfig, StrategyConfig
from rlhf.distributed import checkpoint as checkpoint_module
from rlhf.distributed.checkpoint import CheckpointManager
from rlhf.distributed.single import SingleStrategy
from rlhf.models.loading import load_causal_lm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _die_during_save import SPEC  # noqa: E402


@pytest.mark.slow
@pytest.mark.claim
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir):
    root = tmp_path / "checkpoints"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(HERE.parents[1]), OMP_NUM_THREADS="1")
    child = subprocess.run([sys.executable, str(HERE / "_die_during_save.py"), str(tiny_model_dir), str(root)],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-3000:]

    # The half-written save is a hidden temp directory; `latest` was never moved.
    assert (root / ".step-2.tmp" / "policy" / "model.safetensors").is_file()
    assert not (root / "step-2").exists()
    assert (root / "latest").read_text().strip() == "step-1"

    strategy = SingleStrategy(StrategyConfig())
    strategy.setup(0)
    trained = strategy.wrap(load_causal_lm(ModelConfig(path=str(tiny_model_dir)), strategy.device), SPEC)
    manager = CheckpointManager(root, strategy, keep_last=2)
    assert manager.resolve("auto") == root / "step-1"
    assert manager.load({"policy": trained}, root / "step-1")["step"] == 1
    expected = torch.load(tmp_path / "weights-step-1.pt", weights_only=True)
    for name, value in trained.module.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert trained.scheduler.last_epoch == 1

    # Dying after the rename but before the pointer moves: `latest` still names step 1.
    real_write = checkpoint_module.write_text_atomic

    def die(path, text):
        raise KeyboardInterrupt("killed")

    checkpoint_module.write_text_atomic = die
    try:
        with pytest.raises(KeyboardInterrupt):
            manager.save({"policy": trained}, 2, {"step": 2})
    finally:
        checkpoint_module.write_text_atomic = real_write
    assert manager.resolve("auto") == root / "step-1"

    # A later save replaces the leftovers and moves the pointer.
    manager.save({"policy": trained}, 3, {"step": 3})
    assert manager.resolve("auto") == root / "step-3"
    assert not (root / ".step-2.tmp").exists(), "the killed save's temp directory is cleaned up"
