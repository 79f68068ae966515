"""Language-model training pieces shared by SFT and PPO-ptx: the micro-batch stream with
step-exact positions, the token-normalised loss, and evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from rlhf.data.sft_dataset import IGNORE_INDEX, SFTBatch, SFTBatches
from rlhf.models.fused_head import head_loss_targets
from rlhf.models.segments import segment_kwargs


def lm_forward_nll(module: torch.nn.Module, batch: SFTBatch) -> tuple[torch.Tensor, int]:
    """(sum of next-token NLL over target tokens, number of target tokens).

    Logits are computed only at positions whose next token is a target: the vocabulary
    projection is ~20% of a 135M model's FLOPs and its (tokens, vocab) output the largest
    activation, and prompt and padding positions need neither. A head set up by
    `use_fused_head_loss` computes the loss itself over chunks of those positions, without
    the whole (tokens, vocab) logits."""
    targets = batch.labels[:, 1:]
    predicts_target = torch.zeros_like(batch.labels, dtype=torch.bool)
    predicts_target[:, :-1] = targets != IGNORE_INDEX
    target_ids = targets[targets != IGNORE_INDEX]
    with head_loss_targets(module, target_ids) as head_computes_loss:
        output = module(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            # A cache would also switch off the packed-sequence mask in transformers.
            use_cache=False,
            logits_to_keep=predicts_target,
            **(segment_kwargs(batch.segment_lengths, batch.input_ids.device) if batch.segment_lengths else {}),
        ).logits  # (target tokens, vocab) in row-major order of the mask, or their summed NLL
    if head_computes_loss:  # rlhf/models/fused_head.py
        return output, int(target_ids.numel())
    nll = torch.nn.functional.cross_entropy(output.float(), target_ids, reduction="sum")
    return nll, int(output.shape[0])


@dataclass
class StepPlan:
    """How the global batch is cut: every optimizer step consumes `accumulation * world_size`
    micro-batches of the epoch stream, worker r taking every world_size-th of them."""

    micro_batches_per_epoch: int
    accumulation: int
    world_size: int

    @property
    def micro_batches_per_step(self) -> int:
        return self.accumulation * self.world_size

    def total_steps(self, epochs: int, max_steps: int) -> int:
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(epochs * self.micro_batches_per_epoch / self.micro_batches_per_step))


def step_micro_batches(batches: SFTBatches, plan: StepPlan, step: int, rank: int) -> list[SFTBatch]:
    """The micro-batches worker `rank` trains on at optimizer step `step` (0-based). Depends
    only on (step, rank), so a resumed run continues at exactly the same data."""
    start = step * plan.micro_batches_per_step
    per_epoch = plan.micro_batches_per_epoch
    return [
        batches.batch(g // per_epoch, g % per_epoch)
        for g in (start + a * plan.world_size + rank for a in range(plan.accumulation))
    ]


@torch.no_grad()
def evaluate_lm(module: torch.nn.Module, batches: Iterator[SFTBatch], device: torch.device) -> tuple[float, int]:
    """(total NLL, total target tokens) over `batches`."""
    was_training = module.training
    module.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        nll, n = lm_forward_nll(module, batch.to(device))
        total += float(nll)
        tokens += n
    module.train(was_training)
    return total, tokens
