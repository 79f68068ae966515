"""Position ids from an attention mask."""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count attended tokens only: the ones `generate` uses for left-padded
    prompts, so a sequence gets the same logits/scores left- or right-padded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
