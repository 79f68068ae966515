"""Example rows for the sample tables: RM eval pairs with their scores, PPO rollouts with
their reward, KL and length. Each function returns a handful of plain dicts for
`MetricsWriter.log_table`."""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf.data.records import RankRecord
from rlhf.rollout.types import Experience


def rm_eval_rows(records: Sequence[RankRecord], scores: torch.Tensor, limit: int = 8) -> list[dict]:
    """The first `limit` held-out prompts: the best- and worst-ranked answer and the scores the
    reward model gave them. `scores` holds every answer's score in record order (what
    `evaluate_rm` returns for unshuffled eval batches)."""
    rows, offset = [], 0
    for record in records:
        k = len(record.responses)
        if len(rows) == limit or offset + k > len(scores):
            break
        chosen = max(range(k), key=lambda i: record.scores[i])
        rejected = min(range(k), key=lambda i: record.scores[i])
        chosen_score, rejected_score = float(scores[offset + chosen]), float(scores[offset + rejected])
        rows.append({
            "prompt": record.prompt[-1].content,
            "chosen": record.responses[chosen],
            "rejected": record.responses[rejected],
            "chosen_score": chosen_score,
            "rejected_score": rejected_score,
            "margin": chosen_score - rejected_score,
            "answers": k,
        })
        offset += k
    return rows


@torch.no_grad()
def rollout_rows(tokenizer, experience: Experience, limit: int = 8) -> list[dict]:
    """The first `limit` samples of a PPO rollout: prompt and response text, the raw reward-model
    score, the summed log-ratio KL to the reference (nats), the response length in tokens and
    whether it ended with EOS."""
    rollout = experience.rollout
    mask = rollout.response_mask
    kl = ((experience.logprobs - experience.ref_logprobs) * mask).sum(-1)
    prompt_mask = rollout.attention_mask[:, : rollout.prompt_length].bool()
    rows = []
    for i in range(min(limit, rollout.sequences.shape[0])):
        length = int(mask[i].sum())
        prompt_ids = rollout.sequences[i, : rollout.prompt_length][prompt_mask[i]]
        rows.append({
            "prompt": tokenizer.decode(prompt_ids.tolist(), skip_special_tokens=True).strip(),
            "response": tokenizer.decode(rollout.responses[i, :length].tolist(), skip_special_tokens=True).strip(),
            "reward": float(experience.scores[i]),
            "kl": float(kl[i]),
            "length": length,
            "eos": bool(rollout.eos_found[i]),
        })
    return rows
