"""The DeepSpeed config built from ours, and the strategy-level config checks."""

import copy
import json

import pytest
import torch

from rlhf.config import SFTConfig, load_config
from rlhf.config_sections import StrategyConfig, TrainConfig
from rlhf.distributed.deepspeed import build_deepspeed_config, load_raw_config
from rlhf.distributed.single import SingleStrategy
from rlhf.distributed.factory import build_strategy
from rlhf.errors import ConfigError, UserError
from rlhf.distributed.optim import OptimizerSpec, build_optimizer, param_groups

SPEC = OptimizerSpec.from_train(TrainConfig(lr=3e-4, weight_decay=0.1, max_grad_norm=0.5, adam_betas=[0.9, 0.99]), 100)


def test_zero3_offload_config_from_ours():
    cfg = StrategyConfig(name="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True)
    ds = build_deepspeed_config(cfg, SPEC, micro_batch_size=4, accumulation=2, world_size=8, device_type="cpu")
    # 4 sequences x 2 accumulation steps x 8 workers
    batch = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]
    assert batch == (4, 2, 64)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "offload_param": {"device": "cpu", "pin_memory": False}}
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.99], "eps": 1e-8,
                                                           "weight_decay": 0.1, "torch_adam": True,
                                                           "fused": True}}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # fp32 on CPU


def test_gpu_config_uses_deepspeed_kernels_and_bf16(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *a, **k: True)
    cfg = StrategyConfig(name="deepspeed", zero_stage=2, offload_optimizer=True)
    ds = build_deepspeed_config(cfg, SPEC, 1, 1, 2, "cuda")
    assert ds["optimizer"]["params"]["torch_adam"] is False
    assert "fused" not in ds["optimizer"]["params"]  # DeepSpeed's FusedAdam takes no such argument
    assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    assert "offload_param" not in ds["zero_optimization"]
    assert ds["bf16"]["enabled"]


def test_raw_json_overrides_key_by_key_but_not_the_batch_geometry(tmp_path):
    raw_path = tmp_path / "ds.json"
    raw_path.write_text(json.dumps({"zero_optimization": {"overlap_comm": False}, "gradient_clipping": 2.0,
                                    "train_batch_size": 16}))
    cfg = StrategyConfig(name="deepspeed", zero_stage=2, deepspeed_config=str(raw_path))
    raw = load_raw_config(cfg.deepspeed_config)
    ds = build_deepspeed_config(cfg, SPEC, 2, 4, 2, "cpu", raw)  # 2 x 4 x 2 = 16: agrees
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert ds["gradient_clipping"] == 2.0
    with pytest.raises(ConfigError, match="train_batch_size=16.*give 8"):
        build_deepspeed_config(cfg, SPEC, 2, 2, 2, "cpu", raw)
    with pytest.raises(ConfigError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        load_raw_config(str(tmp_path / "bad.json"))


def test_offload_rules():
    base = ["data.train.path=x.jsonl", "model.path=m", "strategy.name=deepspeed"]
    with pytest.raises(ConfigError, match="offload_params needs strategy.zero_stage=3"):
        load_config(SFTConfig, [], [*base, "strategy.zero_stage=2", "strategy.offload_params=true"])
    with pytest.raises(ConfigError, match="offload_optimizer needs strategy.zero_stage 1, 2 or 3"):
        load_config(SFTConfig, [], [*base, "strategy.zero_stage=0", "strategy.offload_optimizer=true"])
    load_config(SFTConfig, [], [*base, "strategy.zero_stage=3", "strategy.offload_params=true"])


def test_global_batch_must_split_over_workers():
    strategy = SingleStrategy(StrategyConfig())
    strategy.world_size = 2  # as a two-worker engine sees it
    assert strategy.accumulation_steps(16, 4) == 2
    with pytest.raises(ConfigError, match="global_batch_size=12 must be a multiple of .* 4 x 2 = 8"):
        strategy.accumulation_steps(12, 4)


def test_single_refuses_a_multi_process_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="use strategy.name=deepspeed or strategy.name=fsdp"):
        build_strategy(StrategyConfig(name="single"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert build_strategy(StrategyConfig(name="fsdp")).name == "fsdp"
    assert build_strategy(StrategyConfig(name="deepspeed")).name == "deepspeed"


@pytest.mark.parametrize("name", ["single", "zero2", "zero3_offload", "fsdp"])
def test_strategy_presets_load(name):
    from pathlib import Path

    preset = Path(__file__).resolve().parents[2] / "configs" / "strategy" / f"{name}.yaml"
    cfg = load_config(SFTConfig, [str(preset)], ["data.train.path=x.jsonl", "model.path=m"])
    assert cfg.strategy.name == {"zero2": "deepspeed", "zero3_offload": "deepspeed"}.get(name, name)


def test_single_process_optimizer_is_fused_adamw_and_steps_like_the_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
    reference = copy.deepcopy(model)
    initial = model[0].weight.detach().clone()
    ours = build_optimizer(model, SPEC)
    assert ours.defaults["fused"] is True
    plain = torch.optim.AdamW(param_groups(reference, SPEC.weight_decay), lr=SPEC.lr, betas=SPEC.betas,
                              eps=SPEC.eps, foreach=False)
    for step in range(3):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, ours), (reference, plain)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model[0].weight, initial)


def test_default_schedule_is_linear_warmup_then_cosine_to_the_floor():
    # lr 1.0, 10 steps, warmup_ratio 0.2 -> 2 warmup steps, min_lr_ratio 0.1. By hand:
    #   warmup: step s < 2 gives s / 2                    -> 0, 0.5
    #   then:   0.1 + 0.9 * (1 + cos(pi * (s - 2) / 8)) / 2 -> 1.0 at s=2, 0.55 at s=6, 0.1 at s=10
    from rlhf.distributed.optim import build_scheduler

    spec = OptimizerSpec.from_train(TrainConfig(lr=1.0, warmup_ratio=0.2, min_lr_ratio=0.1), 10)
    assert (spec.scheduler, spec.warmup_steps) == ("cosine", 2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    scheduler = build_scheduler(optimizer, spec)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert lrs[6] == pytest.approx(0.55) and lrs[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # falls monotonically after the warmup


def test_a_step_clips_the_gradient_norm_and_reports_it_unclipped():
    # The gradient below has norm 10, well above SPEC.max_grad_norm = 0.5: the optimizer must see
    # it scaled to norm 0.5, and the step reports the norm before clipping.
    strategy = SingleStrategy(StrategyConfig())
    strategy.setup(0)
    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    trained = strategy.wrap(model, SPEC)
    seen = []
    trained.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(float(model.weight.grad.norm())))
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    strategy.backward(trained, (model(x) - 1.0).pow(2).sum())  # d/dw = 2·(0 - 1)·x = -2x, norm 10
    assert strategy.step(trained) == pytest.approx(10.0)
    assert seen == [pytest.approx(SPEC.max_grad_norm)]
