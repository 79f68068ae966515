"""Child of test_sharded_load.py, run by torchrun on 2 ranks: the four PPO models built the way
the strategy places them (ZeRO-3: partitioned by zero.Init, frozen ones behind an engine without
optimizer; FSDP2: on the meta device, weights read into the shards), then scored.

    torchrun --standalone --nproc_per_node 2 _sharded_load.py {zero3,fsdp} MODEL_DIR OUT_DIR
    torchrun --standalone --nproc_per_node 2 _sharded_load.py zero3 GGUF_FILE OUT_DIR

Writes OUT_DIR/rank{r}.pt: per model, this rank's parameter elements, the model's and its
outputs on fixed inputs; for FSDP2 whether the tied head is still the embedding. A fifth model,
the actor with LoRA adapters (`LORA`), also leaves its gathered full state (rank 0) and an
export (OUT_DIR/lora-export). From a GGUF file: the actor and the reward model only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from rlhf.config_sections import LoraConfig, ModelConfig, StrategyConfig
from rlhf.distributed.factory import build_strategy
from rlhf.distributed.optim import OptimizerSpec
from rlhf.models.engines import unwrap_engine
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.lora import apply_lora
from rlhf.models.reward import load_scalar_model, sequence_scores, token_values

SPEC = OptimizerSpec(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0,
                     scheduler="constant", warmup_steps=0, total_steps=1, min_lr_ratio=0.0)
GATHER_EVERY_WEIGHT = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
"""ZeRO-3 keeps parameters under 100k elements whole on every rank once an engine holds them: all
of the tiny model's. Threshold 0 keeps them all partitioned."""
SEED = 3
LORA = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded by 3, over the tiny model's vocabulary."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def local_and_full(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the model), each parameter counted once."""
    local = full = 0
    for param in unwrap_engine(model).parameters():
        if hasattr(param, "ds_tensor"):  # a ZeRO-3 partition
            local, full = local + param.ds_tensor.numel(), full + param.ds_numel
        elif hasattr(param, "to_local"):  # an FSDP2 shard
            local, full = local + param.to_local().numel(), full + param.numel()
        else:
            local, full = local + param.numel(), full + param.numel()
    return local, full


def not_whole(model: torch.nn.Module) -> bool:
    """Whether no weight of a model just built holds its whole value on this rank: each is a
    ZeRO-3 partition, or on the meta device (FSDP2 reads it in once sharded). LoRA adapters
    built beside a ZeRO-3 model are whole until DeepSpeed partitions them at wrap (rank x width
    each)."""
    return all(hasattr(p, "ds_tensor") or p.is_meta for n, p in model.named_parameters() if ".lora_" not in n)


def outputs(name: str, model: torch.nn.Module) -> torch.Tensor:
    ids, mask = inputs()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        if name in ("actor", "reference", "actor_lora"):
            return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        if name == "critic":
            return token_values(model, ids, mask)
        return sequence_scores(model, ids, mask)


def main(which: str, model_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    if which == "fsdp":
        cfg = StrategyConfig(name="fsdp")
    else:
        raw = out / "zero3.json"
        raw.write_text(json.dumps(GATHER_EVERY_WEIGHT))
        cfg = StrategyConfig(name="deepspeed", zero_stage=3, deepspeed_config=str(raw))
    strategy = build_strategy(cfg)
    strategy.setup(0)
    path = Path(model_dir)
    gguf = path.suffix == ".gguf"
    model_cfg = ModelConfig(path=str(path.parent), gguf_file=path.name) if gguf else ModelConfig(path=model_dir)
    placement = strategy.placement()
    built: dict[str, bool] = {}

    def load(name: str, model: torch.nn.Module) -> torch.nn.Module:
        built[name] = not_whole(model)
        return model

    def lm(cfg: ModelConfig = model_cfg) -> torch.nn.Module:
        return load_causal_lm(cfg, strategy.device, placement=placement)

    def scalar() -> torch.nn.Module:
        return load_scalar_model(model_cfg, strategy.device, seed=SEED, placement=placement)

    models = {"actor": strategy.wrap(load("actor", lm()), SPEC).module}
    if not gguf:
        lora_cfg = replace(model_cfg, lora=LORA)  # as the stages load it: the config says LoRA
        lora = strategy.wrap(load("actor_lora", apply_lora(lm(lora_cfg), lora_cfg.lora, seed=SEED)), SPEC)
        models.update(critic=strategy.wrap(load("critic", scalar()), SPEC).module,
                      reference=strategy.freeze(load("reference", lm())), actor_lora=lora.module)
    models["reward"] = strategy.freeze(load("reward", scalar()))
    result = {"placement": placement.mode}
    for name, model in models.items():
        model.eval()
        result[name] = {"elements": local_and_full(model), "outputs": outputs(name, model).cpu(),
                        "built_sharded": built[name]}
    if not gguf:
        state = strategy.full_state_dict(lora)
        result["lora_state"] = {k: v.clone() for k, v in state.items()}
        strategy.export(lora, load_tokenizer(model_cfg), out / "lora-export")
    if which == "fsdp":
        inner = models["actor"]
        result["tied"] = inner.lm_head.weight is inner.model.embed_tokens.weight
    torch.save(result, out / f"rank{strategy.rank}.pt")
    strategy.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
