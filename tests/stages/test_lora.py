"""`model.lora.r > 0`: the base weights stay as they were, only the LoRA adapters (and a new
reward head) train, and the export merges the adapters into plain weights that load with
plain transformers; for SFT, for the PPO actor and for the reward model.

What the export shows: every weight outside the adapted projections is bit-identical to the
base model's, and each adapted projection differs from its base weight by a matrix of rank at
most r (the merged B·A), not zero."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.config import PPOConfig, RMConfig, SFTConfig, load_config
from rlhf.config_sections import LoraConfig

pytestmark = pytest.mark.claim  # the proof of the README's LoRA claim (tests/README.md)

REPO = Path(__file__).resolve().parents[2]
RANK = 4  # the tiny model's hidden size is 32: a full-rank change would show rank 32
TARGETS = tuple(LoraConfig().target_modules)  # q_proj, k_proj, v_proj, o_proj
LORA = [f"model.lora.r={RANK}", "model.lora.alpha=8"]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dir) / "model.safetensors")


def assert_only_adapters_trained(base: dict[str, torch.Tensor], exported: dict[str, torch.Tensor],
                                 prefix: str = "") -> None:
    """`exported` (keys possibly under `prefix`) = `base` outside the adapted projections, and
    base + a non-zero matrix of rank <= RANK in each of them."""
    adapted = 0
    for name, weight in base.items():
        got = exported[prefix + name]
        if any(f".{target}." in name for target in TARGETS):
            delta = (got - weight).double()
            singular = torch.linalg.svdvals(delta)
            assert singular[0] > 0, f"{name}: the adapter was merged as zero"
            assert singular[RANK:].max() <= 1e-5 * singular[0], f"{name}: change of rank > {RANK}: {singular}"
            adapted += 1
        else:
            assert torch.equal(got, weight), f"{name} changed: the base was not frozen"
    assert adapted == 4 * 2  # four projections in each of the two layers


def assert_plain_export(model_dir: Path) -> None:
    assert not (model_dir / "adapter_config.json").exists() and not (model_dir / "adapter_model.safetensors").exists()
    assert "peft" not in (model_dir / "config.json").read_text().lower()
    assert not any("lora" in name for name in weights(model_dir))


@pytest.mark.slow
def test_sft_lora_trains_only_the_adapters_and_exports_them_merged(tmp_path, tiny_model_dir, quickstart_data):
    from transformers import AutoModelForCausalLM

    from stages import sft

    cfg = load_config(SFTConfig, [], [
        f"model.path={tiny_model_dir}", f"data.train.path={quickstart_data['sft']}", f"output_dir={tmp_path}",
        "logging.progress=false", "train.max_steps=12", "train.micro_batch_size=8", "train.global_batch_size=8",
        "train.lr=1e-2", "train.eval_every=0", "data.max_length=96", "data.max_prompt_length=48", *LORA])
    result = sft.main(cfg)
    assert result.metrics["eval/loss"] < result.metrics["eval/initial_loss"]
    assert_plain_export(result.model_dir)
    base, exported = weights(tiny_model_dir), weights(result.model_dir)
    assert exported.keys() == base.keys()
    assert_only_adapters_trained(base, exported)
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ppo_actor_lora_trains_only_the_adapters_and_exports_them_merged(tmp_path, tiny_model_dir, quickstart_data):
    from transformers import AutoModelForCausalLM

    from stages import ppo

    cfg = load_config(PPOConfig, [str(REPO / "configs" / "ppo.yaml")], [
        f"model.path={tiny_model_dir}", f"reward_model.path={tiny_model_dir}",
        f"data.prompts.path={quickstart_data['prompts']}", f"data.eval_prompts.path={quickstart_data['prompts_eval']}",
        f"data.pretrain.path={quickstart_data['pretrain']}", f"output_dir={tmp_path}", "logging.progress=false",
        "ppo.iterations=3", "ppo.eval_every=3", "reward.normalize=running", "ppo.rollout_batch_size=8",
        "ppo.mini_batch_size=4", "ppo.micro_batch_size=4", "rollout.max_new_tokens=6", "eval.max_prompts=4",
        "ppo.actor_lr=1e-2", *LORA])
    result = ppo.main(cfg)
    assert_plain_export(result.model_dir)
    base, exported = weights(tiny_model_dir), weights(result.model_dir)
    assert exported.keys() == base.keys()
    assert_only_adapters_trained(base, exported)
    AutoModelForCausalLM.from_pretrained(result.model_dir)  # loads with plain transformers


@pytest.mark.slow
def test_rm_lora_trains_only_the_adapters_and_the_head_and_exports_them_merged(tmp_path, tiny_model_dir,
                                                                              quickstart_data):
    from transformers import AutoModelForSequenceClassification

    from rlhf.config_sections import ModelConfig
    from rlhf.models.reward import load_scalar_model
    from stages import rm

    cfg = load_config(RMConfig, [], [
        f"model.path={tiny_model_dir}", f"data.train.path={quickstart_data['rank']}", f"output_dir={tmp_path}",
        "logging.progress=false", "train.max_steps=12", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.lr=1e-2", "train.eval_every=0", "data.max_length=96", "data.max_prompt_length=48",
        "data.eval_fraction=0.05", *LORA])
    result = rm.main(cfg)
    assert_plain_export(result.model_dir)
    base = {name: w for name, w in weights(tiny_model_dir).items() if name.startswith("model.")}
    exported = weights(result.model_dir)
    # The backbone: frozen but for the merged adapters. The head: new, and trained.
    assert_only_adapters_trained(base, exported)
    initial_head = load_scalar_model(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), seed=cfg.seed).score.weight
    assert not torch.equal(exported["score.weight"], initial_head.detach())
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.model_dir, num_labels=1)
    assert torch.equal(reloaded.score.weight.detach(), exported["score.weight"])
