"""Gradient checkpointing whose recomputation attends as the forward did.

Some forwards switch a model's attention for that call only: padding-free rows attend once per
example (`segment_attention`, rlhf/models/segments.py) and GRPO's shared-prompt rows through
`shared_prompt_attention` (rlhf/models/shared_prefix.py). A checkpointed layer runs its forward
again during backward, after the switch is undone, so it would attend with the model's plain
implementation over the packed row: different work (torch stops at the mismatch) or, where
the saved tensors happen to line up, examples seeing each other. The recomputation therefore
restores the attention implementation that was in force when the layer first ran
(`torch.utils.checkpoint`'s `context_fn`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' gradient checkpointing (non-reentrant), recomputing under the forward's attention."""
    text_config = model.config.get_text_config()
    configs = [model.config] + ([text_config] if text_config is not model.config else [])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": functools.partial(_recompute_as_forward, configs)})


def _recompute_as_forward(configs: list) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # Called as each checkpointed layer first runs: what it attends with now is what its
    # recomputation must attend with.
    implementations = [config._attn_implementation for config in configs]
    return contextlib.nullcontext(), _attention_as(configs, implementations)


@contextlib.contextmanager
def _attention_as(configs: list, implementations: list) -> Iterator[None]:
    previous = [config._attn_implementation for config in configs]
    for config, implementation in zip(configs, implementations):
        config._attn_implementation = implementation
    try:
        yield
    finally:
        for config, implementation in zip(configs, previous):
            config._attn_implementation = implementation
