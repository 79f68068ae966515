"""The Ray layer's pure parts, without starting Ray: row splitting, what travels to the
workers, config rules, and the plain role worker run in this process."""

from pathlib import Path

import pytest
import torch

from rlhf.config import PPOConfig, SFTConfig, load_config
from rlhf.config_sections import RayConfig
from rlhf.errors import ConfigError
from rlhf.ray.ppo_roles import row_slices
from rlhf.ray.session import forwarded_env, runtime_env
from stages import STAGES

REPO = Path(__file__).resolve().parents[2]


def test_row_slices_cover_every_row_once_in_order():
    slices = row_slices(10, 3)
    assert [(s.start, s.stop) for s in slices] == [(0, 4), (4, 7), (7, 10)]
    assert [(s.start, s.stop) for s in row_slices(2, 2)] == [(0, 1), (1, 2)]


def test_workers_get_run_settings_but_never_secrets():
    environ = {"HF_HOME": "/cache", "HF_TOKEN": "hf_secret", "WANDB_MODE": "offline", "WANDB_API_KEY": "k",
               "NCCL_SOCKET_IFNAME": "ib0", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/root"}
    env = forwarded_env(environ, {"MY_FLAG": "1"})
    assert env == {"HF_HOME": "/cache", "WANDB_MODE": "offline", "NCCL_SOCKET_IFNAME": "ib0", "MY_FLAG": "1"}


def test_joining_a_cluster_ships_the_code_and_a_working_dir_ships_without_runs(tmp_path):
    assert "py_modules" not in runtime_env(RayConfig(), {})
    shipped = runtime_env(RayConfig(address="auto"), {}, code_dirs=STAGES["sft"].code_dirs())
    assert {Path(p).name for p in shipped["py_modules"]} == {"rlhf", "stages"}
    with_dir = runtime_env(RayConfig(address="auto", working_dir=str(tmp_path)), {})
    assert with_dir["working_dir"] == str(tmp_path) and "runs" in with_dir["excludes"]


def test_secret_like_env_vars_in_the_config_are_refused():
    with pytest.raises(ConfigError, match="WANDB_API_KEY looks like a secret"):
        load_config(SFTConfig, [str(REPO / "configs/sft.yaml")], ["ray.env_vars={WANDB_API_KEY: abc}"])


def test_batch_arithmetic_is_checked_against_the_ray_workers_before_anything_starts():
    with pytest.raises(ConfigError, match="micro_batch_size x workers = 16 x 3 = 48"):
        load_config(SFTConfig, [str(REPO / "configs/sft.yaml")], ["ray.enabled=true", "resources.workers_per_node=3"])


@pytest.mark.parametrize("colocate, message", [
    ("[[actor],[critic,reward]]", "names each of actor, critic, reference, reward exactly once"),
    ("[[actor,reference],[critic,reward,actor]]", "exactly once"),
    ("some", "use all, or a list of role groups"),
])
def test_colocation_groups_must_name_each_role_once(colocate, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, [str(REPO / "configs/ppo.yaml")], [f"ppo.colocate={colocate}", "ray.enabled=true"])


def test_role_groups_need_ray():
    with pytest.raises(ConfigError, match="set ray.enabled=true"):
        load_config(PPOConfig, [str(REPO / "configs/ppo.yaml")], ["ppo.colocate=[[actor,reference],[critic,reward]]"])


def test_role_workers_run_as_plain_objects(tmp_path, tiny_model_dir, quickstart_data):
    """The classes Ray runs as actors work in this process: generate, score, train a step."""
    from rlhf.algorithms import compute_gae
    from rlhf.ray.role_worker import RoleWorker
    from rlhf.rollout.engine import SamplingParams
    from rlhf.rollout.types import Experience
    from rlhf.training.ppo import shuffle_orders

    cfg = load_config(PPOConfig, [str(REPO / "configs/ppo.yaml")], [
        f"model.path={tiny_model_dir}", f"reward_model.path={tiny_model_dir}", "reward.normalize=none",
        f"data.prompts.path={quickstart_data['prompts']}", f"output_dir={tmp_path}", "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=4", "ppo.micro_batch_size=2", "ppo.ppo_epochs=1"])
    workers = {role: RoleWorker(role, cfg, 0, 1, 0, 1, str(REPO)) for role in ("actor", "critic", "reference", "reward")}
    for worker in workers.values():
        worker.setup("127.0.0.1", 0)
    prompts = [[5, 6, 7], [8, 9]]
    params = SamplingParams(max_new_tokens=5)
    rollout = workers["actor"].generate(prompts, params, 3, [0, 1])
    assert torch.equal(rollout.sequences, workers["actor"].generate(prompts, params, 3, [0, 1]).sequences)
    logprobs, ref_logprobs = workers["actor"].logprobs(rollout), workers["reference"].logprobs(rollout)
    assert torch.allclose(logprobs, ref_logprobs, atol=1e-5)  # same weights before any update
    values, scores = workers["critic"].values(rollout), workers["reward"].scores(rollout)
    assert values.shape == logprobs.shape and scores.shape == (2,)
    mask = rollout.response_mask
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(2), mask.sum(-1).long() - 1] = torch.tensor([1.0, -1.0])
    advantages, returns = compute_gae(rewards, values * mask, mask, 1.0, 0.95)
    experience = Experience(rollout, logprobs, ref_logprobs, values, rewards, advantages, returns, scores)
    orders = shuffle_orders(torch.Generator().manual_seed(0), 1, 2)
    before = workers["actor"].logprobs(rollout)
    metrics = workers["actor"].update(experience, orders, 0.0, 0)
    assert metrics["ppo/actor_grad_norm"] > 0
    assert not torch.allclose(workers["actor"].logprobs(rollout), before)
    assert workers["critic"].update(experience, orders, 0.0, 0)["ppo/value_loss"] > 0
