"""Defaults that depend on where a run computes: rollout.reuse_logprobs is on only where the
actor's forwards are fp32 (the sampler's log-probs then equal the training forward's up to
~1e-6, so the PPO ratio starts at 1), off under bf16/fp16, and an explicit true there is refused."""

from pathlib import Path

import pytest

from rlhf.config import PipelineConfig, PPOConfig, load_config, resolve_reuse_logprobs, worker_devices
from rlhf.config_sections import ModelConfig, RayConfig, ResourcesConfig, StrategyConfig, forward_precision
from rlhf.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PPO = [str(REPO / "configs" / "ppo.yaml")]
PATHS = ["model.path=m", "reward_model.path=r", "data.prompts.path=p.jsonl"]
CPU, GPU, OLD_GPU = ("cpu", False), ("cuda", True), ("cuda", False)
BF16_CPU = ("cpu", True)  # a CPU whose bf16 probe picked bf16 for auto


def ppo(*overrides: str) -> PPOConfig:
    return load_config(PPOConfig, PPO, [*PATHS, *overrides])


@pytest.mark.parametrize("strategy, mixed, dtype, device, expected", [
    # The defaults: fp32 on CPU, bf16 on a GPU with bf16, fp32 on one without, for every engine.
    ("single", "auto", "auto", CPU, "fp32"), ("deepspeed", "auto", "auto", CPU, "fp32"),
    ("fsdp", "auto", "auto", CPU, "fp32"),
    ("single", "auto", "auto", GPU, "bf16"), ("deepspeed", "auto", "auto", GPU, "bf16"),
    ("fsdp", "auto", "auto", GPU, "bf16"),
    ("deepspeed", "auto", "auto", OLD_GPU, "fp32"),
    # A CPU with fast bf16 products: auto computes in bf16 on fp32 weights, for every engine.
    ("single", "auto", "auto", BF16_CPU, "bf16"), ("deepspeed", "auto", "auto", BF16_CPU, "bf16"),
    ("fsdp", "auto", "auto", BF16_CPU, "bf16"), ("single", "no", "auto", BF16_CPU, "fp32"),
    # fp32 weights under mixed precision compute in its dtype on any device: DeepSpeed casts
    # the module, FSDP2 gathers param_dtype, the single strategy runs autocast.
    ("deepspeed", "bf16", "float32", CPU, "bf16"), ("deepspeed", "fp16", "float32", GPU, "fp16"),
    ("fsdp", "bf16", "float32", CPU, "bf16"), ("fsdp", "bf16", "float32", GPU, "bf16"),
    ("single", "bf16", "float32", GPU, "bf16"), ("single", "bf16", "float32", CPU, "bf16"),
    # Low-precision weights without mixed precision compute in their own dtype.
    ("single", "no", "bfloat16", CPU, "bf16"), ("deepspeed", "no", "float16", GPU, "fp16"),
    ("fsdp", "no", "bfloat16", CPU, "bf16"),
    # Pinned to fp32 on a GPU.
    ("fsdp", "no", "float32", GPU, "fp32"), ("deepspeed", "no", "float32", GPU, "fp32"),
])
def test_forward_precision_follows_loading_and_the_engines(strategy, mixed, dtype, device, expected):
    got = forward_precision(StrategyConfig(name=strategy, mixed_precision=mixed), ModelConfig(dtype=dtype), *device)
    assert got == expected


def test_cpu_defaults_keep_reusing_the_samplers_logprobs():
    # This machine has no GPU and the suite pins auto to fp32 on the CPU (RLHF_CPU_BF16=0,
    # tests/conftest.py): the shipped PPO config resolves auto to on.
    for strategy in ("single", "deepspeed", "fsdp"):
        cfg = ppo(f"strategy.name={strategy}")
        assert cfg.rollout.reuse_logprobs is True  # a bool: roles read it as one


def test_auto_follows_a_cpu_where_auto_computes_in_bf16(monkeypatch):
    from rlhf.distributed.precision import cpu_bf16_flags

    monkeypatch.setenv("RLHF_CPU_BF16", "1")  # bf16 wherever the instructions exist, untimed
    for strategy in ("single", "deepspeed", "fsdp"):
        # Off where this CPU has bf16 instructions (its forwards are then bf16), on where not.
        assert ppo(f"strategy.name={strategy}").rollout.reuse_logprobs is not bool(cpu_bf16_flags())
        assert ppo(f"strategy.name={strategy}", "strategy.mixed_precision=no").rollout.reuse_logprobs is True


