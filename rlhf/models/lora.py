"""Optional LoRA adapters through PEFT; merged into the base weights on export.

The adapters are initialised from `seed`, not from the global random state: a model built on
the meta device (FSDP2, rlhf/models/loading.py `PendingWeights`) gets its adapters only once
it is sharded, on every rank, and they must equal those of the same model loaded whole. So the
values PEFT would draw (lora_A as nn.Linear's kaiming-uniform, lora_B zero; for embeddings
A zero and B normal) are drawn here from one seeded generator, parameter by parameter in the
model's order, whichever way the model is built.

On a meta model the base weights keep their place in PEFT's tree (`...q_proj.base_layer.weight`,
a scalar head's `score.original_module.weight` and its trained copy
`score.modules_to_save.default.weight`); `checkpoint_name` maps those back to the checkpoint's
names, so each rank reads its rows of them like any other weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import torch

from rlhf.config_sections import LoraConfig

_PEFT_PREFIX = "base_model.model."
_WRAPPER_PARTS = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")
_ADAPTER = re.compile(r"\.(lora_[A-Za-z_]+)\.")


def checkpoint_name(name: str) -> str:
    """The checkpoint's name of a parameter of a PEFT model (adapters keep their own: no
    checkpoint holds them)."""
    return name if _ADAPTER.search(name) else _WRAPPER_PARTS.sub("", name.removeprefix(_PEFT_PREFIX))


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, scalar_head: bool = False, seed: int = 0) -> torch.nn.Module:
    """Adapters on `cfg.target_modules`, the rest frozen. `scalar_head`: a reward or value model,
    whose new scalar head trains in full beside the adapters (PEFT's sequence-classification
    task keeps a trained copy of it, merged back on export). A model built on the meta device
    stays there, its pending weights renamed for PEFT's tree."""
    if cfg.r <= 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    pending = model.__dict__.pop("pending_weights", None)
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="SEQ_CLS" if scalar_head else "CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_config)
    adapters = adapter_values(peft_model, seed)
    if pending is None:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if name in adapters:
                    param.copy_(adapters[name])
        return peft_model
    load_whole, fill_missing = pending.load_whole, pending.fill_missing
    peft_model.pending_weights = replace(
        pending,
        load_whole=lambda: apply_lora(load_whole(), cfg, scalar_head, seed),
        fill_missing=lambda missing: {**fill_missing(missing),
                                      **{n: value for n, value in adapters.items() if n in missing}},
        checkpoint_name=checkpoint_name,
    )
    return peft_model


def adapter_values(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Name -> the full initial value of each adapter parameter of a PEFT model (on the CPU, in
    fp32; small: rank x width per adapted layer), drawn in the model's parameter order from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        match = _ADAPTER.search(name)
        if match is None:
            continue
        kind, shape = match.group(1), tuple(param.shape)
        if kind == "lora_A" and name.endswith(".weight"):
            value = torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)
        elif kind == "lora_embedding_B":
            value = torch.nn.init.normal_(torch.empty(shape), generator=generator)
        elif kind in ("lora_A", "lora_B", "lora_embedding_A"):
            value = torch.zeros(shape)
        else:
            raise RuntimeError(f"{name}: an adapter parameter this project does not initialise ({kind})")
        values[name] = value
    return values
