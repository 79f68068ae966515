"""The weighted sum of reward sources."""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["mix_rewards"]


def mix_rewards(sources: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Σ_s weights[s] · sources[s], (batch,) float32.

    `sources`: name -> (batch,) reward ("model", "http", each function's "module:function").
    `weights`: name -> weight; a source without one weighs 1; weights of absent sources are
    ignored. NaN (a failed sample) propagates to that sample's sum, so the caller's non-finite
    guard sees it; the exception is a source of weight 0, which is left out entirely (it can
    then be logged without counting, failures included). The result is on the first source's
    device."""
    if not sources:
        raise ValueError("mix_rewards: no reward source")
    first = next(iter(sources.values()))
    total = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
    for name, values in sources.items():
        if values.shape != first.shape:
            raise ValueError(f"mix_rewards: source {name!r} has shape {tuple(values.shape)}, "
                             f"the others {tuple(first.shape)}")
        weight = float(weights.get(name, 1.0))
        if weight != 0.0:
            total = total + weight * values.to(device=total.device, dtype=torch.float32)
    return total
