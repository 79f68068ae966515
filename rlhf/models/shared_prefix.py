"""Attention for one row holding a prompt followed by several answers to it.

Each answer attends causally to the prompt and to its own earlier tokens, never to another
answer, and its positions continue from the prompt's end. Every token then sees exactly
what it would see in its own row [prompt, answer], so the row gives the same hidden states
with the prompt forwarded once instead of once per answer.

transformers takes a ready 4-D mask as it is (masking_utils returns it untouched), which
works for the `sdpa` and `eager` attention implementations; flash-attention and flex
attention take their masks in other forms.
"""

from __future__ import annotations

import torch

from rlhf.data.rank_dataset import PAD_SEGMENT, PROMPT_SEGMENT

SHARED_PREFIX_ATTENTION = ("sdpa", "eager")


def shared_prefix_unsupported(config) -> str | None:
    """Why a model with this config cannot score answers sharing a prompt row; None when it can."""
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in SHARED_PREFIX_ATTENTION:
        return f"attention implementation '{implementation}' takes no ready 4-D mask"
    return None


def attention_window(config) -> int | None:
    """The sliding window of a model that has sliding-window layers, else None. A custom mask
    replaces the window, so rows longer than it must not share their prompt."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not any("sliding" in kind for kind in layer_types):
        return None
    return int(window)


def shared_prefix_attention_mask(segment_ids: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, seq, seq) mask from (rows, seq) segment ids: PROMPT_SEGMENT for the prompt,
    1..K for the answers, PAD_SEGMENT for padding. `sdpa` gets booleans (True attends);
    `eager` adds the mask to its scores, so it gets 0 or the dtype's lowest value."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = causal & (key != PAD_SEGMENT) & ((key == PROMPT_SEGMENT) | (key == query))
    # A padding position attends to itself, so no query row is empty (an empty row softmaxes to NaN).
    allowed |= torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
