"""The reward both sides of benchmarks/grpo.py score answers with: a rule in plain Python,
cheap, deterministic, and different between the samples of one prompt, so that GRPO's groups
carry a signal. Ours names it `reward_rule:prompt_overlap` (`reward.functions`; the reward
workers get the benchmark's `sys.path`, which holds this directory); TRL's peer imports it and
calls it from its reward function (benchmarks/peers/trl_grpo.py)."""

from __future__ import annotations


def prompt_overlap(prompt: str, response: str, **fields) -> float:
    """Share of the response's distinct words (case-folded) that also occur in the prompt;
    0 for an empty response."""
    words = set(response.casefold().split())
    return len(words & set(prompt.casefold().split())) / len(words) if words else 0.0
