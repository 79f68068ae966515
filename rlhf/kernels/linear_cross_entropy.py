"""Summed next-token NLL of `hidden · weightᵀ (+ bias)`, computed over chunks of rows so that
the (rows, vocab) logits never exist whole.

The vocabulary projection and its loss make the largest activations of a language-model step:
logits, their log-softmax and their gradient, each rows x vocab (85 MB apiece for 435 target
tokens at SmolLM2's 49,152 words in fp32, gigabytes at 8k tokens and a 150k vocabulary). Here
each chunk's logits are computed, turned into the loss and into softmax − one-hot in place, and
multiplied straight back into the gradients of the hidden rows and of the weight; only those
gradients (rows x hidden and vocab x hidden, the sizes of the inputs) are kept for the
backward pass, which scales them by the incoming gradient. The products are the same three a
plain linear layer and cross-entropy compute, so no work is added.

On the CPU a chunk stays under glibc's 32 MB mmap threshold (rlhf/kernels/host_memory.py),
so its blocks are reused from chunk to chunk instead of being faulted in fresh; on a GPU the
chunks are larger, as the caching allocator reuses them anyway and larger products run faster.
"""

from __future__ import annotations

import torch

from rlhf.kernels.host_memory import advise_huge_pages
from rlhf.kernels import onednn

CPU_CHUNK_BYTES = 24 * 1024 * 1024
"""fp32 logits per chunk on the CPU: below the 32 MB mmap threshold, with room to spare."""
GPU_CHUNK_BYTES = 1024 * 1024 * 1024
VOCAB_SLICE = 8192
"""Vocabulary rows per weight-gradient product on the CPU, where oneDNN writes a fresh output
per product: slices keep each output small (19 MB at hidden 576) and added in place."""


def _chunk_rows(vocab: int, device: torch.device) -> int:
    budget = CPU_CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES
    return max(1, budget // (4 * vocab))


def _chunk_gradients(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The chunk's summed NLL; `logits` become softmax − one-hot in place (their gradient)."""
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    # logsumexp by hand, in place: `torch.logsumexp` makes a chunk-sized temporary, and the
    # exponentials are needed for the gradient anyway (nearly twice as fast per chunk; see
    # BENCHMARKS.md, 'Measurements behind the code').
    peak = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(peak).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    loss = (peak + total.log()).squeeze(-1).sub_(picked).sum()
    probs.div_(total)
    probs[torch.arange(len(targets), device=logits.device), targets] -= 1
    return loss


def _add_weight_gradient(grad_weight: torch.Tensor, probs: torch.Tensor, hidden: torch.Tensor, first: bool) -> None:
    """grad_weight (+)= probsᵀ · hidden. Products in a lower dtype than the gradient (bf16
    autocast over fp32 weights) are added into it slice by slice, so the sum over chunks is
    kept in the gradient's precision."""
    sliced = hidden.dtype != grad_weight.dtype
    if sliced or (onednn.onednn_enabled() and hidden.device.type == "cpu" and hidden.dtype == torch.float32):
        for start in range(0, grad_weight.shape[0], VOCAB_SLICE):
            probs_t = probs[:, start : start + VOCAB_SLICE].t()
            part = torch.mm(probs_t, hidden) if sliced else onednn.linear(probs_t, hidden.t())
            if first:
                grad_weight[start : start + VOCAB_SLICE] = part
            else:
                grad_weight[start : start + VOCAB_SLICE] += part
    elif first:
        torch.mm(probs.t(), hidden, out=grad_weight)
    else:
        grad_weight.addmm_(probs.t(), hidden)


def _logits(chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits of a chunk; products in the weight's dtype (`_compute` made them agree)."""
    return onednn.linear(chunk, weight, bias).float()


def _compute(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None):
    """The operands in the dtype the products run in: `dtype` (autocast's), else as given."""
    if dtype is None:
        return hidden, weight, bias
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, weight_gradient_sink: list | None, dtype: torch.dtype | None) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Written whole by the first chunk; zeros when there is none (no target in the batch).
        grad_weight = (torch.empty_like(weight) if hidden.shape[0] else torch.zeros_like(weight)) if want_weight else None
        if grad_weight is not None:
            advise_huge_pages(grad_weight)  # a fresh vocabulary-sized mapping every step on the CPU
            if weight_gradient_sink is not None:
                weight_gradient_sink.append(grad_weight)
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = _chunk_rows(weight.shape[0], hidden.device)
        # The gradients stay in the inputs' dtypes; the products run in `dtype` when given.
        low_hidden, low_weight, low_bias = _compute(hidden, weight, bias, dtype)
        for start in range(0, hidden.shape[0], rows):
            chunk = low_hidden[start : start + rows]
            logits = _logits(chunk, low_weight, low_bias)
            total += _chunk_gradients(logits, targets[start : start + rows])
            if want_bias:
                grad_bias += logits.sum(0)
            probs = logits.to(low_weight.dtype)
            if want_hidden:
                grad_hidden[start : start + rows] = onednn.linear(probs, low_weight.t())
            if want_weight:
                _add_weight_gradient(grad_weight, probs, chunk, first=start == 0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        if ctx.used:
            raise RuntimeError("linear_cross_entropy computes its gradients once; backward through it twice "
                               "(retain_graph) is not supported")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # In place: the forward made these buffers for this one backward.
        scale = grad_total.to(torch.float32)
        return (grad_hidden.mul_(scale) if grad_hidden is not None else None,
                grad_weight.mul_(scale) if grad_weight is not None else None,
                grad_bias.mul_(scale).to(ctx.bias_dtype) if grad_bias is not None else None,
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, weight_gradient_sink: list | None = None) -> torch.Tensor:
    """Σᵢ −log softmax(hiddenᵢ · weightᵀ + bias)[targetsᵢ] for hidden (rows, dim), weight (vocab,
    dim) and targets (rows,), as a float32 scalar; the logits are computed in float32 (as
    `F.cross_entropy(logits.float(), ...)`) one chunk of rows at a time. Differentiable in
    hidden, weight and bias, once per forward.

    When the weight needs a gradient and `weight_gradient_sink` is a list, the tensor the
    backward will deliver as the weight's gradient is appended to it: the backward scales it in
    place, so whatever is added to it after that (a tied input embedding's rows, see
    rlhf/kernels/fused_head.py) reaches the weight without a second vocabulary-sized block. The
    holder must drop the tensor before autograd hands it to the weight, which copies a gradient
    that is referenced elsewhere.

    Under autocast (bf16 mixed precision, rlhf/models/autocast.py) the products run in its
    dtype, as the plain head's would, while the gradients come back in the fp32 weight's and
    hidden states' own dtypes; the weight gradient is summed over chunks in fp32."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    dtype = dtype if dtype is not None and weight.dtype != dtype else None
    with torch.autocast(device, enabled=False):  # the products' dtype is `dtype`, chosen here
        if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad
                                               or (bias is not None and bias.requires_grad)):
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            rows = _chunk_rows(weight.shape[0], hidden.device)
            low_hidden, low_weight, low_bias = _compute(hidden, weight, bias, dtype)
            for start in range(0, hidden.shape[0], rows):
                logits = _logits(low_hidden[start : start + rows], low_weight, low_bias)
                total += torch.nn.functional.cross_entropy(logits, targets[start : start + rows], reduction="sum")
            return total
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, weight_gradient_sink, dtype)
