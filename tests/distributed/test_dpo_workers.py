"""DPO with two worker processes (torchrun, CPU, gloo) under FSDP2, ZeRO-2 and ZeRO-3 gives the
single process's numbers: every step's loss, accuracy, margin and log-probs, the held-out
metrics and the gold reward of sampled answers. Tiny model, fp32, 4 optimizer steps of 8
prompts (micro 2 x accumulation 2 x 2 workers; accumulation 4 in the single process).
ZeRO-2 takes its reference log-probs precomputed (each worker scores a share, joined over
the workers), the others forward the live reference beside the policy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from child_runs import child_env
from rlhf.config import DPOConfig, load_config
from rlhf.logging.metrics import read_metrics
from stages import dpo

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[2]
ENGINES = {
    "fsdp": ["strategy.name=fsdp"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2", "reference.precompute=true"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    # The reference sharded like the policy, its log-probs precomputed: each worker scores a
    # share of the micro-batches, and every worker must run as many forwards (collectives).
    "fsdp_precompute": ["strategy.name=fsdp", "reference.precompute=true"],
}
COMPARED = ("dpo/loss", "dpo/accuracy", "dpo/margin", "dpo/chosen_logps", "dpo/rejected_logps", "dpo/grad_norm",
            "eval/loss", "eval/accuracy", "eval/margin", "eval/chosen_logps", "eval/gold_reward")
REL, ABS = 1e-4, 1e-5
CONFIG = str(REPO / "configs" / "dpo.yaml")


def overrides(data: dict, model: Path, rank_file: Path, out: Path) -> list[str]:
    # 6 held-out prompts in micro-batches of 2: 3 batches, which 2 workers share unevenly.
    return [f"model.path={model}", f"data.train.path={rank_file}",
            f"output_dir={out}", "logging.progress=false", "train.max_steps=4", "train.eval_every=2",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=1e-3", "train.warmup_ratio=0",
            "data.eval_fraction=0.075", f"eval.prompts.path={data['prompts_eval']}", "eval.max_prompts=4",
            "eval.samples_per_prompt=2", "eval.max_new_tokens=8"]


@pytest.fixture(scope="module")
def rank_file(tmp_path_factory, quickstart_data) -> Path:
    path = tmp_path_factory.mktemp("dpo_workers") / "rank.jsonl"
    path.write_text("\n".join(Path(quickstart_data["rank"]).read_text().splitlines()[:80]) + "\n")
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, quickstart_data, tiny_model_dir, rank_file) -> Path:
    out = tmp_path_factory.mktemp("dpo_single")
    args = overrides(quickstart_data, tiny_model_dir, rank_file, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two workers
    try:
        dpo.main(load_config(DPOConfig, [CONFIG], args))
    finally:
        torch.set_num_threads(threads)
    return out


def by_step(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(run_dir)}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_workers_match_the_single_process(tmp_path, engine, single, quickstart_data, tiny_model_dir, rank_file):
    out = tmp_path / engine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rlhf", "dpo",
           "--config", CONFIG, *overrides(quickstart_data, tiny_model_dir, rank_file, out), *ENGINES[engine]]
    env = child_env(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{engine} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    one, two = by_step(single), by_step(out)
    assert sorted(two) == sorted(one) == [0, 1, 2, 3, 4]
    compared = 0
    for step, row in one.items():
        for key in COMPARED:
            if key in row:
                assert two[step][key] == pytest.approx(row[key], rel=REL, abs=ABS), f"step {step}: {key}"
                compared += 1
    assert compared == 6 * 4 + 5 * 3  # 6 training metrics at 4 steps, 5 eval metrics at steps 0, 2, 4
    assert one[4]["eval/reward_chosen"] != 0.0  # the policy moved: the comparison is not of a frozen model
    summary = json.loads((out / "model" / "rlhf_summary.json").read_text())
    assert summary["eval/loss"] == pytest.approx(one[4]["eval/loss"], rel=REL)
    assert (out / "model" / "model.safetensors").is_file()
