"""strategy.mixed_precision: what `auto` picks on a CPU (instructions, then a timing, cached per
process, overridable), and the single strategy's bf16 mixed precision: fp32 master weights and
AdamW states, bf16 products, frozen models alike; workers that resolve differently stop."""

from __future__ import annotations

import pytest
import torch

from rlhf.config_sections import StrategyConfig
from rlhf.distributed import precision
from rlhf.distributed.precision import decide
from rlhf.errors import UserError

FLAGS = ("avx512_bf16",)


@pytest.mark.parametrize("flags, fp32_s, bf16_s, override, expected", [
    ((), 1.0, 0.1, "", False),  # no bf16 instructions: emulated, never picked, however timed
    ((), None, None, "1", False),  # the override does not make emulated bf16 fast
    (FLAGS, 1.0, 0.5, "", True),  # 2x as fast (the Zen 5 machine)
    (("amx_bf16",), 1.0, 0.15, "", True),  # AMX: ~7x
    (FLAGS, 1.0, 0.95, "", False),  # within the margin: timing noise must not flip runs
    (FLAGS, 1.0, 1.3, "", False),  # the casts cost more than the products gain
    (FLAGS, 1.0, 0.5, "0", False),  # pinned to fp32
    (FLAGS, None, None, "1", True),  # pinned to bf16 where the instructions exist
])
def test_auto_picks_bf16_only_with_the_instructions_and_a_faster_timing(flags, fp32_s, bf16_s, override, expected):
    decision = decide(flags, fp32_s, bf16_s, override)
    assert decision.bf16 is expected and decision.reason


def test_the_flags_come_from_cpuinfo():
    info = "processor : 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    assert precision.cpu_bf16_flags(info) == ("avx512_bf16", "amx_bf16")
    assert precision.cpu_bf16_flags("flags : fpu avx2 fma\n") == ()


