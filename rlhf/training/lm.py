"""Language-model training pieces of the SFT stage: the micro-batch stream with step-exact
positions, and evaluation (the loss of a micro-batch is `rlhf.kernels.lm_loss.lm_forward_nll`,
which PPO-ptx shares)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from rlhf.data.sft_dataset import SFTBatch, SFTBatches
from rlhf.kernels.lm_loss import lm_forward_nll


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
