"""The language-model loss from hidden states and the head weight, without whole logits.

`use_fused_head_loss` gives a supported model an output layer of class `LossHead`: called
as usual it returns logits; called with `targets` it returns their summed next-token NLL
through `linear_cross_entropy` (rlhf/kernels/linear_cross_entropy.py), over chunks of rows, so
the (tokens, vocab) logits of a micro-batch never exist whole. The caller asks for it
explicitly (`rlhf.training.lm.lm_forward_nll`): the model's forward runs with no logits to keep
and returns its final hidden states, and the head is then called on the target positions.
Calling the head as a module keeps the engines in charge of its weight: ZeRO-3 gathers it in
the head's own forward and backward, and FSDP2 leaves the root module's parameters (embedding,
final norm, head) unsharded after the root's forward, for the backward that follows.

Only architectures whose logits are `lm_head(final hidden states)` unchanged take it (no logit
softcapping or scaling), and only a plain linear head (LoRA on the head keeps logits).

A tied input embedding (SmolLM2, Qwen2.5 and Llama 3.2's small models, GPT-2) becomes a
`TiedEmbedding`, whose lookup adds its rows straight into the head's weight gradient when the
loss hands it the head's gradient buffer (`tied_gradient_slot`). Autograd would otherwise
zero-fill a dense vocabulary-sized gradient for the lookup and add the two out of place: two
more vocabulary-sized blocks per step. The head's gradient is complete, and already scaled,
before the embedding's backward runs: the embedding's output gradient is made from the head's
gradient for its input. Sharded weights (ZeRO-3, DTensor) and passes that do not compute the
loss in the head keep autograd's two gradients.
"""

from __future__ import annotations

import torch

from rlhf.kernels.linear_cross_entropy import linear_cross_entropy
from rlhf.kernels.cpu_linear import CPULinear, cpu_linear
from rlhf.models.engines import is_whole, unwrap_engine

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Phi3ForCausalLM", "Olmo2ForCausalLM", "SmolLM3ForCausalLM", "GPT2LMHeadModel")
"""transformers classes whose forward returns `lm_head(hidden)` as the logits unchanged."""


class LossHead(CPULinear):
    """A model's output layer that can also compute the loss of its rows."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                weight_gradient_sink: list | None = None) -> torch.Tensor:
        """Logits of `x`; with `targets` (one per row of `x`), their summed NLL instead.
        `weight_gradient_sink` (from `tied_gradient_slot`) receives the weight's gradient
        buffer for a tied embedding to add its rows into."""
        if targets is None:
            return cpu_linear(x, self.weight, self.bias)
        return linear_cross_entropy(x, self.weight, self.bias, targets, weight_gradient_sink)


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


class TiedEmbedding(torch.nn.Embedding):
    """An input embedding that shares its weight with a `LossHead`: each lookup with gradients
    leaves a slot where the loss may put the head's gradient buffer (see the module doc)."""

    gradient_slot: list | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # A sharded weight keeps autograd's gradients: its engine reduces each use's.
        if torch.is_grad_enabled() and self.weight.requires_grad and is_whole(self.weight):
            self.gradient_slot = []
            return _EmbeddingIntoHeadGradient.apply(ids, self.weight, self.padding_idx, self.gradient_slot)
        self.gradient_slot = None
        return super().forward(ids)


def _architecture_supported(model: torch.nn.Module) -> bool:
    # FSDP2 swaps in a subclass of the model's class: look along the class hierarchy.
    return any(cls.__name__ in ARCHITECTURES and cls.__module__.startswith("transformers.models.")
               for cls in type(model).__mro__)


def use_fused_head_loss(model: torch.nn.Module) -> bool:
    """Give a supported model a `LossHead` (and a tied embedding a `TiedEmbedding`); True when
    its head is one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, LossHead):
        return True
    if not _architecture_supported(model) or type(head) not in (torch.nn.Linear, CPULinear):
        return False
    head.__class__ = LossHead
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if (type(embedding) is torch.nn.Embedding and embedding.weight is head.weight and embedding.max_norm is None
            and not embedding.scale_grad_by_freq and not embedding.sparse):
        embedding.__class__ = TiedEmbedding
    return True


def causal_lm(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside an engine wrapper and a PEFT model."""
    model = unwrap_engine(module)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loss_head(module: torch.nn.Module) -> LossHead | None:
    """The model's `LossHead`, or None when its loss must come from logits."""
    model = causal_lm(module)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, LossHead) else None


def tied_gradient_slot(module: torch.nn.Module, head: LossHead) -> list | None:
    """The slot of the input embedding's last lookup when that embedding still shares the
    head's weight (a later untying gives each its own gradient); taken, so it serves one
    loss only."""
    model = causal_lm(module)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, TiedEmbedding) or embedding.weight is not head.weight:
        return None
    slot, embedding.gradient_slot = embedding.gradient_slot, None
    return slot
