"""The transformers model inside a training engine's wrapper."""

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