@pytest.mark.parametrize("overrides", [
    ["strategy.name=deepspeed", "strategy.mixed_precision=bf16"],
    ["model.dtype=bfloat16"],
    ["strategy.name=deepspeed", "strategy.mixed_precision=fp16", "model.dtype=float32"],
])
def test_low_precision_on_this_cpu_turns_auto_off_and_refuses_true(overrides):
    assert ppo(*overrides).rollout.reuse_logprobs is False
    assert ppo(*overrides, "rollout.reuse_logprobs=false").rollout.reuse_logprobs is False
    with pytest.raises(ConfigError, match=r"rollout.reuse_logprobs=true: the actor's forwards run in (bf16|fp16)"):
        ppo(*overrides, "rollout.reuse_logprobs=true")


def test_on_a_bf16_gpu_auto_is_off_unless_everything_is_pinned_to_fp32():
    for strategy in ("single", "deepspeed", "fsdp"):
        cfg = ppo(f"strategy.name={strategy}")  # resolved for this CPU; ask again for a GPU worker
        cfg.rollout.reuse_logprobs = "auto"
        assert resolve_reuse_logprobs(cfg, [GPU]) is False
        cfg.rollout.reuse_logprobs = True
        with pytest.raises(ConfigError, match=r"run in bf16 \(strategy.name=" + strategy):
            resolve_reuse_logprobs(cfg, [GPU])
        cfg.strategy.mixed_precision, cfg.model.dtype = "no", "float32"
        assert resolve_reuse_logprobs(cfg, [GPU]) is True
        cfg.rollout.reuse_logprobs = "auto"
        assert resolve_reuse_logprobs(cfg, [GPU]) is True


def test_workers_whose_device_is_unknown_get_auto_off():
    cfg = ppo()
    cfg.rollout.reuse_logprobs = "auto"
    assert resolve_reuse_logprobs(cfg, [GPU, OLD_GPU, CPU]) is False
    cfg.rollout.reuse_logprobs = True
    with pytest.raises(ConfigError, match="may not run in fp32 on the workers"):
        resolve_reuse_logprobs(cfg, [GPU, OLD_GPU, CPU])


def test_worker_devices_as_far_as_the_config_can_tell():
    remote = RayConfig(enabled=True, address="10.0.0.1:6379")
    # A remote CPU's bf16 probe may go either way.
    assert worker_devices(ResourcesConfig(gpus_per_worker=None), remote) == [GPU, OLD_GPU, CPU, BF16_CPU]
    assert worker_devices(ResourcesConfig(gpus_per_worker=1), remote) == [GPU, OLD_GPU]
    assert worker_devices(ResourcesConfig(gpus_per_worker=0), remote) == [CPU, BF16_CPU]
    assert worker_devices(ResourcesConfig(), RayConfig(enabled=True, num_gpus=0)) == [CPU]
    # No Ray, or a local one: this machine (no GPU here).
    assert worker_devices(ResourcesConfig(), RayConfig()) == [CPU]
    assert worker_devices(ResourcesConfig(gpus_per_worker=1), RayConfig(enabled=True)) == [CPU]


def test_a_remote_cluster_without_gpus_per_worker_turns_auto_off():
    assert ppo("ray.enabled=true", "ray.address=10.0.0.1:6379").rollout.reuse_logprobs is False
    # CPU workers of a remote cluster: auto may compute in bf16 there, unless pinned to fp32.
    assert ppo("ray.enabled=true", "ray.address=10.0.0.1:6379",
               "resources.gpus_per_worker=0").rollout.reuse_logprobs is False
    assert ppo("ray.enabled=true", "ray.address=10.0.0.1:6379", "resources.gpus_per_worker=0",
               "strategy.mixed_precision=no").rollout.reuse_logprobs is True


def test_other_values_are_refused():
    with pytest.raises(ConfigError, match="rollout.reuse_logprobs='sometimes' is not one of: auto, true, false"):
        ppo("rollout.reuse_logprobs=sometimes")
    with pytest.raises(ConfigError, match="rollout.gather_weights='sometimes' is not one of: auto, true, false"):
        ppo("rollout.gather_weights=sometimes")


def test_the_pipeline_hands_ppo_a_resolved_value():
    # The pipeline validates copies of its stages and runs fresh ones (`wired`): those must
    # carry a bool too, or "auto" would read as true in the roles.
    cfg = load_config(PipelineConfig, [str(REPO / "configs" / "pipeline.yaml")], [])
    assert cfg.ppo.rollout.reuse_logprobs == "auto"
    assert cfg.wired("ppo").rollout.reuse_logprobs is True
    low = load_config(PipelineConfig, [str(REPO / "configs" / "pipeline.yaml")], ["ppo.model.dtype=bfloat16"])
    assert low.wired("ppo").rollout.reuse_logprobs is False
