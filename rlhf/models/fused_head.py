"""A language-model head that computes the training loss itself, so the full logits of a
micro-batch never exist (rlhf/algorithms/linear_cross_entropy.py).

`use_fused_head_loss` gives the model's output layer a forward that, while
`head_loss_targets` holds the batch's target tokens, returns their summed NLL in place of the
logits; at any other time (generation, evaluation with logits, PPO's log-probs) it is the
layer's usual forward. The loss is computed inside the model's own forward, so engines that
gather or shard weights around a module's forward (ZeRO-3, FSDP2) see the head as always.
Only architectures whose forward returns the head's output untouched take it (no logit
softcapping or scaling), and only a plain `nn.Linear` head (LoRA on the head keeps logits).

A tied input embedding (SmolLM2, Qwen2.5 and Llama 3.2's small models, GPT-2) adds its rows
straight into the head's weight gradient. Autograd would otherwise zero-fill a dense
vocabulary-sized gradient for the embedding's lookup and add the two out of place: two more
113 MB blocks per SmolLM2 step, each faulted in fresh. The head's gradient is complete, and
already scaled, before the embedding's backward runs: the embedding's output gradient is made
from the head's gradient for its input. Sharded weights (ZeRO-3, DTensor) and forwards that
do not compute the loss in the head keep autograd's two gradients.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch

from rlhf.algorithms.linear_cross_entropy import linear_cross_entropy
from rlhf.models.engines import is_whole, unwrap_engine

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Phi3ForCausalLM", "Olmo2ForCausalLM", "SmolLM3ForCausalLM", "GPT2LMHeadModel")
"""transformers classes whose forward returns `lm_head(hidden)` as the logits unchanged."""


def _fused_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    targets = self.__dict__.get("_rlhf_loss_targets")
    embedding = self.__dict__.get("_rlhf_tied_embedding")
    # Taken, not read: the slot belongs to this model call's embedding lookup alone. Handed on
    # only while the two still share one weight (a later untying gives each its own gradient).
    sink = embedding.__dict__.pop("_rlhf_gradient_slot", None) if embedding is not None else None
    sink = sink if sink is not None and embedding.weight is self.weight else None
    if targets is None:
        plain = self.__dict__.get("_rlhf_plain_forward")
        return plain(x) if plain is not None else torch.nn.Linear.forward(self, x)
    return linear_cross_entropy(x, self.weight, self.bias, targets, sink)


class _EmbeddingIntoHeadGradient(torch.autograd.Function):
    """An embedding lookup whose weight gradient is added into the tied head's gradient when the
    head left it in `slot`, and is autograd's dense one otherwise."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, slot: list) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.num_weights, ctx.slot = padding_idx, weight.shape[0], slot
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        if not ctx.slot:
            dense = torch.ops.aten.embedding_dense_backward(
                grad, ids, ctx.num_weights, -1 if ctx.padding_idx is None else ctx.padding_idx, False)
            return None, dense, None, None
        head_gradient = ctx.slot.pop()
        ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # the padding row gets no gradient from the lookup
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        head_gradient.index_add_(0, ids, rows.to(head_gradient.dtype))
        return None, None, None, None


def _tied_embedding_forward(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    # A sharded weight keeps autograd's gradients: its engine reduces each use's.
    if torch.is_grad_enabled() and self.weight.requires_grad and is_whole(self.weight):
        slot: list[torch.Tensor] = []
        self.__dict__["_rlhf_gradient_slot"] = slot
        return _EmbeddingIntoHeadGradient.apply(ids, self.weight, self.padding_idx, slot)
    self.__dict__.pop("_rlhf_gradient_slot", None)
    return torch.nn.Embedding.forward(self, ids)


def _tie_embedding_to_head(model: torch.nn.Module, head: torch.nn.Linear) -> None:
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if (type(embedding) is not torch.nn.Embedding or embedding.weight is not head.weight or "forward" in embedding.__dict__
            or embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse):
        return
    embedding.forward = types.MethodType(_tied_embedding_forward, embedding)
    head.__dict__["_rlhf_tied_embedding"] = embedding  # `copy.deepcopy` maps it to the copy's own


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
        _tie_embedding_to_head(model, head)
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
