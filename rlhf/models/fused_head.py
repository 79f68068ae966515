"""A language-model head that computes the training loss itself, so the full logits of a
micro-batch never exist (rlhf/algorithms/linear_cross_entropy.py).

`use_fused_head_loss` gives the model's output layer a forward that, while
`head_loss_targets` holds the batch's target tokens, returns their summed NLL in place of the
logits; at any other time (generation, evaluation with logits, PPO's log-probs) it is the
layer's usual forward. The loss is computed inside the model's own forward, so engines that
gather or shard weights around a module's forward (ZeRO-3, FSDP2) see the head as always.
Only architectures whose forward returns the head's output untouched take it (no logit
softcapping or scaling), and only a plain `nn.Linear` head (LoRA on the head keeps logits).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch

from rlhf.algorithms.linear_cross_entropy import linear_cross_entropy
from rlhf.models.engines import unwrap_engine

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Phi3ForCausalLM", "Olmo2ForCausalLM", "SmolLM3ForCausalLM", "GPT2LMHeadModel")
"""transformers classes whose forward returns `lm_head(hidden)` as the logits unchanged."""


def _fused_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    targets = self.__dict__.get("_rlhf_loss_targets")
    if targets is None:
        plain = self.__dict__.get("_rlhf_plain_forward")
        return plain(x) if plain is not None else torch.nn.Linear.forward(self, x)
    return linear_cross_entropy(x, self.weight, self.bias, targets)


def _architecture_supported(model: torch.nn.Module) -> bool:
    # FSDP2 swaps in a subclass of the model's class: look along the class hierarchy.
    return any(cls.__name__ in ARCHITECTURES and cls.__module__.startswith("transformers.models.")
               for cls in type(model).__mro__)


def use_fused_head_loss(model: torch.nn.Module) -> bool:
    """Give a supported model's output layer the loss-computing forward; True when it has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not _architecture_supported(model) or type(head) is not torch.nn.Linear:
        return False
    if "_rlhf_fused_loss" not in head.__dict__:
        # Keep a forward installed before (oneDNN's, rlhf/models/onednn.py) for the plain calls;
        # bound methods, so `copy.deepcopy` of the model binds them to the copy.
        head.__dict__["_rlhf_plain_forward"] = head.__dict__.get("forward")
        head.forward = types.MethodType(_fused_forward, head)
        head.__dict__["_rlhf_fused_loss"] = True
    return True


def _fused_head(module: torch.nn.Module) -> torch.nn.Linear | None:
    inner = unwrap_engine(module)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head if head is not None and "_rlhf_fused_loss" in head.__dict__ else None


@contextmanager
def head_loss_targets(module: torch.nn.Module, targets: torch.Tensor) -> Iterator[bool]:
    """Within the block, a forward of `module` returns the summed NLL of `targets` (one per row
    the head is given, in order) as its logits; yields False, changing nothing, when the model's
    head does not compute the loss (compute it from the logits then)."""
    head = _fused_head(module)
    if head is None:
        yield False
        return
    head.__dict__["_rlhf_loss_targets"] = targets
    try:
        yield True
    finally:
        head.__dict__.pop("_rlhf_loss_targets", None)
