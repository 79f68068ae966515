"""Optional LoRA adapters through PEFT; merged into the base weights on export."""

from __future__ import annotations

import torch

from rlhf.config_sections import LoraConfig


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, scalar_head: bool = False) -> torch.nn.Module:
    """Adapters on `cfg.target_modules`, the rest frozen. `scalar_head`: a reward or value model,
    whose new scalar head trains in full beside the adapters (PEFT's sequence-classification
    task keeps a trained copy of it, merged back on export)."""
    if cfg.r <= 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="SEQ_CLS" if scalar_head else "CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)
