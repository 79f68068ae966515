"""The language-model loss of a micro-batch, as SFT and PPO-ptx compute it: through the model's
`LossHead` (rlhf/kernels/fused_head.py) when `accelerate` gave it one, else from the logits of
the target positions with `rlhf.algorithms.losses.lm_nll`."""

from __future__ import annotations

import contextlib

import torch

from rlhf.algorithms.losses import lm_nll
from rlhf.data.sft_dataset import IGNORE_INDEX, SFTBatch
from rlhf.kernels.fused_head import causal_lm, loss_head, tied_gradient_slot
from rlhf.models.kept_logits import forward_keeping
from rlhf.models.segments import segment_attention, segment_kwargs


def lm_forward_nll(module: torch.nn.Module, batch: SFTBatch) -> tuple[torch.Tensor, int]:
    """(sum of next-token NLL over target tokens, number of target tokens): the loss of SFT
    and of the PPO-ptx term.

    Only positions whose next token is a target reach the vocabulary projection: it is ~20% of
    a 135M model's FLOPs and its (tokens, vocab) output the largest activation, and prompt and
    padding positions need neither. A model whose head is a `LossHead` (`rlhf.kernels.accelerate`
    with `kernels.fused_lm_loss`) returns its final hidden states, and the head computes the loss
    of the target positions over chunks, without the whole (tokens, vocab) logits; any other
    model gives the logits of those positions to `lm_nll`."""
    targets = batch.labels[:, 1:]
    predicts_target = torch.zeros_like(batch.labels, dtype=torch.bool)
    predicts_target[:, :-1] = targets != IGNORE_INDEX
    target_ids = targets[targets != IGNORE_INDEX]
    inputs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        # A cache would also switch off the packed-sequence mask in transformers.
        use_cache=False,
        **(segment_kwargs(batch.segment_lengths, batch.input_ids.device) if batch.segment_lengths else {}),
    )
    head = loss_head(module)
    # A padding-free row attends once per example: an `sdpa` model is switched for this call.
    attention = segment_attention(causal_lm(module).config) if batch.segment_lengths else contextlib.nullcontext()
    if head is None:
        with attention:
            logits = forward_keeping(module, predicts_target, **inputs).logits  # (target tokens, vocab)
        nll, count = lm_nll(logits, target_ids)
        return nll, int(count)
    # No logits from the forward (an empty selection); the head is then called as a module, so
    # engines that gather its weight around its forward (ZeRO-3) do so.
    nothing = torch.zeros_like(predicts_target)
    with attention:
        hidden = forward_keeping(module, nothing, **inputs, output_hidden_states=True).hidden_states[-1]
    nll = head(hidden[predicts_target], targets=target_ids, weight_gradient_sink=tied_gradient_slot(module, head))
    return nll, int(target_ids.numel())
