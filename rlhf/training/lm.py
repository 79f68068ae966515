"""Language-model training pieces shared by SFT and PPO-ptx: the loss of a micro-batch, the
micro-batch stream with step-exact positions, and evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from rlhf.algorithms.losses import lm_nll
from rlhf.data.sft_dataset import IGNORE_INDEX, SFTBatch, SFTBatches
from rlhf.kernels.fused_head import loss_head, tied_gradient_slot
from rlhf.models.segments import segment_kwargs


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
    if head is None:
        logits = module(**inputs, logits_to_keep=predicts_target).logits  # (target tokens, vocab)
        nll, count = lm_nll(logits, target_ids)
        return nll, int(count)
    # No logits from the forward (an empty selection); the head is then called as a module, so
    # engines that gather its weight around its forward (ZeRO-3) do so.
    nothing = torch.zeros_like(predicts_target)
    hidden = module(**inputs, logits_to_keep=nothing, output_hidden_states=True).hidden_states[-1]
    nll = head(hidden[predicts_target], targets=target_ids, weight_gradient_sink=tied_gradient_slot(module, head))
    return nll, int(target_ids.numel())


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


class LMEvaluation:
    """Held-out loss and perplexity over all workers, for `Run.begin(evaluate=...)`."""

    def __init__(self, module: torch.nn.Module, batches: SFTBatches, world):
        self.module, self.batches, self.world = module, batches, world

    def __call__(self, step: int) -> dict[str, float]:
        nll, tokens = evaluate_lm(self.module, self.batches.epoch(0), self.world.device)
        totals = self.world.all_reduce({"nll": nll, "tokens": tokens}, op="sum")
        loss = totals["nll"] / max(totals["tokens"], 1)
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}
