"""Tiny SFT, RM and PPO runs with every tracker on, shared by the logging tests.

The runs happen once per session with W&B offline, every W&B directory in tmp, two
secret-looking environment variables set to unique values, and `socket.connect` patched to
record any connection that is not to loopback (W&B talks to its local service process over
loopback or a Unix socket)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
from logging_helpers import SECRETS

REPO = Path(__file__).resolve().parents[2]


def _loopback(address) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX path
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _subset(source: str, target: Path, rows: int) -> str:
    lines = Path(source).read_text(encoding="utf-8").splitlines()[:rows]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(target)


@pytest.fixture(scope="session")
def logged_runs(tmp_path_factory, quickstart_data, tiny_model_dir) -> dict:
    """{"sft", "rm", "ppo": run dirs, "connections": non-loopback connects attempted}."""
    from rlhf.config import PPOConfig, RMConfig, SFTConfig, load_config
    from stages import ppo, rm, sft

    root = tmp_path_factory.mktemp("logged")
    attempts: list = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if not _loopback(address):
            attempts.append(address)
            raise OSError(f"test forbids network: {address}")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _loopback(address):
            attempts.append(address)
            return 111
        return real_connect_ex(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        mp.setenv("WANDB_MODE", "offline")
        for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(root / "wandb_home" / name.lower()))
        for name, value in SECRETS.items():
            mp.setenv(name, value)
        both = "logging.backends=[wandb,tensorboard]"
        common = ["logging.progress=false", f"model.path={tiny_model_dir}"]

        sft_cfg = load_config(SFTConfig, [], [
            *common, f"data.train.path={_subset(quickstart_data['sft'], root / 'sft.jsonl', 200)}",
            f"output_dir={root / 'sft'}", "train.max_steps=4", "train.eval_every=2", "train.micro_batch_size=8",
            "train.global_batch_size=8", "data.max_length=96", "data.max_prompt_length=48", "data.eval_fraction=0.1",
            both, "logging.group=pipeline-test"])
        sft.main(sft_cfg)

        rm_cfg = load_config(RMConfig, [], [
            *common, f"data.train.path={_subset(quickstart_data['rank'], root / 'rank.jsonl', 120)}",
            f"output_dir={root / 'rm'}", "train.max_steps=3", "train.eval_every=2", "train.micro_batch_size=4",
            "train.global_batch_size=4", "data.max_length=96", "data.max_prompt_length=48",
            "logging.backends=[tensorboard]"])
        rm.main(rm_cfg)

        ppo_cfg = load_config(PPOConfig, [str(REPO / "configs" / "ppo.yaml")], [
            *common, f"reward_model.path={tiny_model_dir}", f"data.prompts.path={quickstart_data['prompts']}",
            f"data.eval_prompts.path={quickstart_data['prompts_eval']}", f"output_dir={root / 'ppo'}",
            "ppo.iterations=2", "ppo.eval_every=1", "ppo.sample_every=1", "reward.normalize=running",
            "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=4", "rollout.max_new_tokens=6",
            "eval.max_prompts=4", "eval.samples_per_prompt=1", both])
        ppo.main(ppo_cfg)
    return {"sft": root / "sft", "rm": root / "rm", "ppo": root / "ppo", "connections": attempts}
