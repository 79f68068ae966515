from pathlib import Path

import pytest

from rlhf.config import SFTConfig, describe, load_config, save_config
from rlhf.errors import ConfigError

BASE = ["model.path=some/model", "data.train.path=train.jsonl"]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_overrides_later_wins(tmp_path):
    path = write(tmp_path, "model:\n  path: a\ndata:\n  train:\n    path: t.jsonl\ntrain:\n  lr: 0.1\n")
    cfg = load_config(SFTConfig, [path], ["train.lr=0.5", "data.train.columns.prompt=question"])
    assert cfg.train.lr == 0.5
    assert cfg.model.path == "a"
    assert cfg.data.train.columns == {"prompt": "question"}
    assert isinstance(cfg, SFTConfig)


def test_unknown_key_in_file_names_file_line_and_valid_keys(tmp_path):
    path = write(tmp_path, "model:\n  path: a\ntrain:\n  lr: 0.1\n  lrr: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, [path], [])
    message = str(err.value)
    assert f"{path}:5" in message
    assert "unknown key 'train.lrr'" in message
    assert "micro_batch_size" in message and "warmup_ratio" in message


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"override 'data.colums=1'.*unknown key 'data.colums'.*max_length"):
        load_config(SFTConfig, [], BASE + ["data.colums=1"])


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:2: key 'train.epochs'"):
        load_config(SFTConfig, [path], [])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(SFTConfig, [], BASE + ["data.max_length=64", "data.max_prompt_length=64"])
    with pytest.raises(ConfigError, match="global_batch_size=10 is not a multiple"):
        load_config(SFTConfig, [], BASE + ["train.micro_batch_size=4", "train.global_batch_size=10"])
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config(SFTConfig, [], ["data.train.path=x"])
    with pytest.raises(ConfigError, match="strategy.name='ddp' is not one of"):
        load_config(SFTConfig, [], BASE + ["strategy.name=ddp"])
    with pytest.raises(ConfigError, match="data.group_by_length groups padded rows: set data.padding_free=false"):
        load_config(SFTConfig, [], BASE + ["data.group_by_length=true"])
    assert load_config(SFTConfig, [], BASE + ["data.group_by_length=true", "data.padding_free=false"]).data.group_by_length


def test_tiny_model_enabled_from_an_override():
    cfg = load_config(SFTConfig, [], ["data.train.path=x", "model.tiny={}", "model.tiny.hidden_size=32"])
    assert cfg.model.tiny.hidden_size == 32 and cfg.model.tiny.num_layers == 2


def test_missing_config_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, [str(tmp_path / "nope.yaml")], [])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(SFTConfig, [], BASE + ["train.lr"])