def test_the_probe_runs_once_per_process_and_the_override_skips_it(monkeypatch):
    timings = []
    monkeypatch.delenv("RLHF_CPU_BF16", raising=False)  # the suite pins it; here the probe decides
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: FLAGS)
    monkeypatch.setattr(precision, "time_layer", lambda shape: timings.append(1) or (1.0, 0.4))
    precision._probe.cache_clear()
    try:
        first = precision.cpu_bf16_probe({})
        assert precision.cpu_bf16_probe({}) is first and timings == [1]
        assert first.bf16 and first.bf16_gflops > first.fp32_gflops
        assert precision.resolve_precision("auto", torch.device("cpu")) == "bf16"
        # The run's log line names the decision and the timing.
        line = precision.describe("auto", "bf16", torch.device("cpu"))
        assert line.startswith("bf16 compute, fp32 master weights") and "bf16 2.50x as fast as fp32" in line
        assert not precision.cpu_bf16_probe({"RLHF_CPU_BF16": "0"}).bf16 and timings == [1]
    finally:
        precision._probe.cache_clear()
    assert precision.resolve_precision("no", torch.device("cpu")) == "no"
    assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_auto_probes_at_the_models_own_width_once_per_shape(monkeypatch):
    """The quickstart's hidden-64 model trained slower in bf16 than in fp32 while a SmolLM2-wide
    layer ran faster: `auto` decides per model, from a timing of a layer of that model's shape
    (stubbed here: bf16 loses below hidden 256, wins above)."""
    from rlhf.config import SFTConfig, load_config
    from rlhf.distributed.factory import build_strategy

    timed = []

    def timer(shape):
        timed.append(shape)
        return (1.0, 1.25) if shape.hidden < 256 else (1.0, 0.5)

    monkeypatch.delenv("RLHF_CPU_BF16", raising=False)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: FLAGS)
    monkeypatch.setattr(precision, "time_layer", timer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision._probe.cache_clear()
    try:
        tiny = load_config(SFTConfig, overrides=["model.tiny.hidden_size=64", "model.tiny.intermediate_size=256",
                                                 "train.micro_batch_size=2", "data.max_length=128", "data.max_prompt_length=64",
                                                 "data.train.path=x"])
        shape = precision.probe_shape(tiny)
        assert shape == precision.ProbeShape(64, 256, 2 * 128, heads=4, kv_heads=4, vocab=512)
        tiny.train.micro_batch_size = 64  # 8192 tokens: clamped, the probe stays short
        assert precision.probe_shape(tiny).tokens == precision.TOKENS[1]
        cpu = torch.device("cpu")
        assert precision.resolve_precision("auto", cpu, shape) == "no"
        assert precision.resolve_precision("auto", cpu) == "bf16"  # no model known: SmolLM2's width
        assert precision.resolve_precision("auto", cpu, shape) == "no" and timed == [shape, precision.SMOLLM2]
        strategy = build_strategy(tiny.strategy, shape)
        strategy.setup(seed=0)
        assert strategy.compute_dtype is None and timed == [shape, precision.SMOLLM2]
        line = precision.describe("auto", "no", cpu, shape)
        assert "only 0.80x as fast" in line and "one layer of 64x256 and the head over 256 tokens" in line
        # Pinned, or not auto: nothing is read or timed.
        assert precision.probe_shape(tiny, {"RLHF_CPU_BF16": "0"}) is None
        tiny.strategy.mixed_precision = "no"
        assert precision.probe_shape(tiny) is None
    finally:
        precision._probe.cache_clear()


def test_the_probe_reads_a_model_config_from_disk_only(monkeypatch):
    """Validating a pipeline config probes its PPO stage, whose model is a placeholder until SFT
    has run: offline, asking the hub about it cost half a minute of retries."""
    import transformers

    from rlhf.config import SFTConfig, load_config

    asked = []

    def from_pretrained(location, **kwargs):
        asked.append((location, kwargs.get("local_files_only")))
        raise OSError(f"{location} is not in the local cache")

    monkeypatch.delenv("RLHF_CPU_BF16", raising=False)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: FLAGS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    cfg = load_config(SFTConfig, overrides=["model.path=org/not-cached", "data.train.path=x",
                                            "strategy.mixed_precision=no"])
    cfg.strategy.mixed_precision = "auto"
    assert precision.probe_shape(cfg) == precision.SMOLLM2
    assert asked == [("org/not-cached", True)]


def test_the_layer_timing_runs_bf16_products_under_autocast():
    fp32_s, bf16_s = precision.time_layer(precision.ProbeShape(32, 64, 16, heads=2, kv_heads=1, vocab=64), rounds=1)
    assert fp32_s > 0 and bf16_s > 0


def _tiny(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype)


class _ProductDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.dtypes.add(args[0].dtype if func.overloadpacket is not torch.ops.aten.addmm else args[1].dtype)
        return func(*args, **(kwargs or {}))


def test_single_strategy_trains_fp32_master_weights_with_bf16_products():
    from rlhf.distributed.optim import OptimizerSpec
    from rlhf.distributed.single import SingleStrategy

    spec = OptimizerSpec(lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0,
                         scheduler="constant", warmup_steps=0, total_steps=1, min_lr_ratio=0.0)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name in ("no", "bf16"):
        strategy = SingleStrategy(StrategyConfig(mixed_precision=name))
        strategy.setup(seed=0)
        trained = strategy.wrap(_tiny(torch.bfloat16 if name == "bf16" else torch.float32), spec)
        module = trained.module
        assert all(p.dtype == torch.float32 for p in module.parameters())  # a bf16 load is upcast
        before = module.model.layers[0].mlp.up_proj.weight.detach().clone()
        products = _ProductDtypes()
        with products:
            loss = module(input_ids=ids, labels=ids).loss
        assert products.dtypes == ({torch.bfloat16} if name == "bf16" else {torch.float32})
        assert loss.dtype == torch.float32
        strategy.backward(trained, loss)
        assert all(p.grad.dtype == torch.float32 for p in module.parameters() if p.grad is not None)
        strategy.step(trained)
        state = trained.optimizer.state[module.model.layers[0].mlp.up_proj.weight]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        assert not torch.equal(module.model.layers[0].mlp.up_proj.weight, before)
        frozen = strategy.freeze(_tiny())
        with products:
            products.dtypes.clear()
            frozen(input_ids=ids)
        assert products.dtypes == ({torch.bfloat16} if name == "bf16" else {torch.float32})
        losses[name] = float(loss.detach())
    # Same weights and batch: bf16 rounding moves the loss a little, never much.
    assert losses["bf16"] != losses["no"] and abs(losses["bf16"] - losses["no"]) < 0.01 * losses["no"]


def test_workers_that_resolve_differently_stop_with_one_clear_error(monkeypatch):
    from rlhf.distributed.fsdp import FSDPStrategy

    monkeypatch.setenv("RLHF_CPU_BF16", "0")  # this worker: fp32
    strategy = FSDPStrategy(StrategyConfig(name="fsdp", mixed_precision="auto"))
    strategy.world_size, strategy.device = 2, torch.device("cpu")
    votes = {"no": 1.0, "bf16": 1.0, "fp16": 0.0}  # the other worker's probe went the other way
    monkeypatch.setattr(strategy, "all_reduce", lambda values, op="mean": votes)
    with pytest.raises(UserError, match=r"resolves differently on the workers \(1 no, 1 bf16"):
        strategy._agreed_precision()
    votes.update({"no": 2.0, "bf16": 0.0})
    assert strategy._agreed_precision() == "no"
