"""Reward-model training pieces: the K-wise loss of a micro-batch and evaluation."""

from __future__ import annotations

from typing import Iterable

import torch

from rlhf.algorithms import kwise_ranking_loss
from rlhf.config import RewardLossConfig
from rlhf.data.rank_dataset import RankBatch
from rlhf.models.reward import RewardStats, sequence_scores, shared_prefix_scores


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
