"""Held-out evaluation of a policy: reward-model score, gold score (when the task has a rule),
KL to the reference, response length and EOS rate. The roles are the plain ones or their Ray
groups (anything with the same methods)."""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import torch

from rlhf.data.prompt_dataset import PromptBatch
from rlhf.errors import UserError
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
    actor,
    reference,
    rewards,
    tokenizer,
    prompts: PromptBatch,
    params: SamplingParams,
    gold_reward: Callable[[str, str], float] | None,
    seed: int,
) -> tuple[dict[str, float], list[dict]]:
    """Sample one answer per held-out prompt with a fixed seed (without disturbing the
    training RNG) and measure it: the run's reward (every source, mixed; `rewards` as
    `RewardSources`), the KL of the distribution sampled from (policy and reference log-probs
    at the sampling temperature; 0 without a reference), length, EOS rate and the gold reward;
    reward-function failures of this evaluation, if any, as eval/function_*. Returns metrics and
    per-sample rows."""
    rollout = actor.generate(list(prompts.ids), params, seed=seed)
    mask = rollout.response_mask
    if reference is not None:
        logprobs = actor.logprobs(rollout, temperature=params.temperature)
        kl = ((logprobs - reference.logprobs(rollout, temperature=params.temperature)) * mask).sum(-1)
    else:
        kl = torch.zeros(mask.shape[0])
    scores, _ = rewards(rollout, prompts.texts, prompts.fields)
    texts = decode_responses(tokenizer, rollout.responses, mask)
    metrics = {
        "eval/reward": float(scores.nanmean()),  # over the samples every reward source could score
        "eval/kl": float(kl.mean()),
        "eval/response_length": float(mask.sum(-1).mean()),
        "eval/eos_rate": float(rollout.eos_found.float().mean()),
    }
    golds = [gold_reward(p, t) for p, t in zip(prompts.texts, texts)] if gold_reward else [None] * len(texts)
    if gold_reward:
        metrics["eval/gold_reward"] = sum(golds) / len(golds)
    if getattr(rewards, "functions", None):  # this evaluation's own failures, kept out of the next training step's count
        failures = rewards.take_failures()
        if any(failures.values()):
            metrics.update({name.replace("reward/", "eval/"): value for name, value in failures.items()})
    rows = [{"prompt": p, "response": t, "reward": float(s), "kl": float(k), "length": int(n), "gold": g}
            for p, t, s, k, n, g in zip(prompts.texts, texts, scores, kl, mask.sum(-1), golds)]
    return metrics, rows


class PolicyEvaluation:
    """The held-out evaluation of a PPO run, for `Run.begin(evaluate=...)`: `samples_per_prompt`
    answers to each of the first `max_prompts` eval prompts, at `eval.temperature` (default: the
    rollout temperature), logged with a table of the first 8 answers."""

    def __init__(self, run, roles, tokenizer, prompts: PromptBatch, params: SamplingParams,
                 gold_reward: Callable[[str, str], float] | None, seed: int):
        self.run, self.roles, self.tokenizer = run, roles, tokenizer
        self.prompts, self.params, self.gold_reward, self.seed = prompts, params, gold_reward, seed

    def __call__(self, step: int) -> dict[str, float]:
        metrics, rows = evaluate_policy(self.roles.actor, self.roles.reference, self.roles.rewards, self.tokenizer,
                                        self.prompts, self.params, self.gold_reward, self.seed)
        self.run.log_table("eval/samples", step, rows[:8])
        return metrics
