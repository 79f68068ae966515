"""Child process of test_checkpoint_kill.py: saves step 1, trains on, and is SIGKILLed in the
middle of saving step 2 (after the weights are written, before the save completes).

    python _die_during_save.py MODEL_DIR CHECKPOINT_ROOT
"""

import os
import signal
import sys
from pathlib import Path

import torch

from rlhf.config_sections import ModelConfig, StrategyConfig
from rlhf.distributed.checkpoint import CheckpointManager
from rlhf.distributed.single import SingleStrategy
from rlhf.models.loading import load_causal_lm
from rlhf.distributed.optim import OptimizerSpec

SPEC = OptimizerSpec(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0,
                     scheduler="cosine", warmup_steps=0, total_steps=4, min_lr_ratio=0.0)


def main(model_dir: str, root: Path) -> None:
    strategy = SingleStrategy(StrategyConfig())
    strategy.setup(0)
    trained = strategy.wrap(load_causal_lm(ModelConfig(path=model_dir), strategy.device), SPEC)
    ids = torch.arange(2, 18).reshape(2, 8)

    def train_step() -> None:
        strategy.backward(trained, trained.module(input_ids=ids, labels=ids).loss)
        strategy.step(trained)

    manager = CheckpointManager(root, strategy, keep_last=2)
    train_step()
    manager.save({"policy": trained}, 1, {"step": 1})
    torch.save({k: v.clone() for k, v in trained.module.state_dict().items()}, root.parent / "weights-step-1.pt")
    train_step()

    write = strategy.save_state

    def write_then_die(model, directory):
        write(model, directory)
        os.kill(os.getpid(), signal.SIGKILL)

    strategy.save_state = write_then_die
    manager.save({"policy": trained}, 2, {"step": 2})


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
