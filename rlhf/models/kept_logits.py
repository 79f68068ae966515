"""A causal LM's forward whose output layer runs only at chosen positions of each row."""

from __future__ import annotations

import torch

from rlhf.models.reward import transformers_model


def forward_keeping(module: torch.nn.Module, keep: torch.Tensor, **inputs):
    """`module(**inputs)` with the output layer applied only where `keep` (batch, seq) is True:
    `.logits` is (kept positions, vocab), in row-major order of `keep` (an all-False `keep`
    gives no logits; the rest of the output, hidden states included, is the model's own).

    Newer transformers take such a boolean mask as `logits_to_keep`; 5.19, the newest that
    vLLM 0.32 accepts (constraints.txt), slices only by a count or by one list of positions
    shared by every row. So the model computes its hidden states for every position and the
    rows are picked on their way into the output layer, by a pre-hook for the length of this
    one call (nothing rebound); an engine's own hooks on that layer (ZeRO-3's gather) still
    run, before this one."""
    head = transformers_model(module).get_output_embeddings()

    def pick(_layer: torch.nn.Module, args: tuple) -> tuple:
        return (args[0][keep], *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        return module(**inputs, logits_to_keep=0)
    finally:
        handle.remove()
