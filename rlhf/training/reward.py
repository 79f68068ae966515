"""Reward-model training pieces: the K-wise loss of a micro-batch, a step, evaluation and the
best-model export."""

from __future__ import annotations

from typing import Iterable

import torch

from rlhf.algorithms import kwise_ranking_loss
from rlhf.config import RewardLossConfig
from rlhf.data.rank_dataset import RankBatch, RankBatches
from rlhf.logging.tables import rm_eval_rows
from rlhf.models.reward import REWARD_STATS_FILE, RewardStats, sequence_scores, shared_prefix_scores


def rank_scores(model: torch.nn.Module, batch: RankBatch) -> torch.Tensor:
    """(answers,) score of every answer in the micro-batch, in either layout."""
    if batch.shares_prompts:
        return shared_prefix_scores(model, batch.input_ids, batch.segment_ids, batch.position_ids, batch.score_index)
    return sequence_scores(model, batch.input_ids, batch.attention_mask)


def rank_loss(
    model: torch.nn.Module, batch: RankBatch, cfg: RewardLossConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Score the K answers of every prompt (one forward pass over the micro-batch) and
    compare all their pairs. Returns (loss averaged over the micro-batch's prompts, scores,
    stats)."""
    scores = rank_scores(model, batch)
    loss, stats = kwise_ranking_loss(
        scores,
        batch.pair_index,
        batch.pair_group,
        batch.num_prompts,
        margin=batch.pair_margin if cfg.use_margin else None,
        center_coef=cfg.center_coef,
    )
    return loss, scores, stats


@torch.no_grad()
def evaluate_rm(
    model: torch.nn.Module, batches: Iterable[RankBatch], cfg: RewardLossConfig, device: torch.device
) -> tuple[dict[str, float], torch.Tensor]:
    """Eval metrics (loss, pairwise accuracy, mean margin, score mean/std) and every score."""
    was_training = model.training
    model.eval()
    loss_sum, prompts, pairs, correct, margin_sum = 0.0, 0, 0, 0.0, 0.0
    all_scores = []
    for batch in batches:
        batch = batch.to(device)
        loss, scores, _ = rank_loss(model, batch, cfg)
        diff = scores[batch.pair_index[:, 0]] - scores[batch.pair_index[:, 1]]
        loss_sum += float(loss) * batch.num_prompts
        prompts += batch.num_prompts
        pairs += diff.numel()
        correct += float((diff > 0).sum())
        margin_sum += float(diff.sum())
        all_scores.append(scores.cpu())
    model.train(was_training)
    scores = torch.cat(all_scores) if all_scores else torch.zeros(0)
    metrics = {
        "loss": loss_sum / max(prompts, 1),
        "accuracy": correct / max(pairs, 1),
        "margin": margin_sum / max(pairs, 1),
        "score_mean": float(scores.mean()) if scores.numel() else 0.0,
        "score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
        "pairs": float(pairs),
    }
    return metrics, scores


def reward_stats(scores: torch.Tensor) -> RewardStats:
    return RewardStats(float(scores.mean()), float(scores.std()) if scores.numel() > 1 else 1.0, int(scores.numel()))


def rank_step(trained, batches: list[RankBatch], loss_cfg: RewardLossConfig, strategy) -> dict[str, float]:
    """One optimizer step over this worker's micro-batches, every prompt of the global batch
    weighing the same; the step's metrics over all workers."""
    step_prompts = strategy.all_reduce({"prompts": sum(b.num_prompts for b in batches)}, op="sum")["prompts"]
    sums = {"loss": 0.0, "correct": 0.0, "pairs": 0.0, "margin": 0.0, "score": 0.0, "score_sq": 0.0, "answers": 0.0}
    for batch in batches:
        loss, scores, _ = rank_loss(trained.module, batch, loss_cfg)
        strategy.backward(trained, loss * batch.num_prompts / step_prompts)
        scores = scores.detach()
        diff = scores[batch.pair_index[:, 0]] - scores[batch.pair_index[:, 1]]
        sums["loss"] += float(loss.detach()) * batch.num_prompts
        sums["correct"] += float((diff > 0).sum())
        sums["pairs"] += diff.numel()
        sums["margin"] += float(diff.sum())
        sums["score"] += float(scores.sum())
        sums["score_sq"] += float(scores.pow(2).sum())
        sums["answers"] += scores.numel()
    lr = trained.lr
    grad_norm = strategy.step(trained)
    totals = strategy.all_reduce(sums, op="sum")
    mean = totals["score"] / max(totals["answers"], 1)
    return {
        "rm/loss": totals["loss"] / step_prompts,
        "rm/accuracy": totals["correct"] / max(totals["pairs"], 1),
        "rm/margin": totals["margin"] / max(totals["pairs"], 1),
        "rm/score_mean": mean,
        "rm/score_std": max(totals["score_sq"] / max(totals["answers"], 1) - mean**2, 0.0) ** 0.5,
        "rm/lr": lr,
        "rm/grad_norm": grad_norm,
        "rm/pairs": totals["pairs"],
    }


class BestRewardModel:
    """Evaluation for `Run.begin(evaluate=...)` that keeps the best model: each evaluation
    logs a table of scored eval answers and, when the held-out pairwise accuracy is the best so
    far, exports the model with its eval score statistics (reward_stats.json, which PPO uses to
    normalise rewards). Its state (the best accuracy and row) goes into checkpoints."""

    def __init__(self, run, trained, batches: RankBatches, loss_cfg: RewardLossConfig, tokenizer, records):
        self.run, self.trained, self.batches, self.loss_cfg = run, trained, batches, loss_cfg
        self.tokenizer, self.records = tokenizer, records
        self.best_accuracy = -1.0
        self.best: dict[str, float] = {}

    def __call__(self, step: int) -> dict[str, float]:
        metrics, scores = evaluate_rm(self.trained.module, self.batches.epoch(0), self.loss_cfg, self.run.device)
        row = {f"eval/{k}": v for k, v in metrics.items()}
        if step == 0:  # the untrained head: a baseline, never the exported model
            return row
        self.run.log_table("eval/rm_samples", step, rm_eval_rows(self.records, scores))
        if row["eval/accuracy"] > self.best_accuracy:
            self.best_accuracy, self.best = row["eval/accuracy"], dict(row, best_step=step)
            self.run.export(self.trained, self.tokenizer, "model",
                            {REWARD_STATS_FILE: reward_stats(scores).__dict__, "rlhf_summary.json": self.best})
        return row

    def state_dict(self) -> dict:
        return {"best_accuracy": self.best_accuracy, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best_accuracy, self.best = float(state["best_accuracy"]), dict(state["best"])
