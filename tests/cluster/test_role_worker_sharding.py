"""PPO role groups (`ppo.colocate` a list): a frozen role's workers form their own process
group where the strategy shards weights, so the reference and the reward model are sharded
over them instead of whole on each worker. Checked on the plain RoleWorker class (what each
Ray actor runs) in 2 processes on gloo, under FSDP2: each worker holds about half of the
frozen model, and the two workers' scores of a rollout equal the whole model's."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rlhf.config import PPOConfig, load_config

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[2]
ROLES = ("reference", "reward")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _overrides(models: dict) -> list[str]:
    return [f"model.path={models['sft']}", f"reward_model.path={models['rm']}", "ray.enabled=true",
            "resources.workers_per_node=2", "strategy.name=fsdp", "ppo.rollout_batch_size=8",
            "ppo.mini_batch_size=4", "ppo.micro_batch_size=2", "ppo.colocate=[[actor,reference],[critic,reward]]"]


def _worker(rank: int, port: int, overrides: list[str], rollout, out: str) -> None:
    torch.set_num_threads(1)
    from rlhf.models.engines import unwrap_engine
    from rlhf.ray.role_worker import RoleWorker

    cfg = load_config(PPOConfig, [str(REPO / "configs" / "ppo.yaml")], overrides)
    result = {}
    for role in ROLES:
        worker = RoleWorker(role, cfg, rank, 2, rank, 2, str(REPO))
        worker.setup("127.0.0.1", port if role == "reference" else port + 1)
        module = unwrap_engine(worker.model.model)
        held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in module.parameters())
        total = sum(p.numel() for p in module.parameters())
        mine = rollout.select(torch.arange(rank * 2, rank * 2 + 2 + rank))  # 2 rows, then 3: uneven pieces
        scores = worker.logprobs(mine) if role == "reference" else worker.scores(mine)
        result[role] = {"held": held, "total": total, "scores": scores.tolist()}
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def test_frozen_role_groups_are_sharded_and_score_as_the_whole_model(tmp_path, quickstart_models, quickstart_data):
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.models.reward import load_scalar_model, sequence_scores
    from rlhf.roles.roles import Reference, RewardModel
    from rlhf.rollout.decode import DecodeEngine
    from rlhf.rollout.engine import SamplingParams

    cfg = load_config(PPOConfig, [str(REPO / "configs" / "ppo.yaml")], _overrides(quickstart_models))
    tokenizer = load_tokenizer(cfg.model)
    cpu = torch.device("cpu")
    actor = load_causal_lm(cfg.model, cpu)
    prompts = [tokenizer(f"{a} + {b} =")["input_ids"] for a, b in ((1, 2), (3, 4), (5, 6), (2, 2), (4, 1))]
    engine = DecodeEngine(actor, tokenizer.eos_token_id, tokenizer.pad_token_id, 8)
    torch.manual_seed(0)
    rollout = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0))

    whole = {"reference": Reference(load_causal_lm(cfg.model, cpu), 1.0).logprobs(rollout)}
    from rlhf.roles.build import reward_stats_for
    whole["reward"] = RewardModel(load_scalar_model(cfg.reward_model, cpu), reward_stats_for(cfg)).scores(rollout)

    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(_worker, args=(_free_port(), _overrides(quickstart_models), rollout, str(tmp_path)), nprocs=2, join=True)
    finally:
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for role in ROLES:
        for got in ranks:
            assert 0.4 < got[role]["held"] / got[role]["total"] < 0.6, (role, got[role]["held"], got[role]["total"])
        sharded = torch.tensor(ranks[0][role]["scores"] + ranks[1][role]["scores"])
        assert torch.allclose(sharded, whole[role].float(), rtol=1e-5, atol=1e-5), role
