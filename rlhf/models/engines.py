"""The transformers model inside a training engine's wrapper, and whether a tensor is whole."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def unwrap_engine(model: torch.nn.Module) -> torch.nn.Module:
    """The module a DeepSpeed engine (or DDP) wraps as `.module`, or `model` itself. Calling
    its submodules directly is fine (ZeRO-3 gathers through hooks on the submodules
    themselves). The engine forwards unknown attributes to the module, but not `config`,
    which is its own."""
    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def is_whole(tensor: torch.Tensor) -> bool:
    """Not a ZeRO-3 partition or a DTensor shard (FSDP2): the whole tensor, used as it is,
    without an engine's gathering or per-use gradient reduction."""
    return not hasattr(tensor, "ds_id") and type(tensor) in (torch.Tensor, torch.nn.Parameter)


def reshard_frozen(model: torch.nn.Module) -> None:
    """FSDP2 leaves the root's parameters (embeddings, final norm, heads) gathered after a
    forward, for the backward that reshards them; a frozen model has no backward, so without
    this every worker would keep them whole between scoring calls."""
    reshard = getattr(model, "reshard", None)
    if callable(reshard) and hasattr(model, "unshard"):  # an FSDPModule
        reshard()
