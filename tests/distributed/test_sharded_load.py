"""No full model copy per rank at load (issue 24): under ZeRO-3 and FSDP2 each of the four PPO
models (actor, critic, and the frozen reference and reward model) is built sharded, so each of 2
ranks stores about half of its parameters, and the sharded models give the outputs of the same
models loaded whole in one process: the rotary buffers (in no checkpoint), the tied head and
the new scalar head (seeded) included. ~30 s per strategy on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.config_sections import ModelConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from _sharded_load import SEED, outputs  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "OMP_NUM_THREADS"}
ROLES = ("actor", "critic", "reference", "reward")


@pytest.fixture(scope="module")
def whole_outputs(tiny_model_dir) -> dict[str, torch.Tensor]:
    """Each role's outputs with its model loaded whole in this process."""
    from rlhf.models.loading import load_causal_lm
    from rlhf.models.reward import load_scalar_model

    cfg, cpu = ModelConfig(path=str(tiny_model_dir)), torch.device("cpu")
    lm, scalar = load_causal_lm(cfg, cpu).eval(), load_scalar_model(cfg, cpu, seed=SEED).eval()
    return {"actor": outputs("actor", lm), "reference": outputs("reference", lm),
            "critic": outputs("critic", scalar), "reward": outputs("reward", scalar)}


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_each_rank_stores_half_of_every_model_and_the_outputs_are_the_whole_models(
        strategy, tiny_model_dir, whole_outputs, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "_sharded_load.py"), strategy, str(tiny_model_dir), str(tmp_path)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{strategy} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["placement"] == {"zero3": "zero3", "fsdp": "meta"}[strategy]
    for role in ROLES:
        full = ranks[0][role]["elements"][1]
        stored = [rank[role]["elements"][0] for rank in ranks]
        # Each rank's share of every model: half, up to the padding of odd-sized tensors.
        assert all(0.45 * full <= part <= 0.55 * full for part in stored), (role, stored, full)
        for rank in ranks:
            torch.testing.assert_close(rank[role]["outputs"], whole_outputs[role], rtol=0, atol=0, msg=role)
    if strategy == "fsdp":
        assert all(rank["tied"] for rank in ranks)
