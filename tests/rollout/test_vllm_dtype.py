"""rollout.vllm.dtype=auto: one rule for the colocated engine and the engine actors (the
strategy's resolved compute precision, else the parameters' dtype), the CPU's bf16 decision
included. No vLLM needed: the rule is plain torch."""

from __future__ import annotations

import pytest
import torch

from rlhf.config_sections import StrategyConfig
from rlhf.distributed import precision
from rlhf.distributed.single import SingleStrategy
from rlhf.rollout.vllm_dtype import engine_dtype, strategy_engine_dtype


def test_explicit_dtype_wins_then_mixed_precision_then_the_weights():
    assert engine_dtype("float16", "bf16", torch.float32) == torch.float16
    assert engine_dtype("auto", "bf16", torch.float32) == torch.bfloat16  # fp32 master weights under autocast
    assert engine_dtype("auto", "fp16", torch.float32) == torch.float16
    assert engine_dtype("auto", "no", torch.float32) == torch.float32
    assert engine_dtype("auto", "no", torch.bfloat16) == torch.bfloat16  # a bf16-loaded model without autocast


@pytest.mark.parametrize("override, expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_on_the_cpu_follows_the_bf16_probe_and_its_override(monkeypatch, override, expected):
    # A CPU with native bf16 products, so that only RLHF_CPU_BF16 decides (nothing is timed).
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda cpuinfo=None: ("amx_bf16",))
    monkeypatch.setenv(precision.ENV, override)
    precision._probe.cache_clear()
    try:
        strategy = SingleStrategy(StrategyConfig(mixed_precision="auto"))
        strategy.setup(0)
        model = torch.nn.Linear(4, 4)  # fp32 parameters, as the trainer keeps them
        assert strategy.precision == ("bf16" if override == "1" else "no")
        assert strategy_engine_dtype("auto", strategy, model) == expected
        # The same rule before setup (resolved from the config), as the engine actors' driver may ask.
        del strategy.precision
        assert strategy_engine_dtype("auto", strategy, model) == expected
    finally:
        precision._probe.cache_clear()
