"""The plan of a sharded PPO run: the frozen reference and reward model are sharded like the
trained models under ZeRO-3 and FSDP2 (and whole under ZeRO-2), and the memory at load
(`Plan.load_peak`) is the framework baseline plus each worker's share of the weights, plus the
gradient partitions and optimizer states DeepSpeed allocates when it wraps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rlhf.config import PPOConfig, load_config
from rlhf.plan import GiB, ModelShape, estimate
from rlhf.plan.memory import FRAMEWORK_BASELINE

PPO = str(Path(__file__).resolve().parents[1] / "configs" / "ppo.yaml")
FP32 = ["model.dtype=float32", "reward_model.dtype=float32", "strategy.mixed_precision='no'"]
# Exactly 1M parameters; the scalar model adds a head of hidden (64) weights: 1,000,064.
MILLION = ModelShape(params=1_000_000, hidden_size=64, num_layers=2, vocab_size=512, num_heads=4,
                     intermediate_size=256)
ENGINES = {"fsdp": ["strategy.name=fsdp"], "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
           "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"]}

pytestmark = pytest.mark.usefixtures("no_launcher")


def plan(engine: str, workers: int):
    cfg = load_config(PPOConfig, [PPO], FP32 + ENGINES[engine] + ["ppo.advantage=gae", "kl.coef=0.1"])
    return estimate(cfg, "ppo", workers, 80 * GiB, device_type="cpu",
                    shapes={"model": MILLION, "reward_model": MILLION})


@pytest.mark.parametrize("engine, sharded", [("fsdp", True), ("zero3", True), ("zero2", False)])
def test_frozen_models_are_sharded_where_the_strategy_shards_parameters(engine, sharded):
    # Reference 1M fp32 + reward model 1,000,064 fp32 = 8,000,256 bytes in all.
    whole = 4_000_000 + 4_000_256
    assert plan(engine, 1).frozen.device == whole
    # On 4 workers each holds a quarter of each where they are sharded: 1,000,000 + 1,000,064.
    assert plan(engine, 4).frozen.device == (2_000_064 if sharded else whole)
    gathered = [c for c in plan(engine, 4).components if c.kind == "gathered" and c.role in ("reference", "reward")]
    assert len(gathered) == (2 if sharded else 0)


def test_load_peak_is_the_baseline_and_each_workers_share_of_the_weights():
    trained = 4_000_000 + 4_000_256  # actor and critic fp32 weights
    frozen = 4_000_000 + 4_000_256
    # FSDP2: weights only (gradients and AdamW states come with the first step), split over 2.
    assert plan("fsdp", 1).load_peak == FRAMEWORK_BASELINE["fsdp"] + trained + frozen
    assert plan("fsdp", 2).load_peak == FRAMEWORK_BASELINE["fsdp"] + (trained + frozen) // 2
    # ZeRO-3: DeepSpeed also allocates fp32 gradient partitions (4 bytes) and AdamW's moments
    # (8 bytes) of the trained models when it wraps them.
    assert plan("zero3", 2).load_peak == FRAMEWORK_BASELINE["deepspeed"] + (4 * trained + frozen) // 2


def test_a_lora_actor_is_counted_sharded_at_load_under_fsdp():
    # LoRA models are built on the meta device like the others (rlhf/models/lora.py): 2 workers
    # each hold half of every model, adapters included, and nothing whole while loading.
    lora = ["model.lora.r=8"]
    cfg = load_config(PPOConfig, [PPO], FP32 + ENGINES["fsdp"] + lora + ["ppo.advantage=gae", "kl.coef=0.1"])
    peaks = [estimate(cfg, "ppo", n, 80 * GiB, device_type="cpu", shapes={"model": MILLION, "reward_model": MILLION})
             for n in (1, 2)]
    growth = [p.load_peak - FRAMEWORK_BASELINE["fsdp"] for p in peaks]
    # Adapters: 2 x r x hidden per target module and layer = 2 * 8 * 64 * 4 * 2 = 8,192, fp32.
    # Actor 4 x 1,008,192 = 4,032,768; critic and reward model 4,000,256 each; reference 4,000,000.
    assert growth[0] == 4_032_768 + 4_000_256 + 4_000_256 + 4_000_000
    assert growth[1] == 2_016_384 + 2_000_128 + 2_000_128 + 2_000_000
    assert peaks[1].load_transient == 0


def test_what_rank_0_holds_while_it_reads_a_gguf_file(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
    from _tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    source = [f"model.path={tmp_path}", f"model.gguf_file={gguf.name}"]

    def transient(engine: str) -> int:
        cfg = load_config(PPOConfig, [PPO], FP32 + ENGINES[engine] + source + ["ppo.advantage=gae", "kl.coef=0.1"])
        from_gguf = estimate(cfg, "ppo", 2, 80 * GiB, device_type="cpu",
                             shapes={"model": MILLION, "reward_model": MILLION})
        # The same weights from a safetensors directory: only the transient differs.
        assert from_gguf.load_peak - from_gguf.load_transient == plan(engine, 2).load_peak
        return from_gguf.load_transient

    # FSDP2: rank 0 loads the GGUF model whole (1M fp32 parameters) and broadcasts the shards.
    assert transient("fsdp") == 4_000_000
    # ZeRO-3: one tensor at a time, dequantised and gathered: the embedding, 512 x 64 fp32, twice.
    assert transient("zero3") == 2 * 512 * 64 * 4
    # ZeRO-2 keeps whole weights anyway: nothing beyond them.
    assert transient("zero2") == 0
