"""Held-out evaluation of a policy: reward-model score, gold score (when the task has a rule),
KL to the reference, response length and EOS rate."""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import torch

from rlhf.errors import UserError
from rlhf.roles.roles import Actor, Reference, RewardModel
from rlhf.rollout.engine import SamplingParams


def load_gold_reward(spec: str | None) -> Callable[[str, str], float] | None:
    """"module:function" -> the function."""
    if not spec:
        return None
    module_name, _, function = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"eval.gold_reward={spec!r}: cannot import it ({exc})") from None


def decode_responses(tokenizer, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True).strip()
            for row, n in zip(responses, mask.sum(-1))]


@torch.no_grad()
def evaluate_policy(
    actor: Actor,
    reference: Reference,
    reward_model: RewardModel,
    tokenizer,
    prompts: Sequence[list[int]],
    prompt_texts: Sequence[str],
    params: SamplingParams,
    gold_reward: Callable[[str, str], float] | None,
    seed: int,
) -> tuple[dict[str, float], list[dict]]:
    """Sample one answer per held-out prompt with a fixed seed (without disturbing the
    training RNG) and measure it. Returns metrics and per-sample rows."""
    rollout = actor.generate(list(prompts), params, seed=seed)
    mask = rollout.response_mask
    logprobs = actor.logprobs(rollout)
    ref_logprobs = reference.logprobs(rollout)
    kl = ((logprobs - ref_logprobs) * mask).sum(-1)
    scores = reward_model.scores(rollout)
    texts = decode_responses(tokenizer, rollout.responses, mask)
    metrics = {
        "eval/reward": float(scores.mean()),
        "eval/kl": float(kl.mean()),
        "eval/response_length": float(mask.sum(-1).mean()),
        "eval/eos_rate": float(rollout.eos_found.float().mean()),
    }
    golds = [gold_reward(p, t) for p, t in zip(prompt_texts, texts)] if gold_reward else [None] * len(texts)
    if gold_reward:
        metrics["eval/gold_reward"] = sum(golds) / len(golds)
    rows = [{"prompt": p, "response": t, "reward": float(s), "kl": float(k), "length": int(n), "gold": g}
            for p, t, s, k, n, g in zip(prompt_texts, texts, scores, kl, mask.sum(-1), golds)]
    return metrics, rows
