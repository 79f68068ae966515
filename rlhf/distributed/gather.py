"""Writing full weights gathered from shards (ZeRO-3, FSDP2) as a plain `save_pretrained`
directory: the sharded module supplies config and class, the gathered state the tensors.
With LoRA, a plain CPU copy is rebuilt from the gathered state and merged, so the live
(sharded) model is left as it was."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.models.export import export_pretrained


def share_tied(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gathering copies tensors one name at a time; make the names of one shared parameter
    (tied embeddings) point at one tensor again, so `save_pretrained` drops the alias."""
    first: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name and owner in state and name in state:
            state[name] = state[owner]
    return state


def _plain_class(module: torch.nn.Module) -> type:
    """The model class without the FSDP2 mix-in `fully_shard` adds to sharded modules."""
    cls = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule)) if issubclass(cls, FSDPModule) else cls


def _plain_lora_copy(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CPU PEFT model with the same adapters holding `state`, built on the meta device and
    filled by assignment (no random init, no second copy of the weights)."""
    from peft import get_peft_model

    base = module.get_base_model()
    config = module.peft_config[module.active_adapter]
    with torch.device("meta"):
        copy = get_peft_model(_plain_class(base)(base.config), config)
    copy.load_state_dict(state, strict=True, assign=True)
    if getattr(base, "generation_config", None) is not None:  # causal LMs have one, scalar-head models not
        copy.get_base_model().generation_config = base.generation_config
    leftover = [n for n, p in copy.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"gathered weights miss {leftover[:5]}")
    return copy


def export_gathered(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    extra_files: dict | None = None,
) -> Path:
    """Rank 0 only: write `state` (the complete weights of `module`) as a HF directory."""
    state = share_tied(module, state)
    if hasattr(module, "merge_and_unload"):
        return export_pretrained(_plain_lora_copy(module, state), tokenizer, directory, extra_files=extra_files)
    return export_pretrained(module, tokenizer, directory, state_dict=state, extra_files=extra_files)
