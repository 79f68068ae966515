"""Optional LoRA adapters through PEFT; merged into the base weights on export."""

from __future__ import annotations

import torch

from rlhf.config_sections import LoraConfig


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    if cfg.r <= 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)
