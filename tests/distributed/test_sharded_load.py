"""No full model copy per rank at load (issue 24): under ZeRO-3 and FSDP2 each of the four PPO
models (actor, critic, and the frozen reference and reward model) and an actor with LoRA
adapters is built sharded (no rank holds a whole weight once it is built), so each of 2 ranks
stores about half of its parameters, and the sharded models give the outputs of the same models
loaded whole in one process: the rotary buffers (in no checkpoint), the tied head, the new
scalar head (seeded) and the LoRA adapters (seeded) included; the LoRA model's gathered state
equals the whole one's, and its merged export runs. A GGUF file under ZeRO-3 likewise (a tiny
one written here; SmolLM2's in BENCHMARKS.md). ~30 s per strategy on 2 cores, ~15 s for GGUF."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.config_sections import ModelConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from _sharded_load import LORA, SEED, outputs  # noqa: E402
from _tiny_gguf import write_tiny_gguf  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "OMP_NUM_THREADS"}
ROLES = ("actor", "critic", "reference", "reward", "actor_lora")


def whole_models(cfg: ModelConfig, roles: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Each role's model loaded whole in this process."""
    from rlhf.models.loading import load_causal_lm
    from rlhf.models.lora import apply_lora
    from rlhf.models.reward import load_scalar_model

    cpu = torch.device("cpu")
    lm, scalar = load_causal_lm(cfg, cpu).eval(), load_scalar_model(cfg, cpu, seed=SEED).eval()
    models = {"actor": lm, "reference": lm, "critic": scalar, "reward": scalar}
    if "actor_lora" in roles:
        models["actor_lora"] = apply_lora(load_causal_lm(cfg, cpu), LORA, seed=SEED).eval()
    return {role: models[role] for role in roles}


@pytest.fixture(scope="module")
def whole(tiny_model_dir) -> dict[str, torch.nn.Module]:
    return whole_models(ModelConfig(path=str(tiny_model_dir)), ROLES)


def run_ranks(strategy: str, model: Path, out: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "_sharded_load.py"), strategy, str(model), str(out)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{strategy} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_sharded_and_equal(ranks: list[dict], whole: dict[str, torch.nn.Module]) -> None:
    for role, model in whole.items():
        full = ranks[0][role]["elements"][1]
        stored = [rank[role]["elements"][0] for rank in ranks]
        # No rank held a whole weight once the model was built (not only after wrapping).
        assert all(rank[role]["built_sharded"] for rank in ranks), role
        # Each rank's share of every model: half, up to the padding of odd-sized tensors.
        assert all(0.45 * full <= part <= 0.55 * full for part in stored), (role, stored, full)
        expected = outputs(role, model)
        for rank in ranks:
            torch.testing.assert_close(rank[role]["outputs"], expected, rtol=0, atol=0, msg=role)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_each_rank_stores_half_of_every_model_and_the_outputs_are_the_whole_models(
        strategy, tiny_model_dir, whole, tmp_path):
    ranks = run_ranks(strategy, tiny_model_dir, tmp_path)
    assert ranks[0]["placement"] == {"zero3": "zero3", "fsdp": "meta"}[strategy]
    assert_sharded_and_equal(ranks, whole)
    if strategy == "fsdp":
        assert all(rank["tied"] for rank in ranks)
    # LoRA: lora_B starts at zero, so the outputs cannot tell the adapters apart; the gathered
    # state can (lora_A drawn from the seed, base weights under PEFT's names).
    expected = whole["actor_lora"].state_dict()
    gathered = ranks[0]["lora_state"]
    assert sorted(gathered) == sorted(expected)
    assert any(".lora_A." in name for name in expected)
    for name, value in expected.items():
        assert torch.equal(gathered[name], value), name
    # The export merges the adapters into plain transformers weights (lora_B zero: the base's).
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "lora-export").state_dict()
    base = whole["actor"].state_dict()
    assert sorted(exported) == sorted(base)
    assert all(torch.equal(exported[name], base[name]) for name in base)


def test_a_gguf_file_under_zero3_is_read_into_the_partitions(tmp_path):
    """The GGUF file is dequantised tensor by tensor into the ZeRO-3 partitions (no rank builds
    the whole model), and the actor and a reward model on it (new seeded head) score as
    `from_pretrained(gguf_file=...)` loaded whole does."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    ranks = run_ranks("zero3", gguf, tmp_path)
    whole = whole_models(ModelConfig(path=str(tmp_path), gguf_file=gguf.name), ("actor", "reward"))
    assert_sharded_and_equal(ranks, whole)


def _wide_model(tiny_model_dir: Path, out: Path, hidden: int, layers: int) -> Path:
    """A Llama of this width and depth with the tiny model's tokenizer, vocabulary 8192 wide
    (the tokenizer uses its first ids only), saved as safetensors."""
    from transformers import AutoTokenizer

    from rlhf.config_sections import TinyModelConfig
    from rlhf.models.tiny import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=8, intermediate_size=hidden * 2,
                          vocab_size=8192, max_position_embeddings=256)
    build_tiny_model(cfg, 8192, tokenizer.pad_token_id, tokenizer.eos_token_id, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.claim  # two 2-rank launches side by side, ~60 s on 2 cores
def test_plan_matches_the_measured_memory_of_two_ranks_loading_ppo(tiny_model_dir, tmp_path, no_launcher):
    """`rlhf plan`'s load_peak against the resident-set peak of 2 FSDP2 ranks building PPO's four
    models (benchmarks/load_memory.py). What every rank holds whatever the model (libraries,
    the process group, the model classes imported on first use) is measured by the same launch
    with a small model and subtracted, on both sides: what remains is each rank's share of a
    ~30 M-parameter model's four copies, ~240 MB; a rank that loaded any of them whole first
    (~120 MB each) lands far above the band."""
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(REPO / "benchmarks"))
    import load_memory

    from rlhf.config import PPOConfig, load_config
    from rlhf.plan import GiB, estimate
    from rlhf.plan.memory import FRAMEWORK_BASELINE

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a b c"}\n' * 8)
    sizes = {"small": (64, 2), "large": (512, 8)}

    def run(name: str) -> tuple[float, int]:
        model = _wide_model(tiny_model_dir, tmp_path / name, *sizes[name])
        overrides = load_memory.ppo_overrides(model, model, prompts, tmp_path / f"run-{name}", "fsdp")
        ranks = load_memory.measure("fsdp", 2, overrides, tmp_path / f"out-{name}")
        growth = max(r["peak_mib"] - r["baseline_mib"] for r in ranks) * load_memory.MIB
        plan = estimate(load_config(PPOConfig, overrides=overrides), "ppo", 2, 64 * GiB, device_type="cpu")
        return growth, plan.load_peak - FRAMEWORK_BASELINE["fsdp"]

    with ThreadPoolExecutor(2) as pool:
        (small_growth, small_plan), (large_growth, large_plan) = pool.map(run, ("small", "large"))
    ratio = (large_plan - small_plan) / (large_growth - small_growth)
    report = (f"plan {large_plan / 1e6:.1f} MB vs growth {large_growth / 1e6:.1f} MB (large), "
              f"{small_plan / 1e6:.1f} MB vs {small_growth / 1e6:.1f} MB (small)")
    assert 0.85 <= ratio <= 1.15, f"plan / measured = {ratio:.3f}: {report}"
