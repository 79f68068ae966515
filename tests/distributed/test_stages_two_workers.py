"""The RM stage under ZeRO-2 and FSDP2, and PPO under ZeRO-2, with two worker processes (CPU, gloo,
tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config import RMConfig, load_config
from rlhf.logging.metrics import read_metrics
from stages import rm

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "OMP_NUM_THREADS"}
ZERO2 = ["strategy.name=deepspeed", "strategy.zero_stage=2"]


def torchrun(stage: str, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rlhf",
           stage, *overrides]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


STRATEGIES = {"zero2": ZERO2, "fsdp": ["strategy.name=fsdp"]}


def rm_overrides(quickstart_data, quickstart_models) -> list[str]:
    return [f"model.path={quickstart_models['sft']}", f"data.train.path={quickstart_data['rank']}",
            "logging.progress=false", "train.max_steps=40", "train.micro_batch_size=4", "train.global_batch_size=16",
            "train.lr=3e-4", "train.eval_every=20", "data.max_length=96", "data.max_prompt_length=48",
            "data.eval_fraction=0.02"]


@pytest.fixture(scope="module")
def rm_single(tmp_path_factory, quickstart_data, quickstart_models) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rm_single")
    result = rm.main(load_config(RMConfig, [], [*rm_overrides(quickstart_data, quickstart_models), f"output_dir={out}"]))
    return out, result.metrics


@pytest.mark.claim
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_rm_with_two_workers_matches_the_single_process(tmp_path, rm_single, quickstart_data, quickstart_models,
                                                        strategy):
    """2 accumulated micro-batches per step on each worker. Under FSDP2 the scores come from
    the root module's forward, whose unshard gathers the embeddings, final norm and head."""
    single_dir, single = rm_single
    torchrun("rm", [*rm_overrides(quickstart_data, quickstart_models), *STRATEGIES[strategy],
                    f"output_dir={tmp_path / strategy}"])
    two = json.loads((tmp_path / strategy / "model" / "rlhf_summary.json").read_text())
    assert single["eval/accuracy"] > 0.55  # above chance after 40 steps
    assert abs(two["eval/accuracy"] - single["eval/accuracy"]) <= 0.02
    losses = lambda d: [r["rm/loss"] for r in read_metrics(d) if "rm/loss" in r]  # noqa: E731
    assert losses(tmp_path / strategy) == pytest.approx(losses(single_dir), rel=1e-4)


def test_ppo_runs_under_zero2_with_two_workers(tmp_path, quickstart_data, tiny_model_dir):
    torchrun("ppo", ["--config", str(REPO / "configs" / "ppo.yaml"), f"model.path={tiny_model_dir}",
                     f"reward_model.path={tiny_model_dir}", f"data.prompts.path={quickstart_data['prompts']}",
                     f"data.eval_prompts.path={quickstart_data['prompts_eval']}",
                     f"data.pretrain.path={quickstart_data['pretrain']}", f"output_dir={tmp_path}",
                     "logging.progress=false", "ppo.iterations=2", "ppo.eval_every=1", "reward.normalize=running",
                     "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
                     "rollout.max_new_tokens=6", "eval.max_prompts=4", "ppo.ptx_coef=0.5", *ZERO2])
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2]["ppo/kl"] != 0.0 and "ppo/ptx_loss" in rows[2]
    assert (tmp_path / "model" / "model.safetensors").is_file()