def test_saved_config_reloads_to_the_same_object(tmp_path):
    cfg = load_config(SFTConfig, [], BASE + ["train.lr=0.25", "seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(SFTConfig, [str(tmp_path / "config.yaml")], []) == cfg


def test_describe_documents_fields():
    lines = "\n".join(describe(SFTConfig))
    assert "train.global_batch_size = 16  # Sequences per optimizer step" in lines
    assert "data.train.path = ''" in lines


PPO = [str(Path(__file__).resolve().parents[1] / "configs" / "ppo.yaml")]


@pytest.mark.parametrize("overrides, message", [
    (["kl.in_loss=true", "kl.estimator=k1"], "kl.in_loss=true with kl.estimator=k1 adds no KL penalty"),
    (["kl.in_loss=true", "kl.estimator=k3", "kl.coef=0"], "kl.in_loss=true with kl.coef=0 adds nothing"),
    (["ppo.loss_aggregation=mean"], "ppo.loss_aggregation='mean' is not one of"),
    (["ppo.dual_clip=1.0"], "ppo.dual_clip=1.0: must be > 1"),
])
def test_ppo_settings_that_do_not_do_what_they_say_are_refused(overrides, message):
    from rlhf.config import PPOConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(PPOConfig, PPO, ["model.path=m", "reward_model.path=r", "data.prompts.path=p.jsonl", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["rollout.vllm.logprobs=engine", "rollout.top_k=20"], "rollout.vllm.logprobs=engine with rollout.top_k=20"),
    (["rollout.reuse_logprobs=true"], "rollout.reuse_logprobs=true with rollout.engine=vllm"),
    (["rollout.vllm.tensor_parallel_size=2"], "tensor_parallel_size=2 with placement=colocate"),
    (["rollout.temperature=2.5"], "rollout.temperature=2.5 with rollout.engine=vllm"),
    (["rollout.vllm.gpu_memory_utilization=1.5"], "gpu_memory_utilization=1.5 must be in"),
    (["rollout.vllm.placement=remote"], "rollout.vllm.placement='remote' is not one of"),
    (["rollout.vllm.tis_cap=0.5"], "tis_cap=0.5 must be >= 1"),
])
def test_vllm_settings_it_cannot_honour_are_refused(overrides, message):
    from rlhf.config import PPOConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(PPOConfig, PPO, ["model.path=m", "reward_model.path=r", "data.prompts.path=p.jsonl",
                                     "rollout.engine=vllm", *overrides])


def test_vllm_engine_recomputes_old_logprobs_by_default():
    from rlhf.config import PPOConfig
    from rlhf.roles.build import tis_cap

    paths = ["model.path=m", "reward_model.path=r", "data.prompts.path=p.jsonl", "rollout.engine=vllm"]
    cfg = load_config(PPOConfig, PPO, paths)
    assert cfg.rollout.reuse_logprobs is False and tis_cap(cfg) is None  # fp32 on CPU would reuse with decode
    assert tis_cap(load_config(PPOConfig, PPO, [*paths, "rollout.vllm.logprobs=engine", "rollout.vllm.tis_cap=3"])) == 3


def test_k2_and_k3_in_the_loss_and_the_aggregations_load():
    from rlhf.config import PPOConfig

    for overrides in (["kl.in_loss=true", "kl.estimator=k2"], ["kl.in_loss=true", "kl.estimator=k3"],
                      ["ppo.loss_aggregation=seq_mean_token_sum_norm", "ppo.dual_clip=3.0"]):
        load_config(PPOConfig, PPO, ["model.path=m", "reward_model.path=r", "data.prompts.path=p.jsonl", *overrides])


def test_kernels_section_is_in_every_stage_config_and_in_the_saved_yaml(tmp_path):
    cfg = load_config(SFTConfig, [], [*BASE, "kernels.cpu_matmul=blas", "kernels.fused_lm_loss=false"])
    assert (cfg.kernels.cpu_matmul, cfg.kernels.fused_lm_loss) == ("blas", False)
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "kernels:" in text and "cpu_matmul: blas" in text
    with pytest.raises(ConfigError, match="kernels.cpu_matmul='fast' is not one of"):
        load_config(SFTConfig, [], [*BASE, "kernels.cpu_matmul=fast"])


@pytest.mark.parametrize("overrides, message", [
    (["resources.gpus_per_worker=0.5"], "a worker takes whole GPUs"),
    (["ray.enabled=true", "resources.gpus_per_worker=2", "ppo.colocate=[[actor,reference,critic],[reward]]"],
     "shared by 3 colocated roles"),
])
def test_gpu_shares_ray_cannot_place_on_distinct_devices_are_refused_when_the_config_is_read(overrides, message):
    from rlhf.config import PPOConfig

    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, [str(Path(__file__).resolve().parents[1] / "configs" / "ppo.yaml")], overrides)
    # Whole GPUs per role are fine: 2 GPUs for a group of 2 roles, 1 each.
    load_config(PPOConfig, [str(Path(__file__).resolve().parents[1] / "configs" / "ppo.yaml")],
                ["ray.enabled=true", "resources.gpus_per_worker=2", "ppo.colocate=[[actor,reference],[critic,reward]]"])
