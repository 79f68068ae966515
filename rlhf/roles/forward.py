"""Forward passes over a rollout's sequences, returning per-token tensors of the response
region (see rlhf/rollout/types.py for the alignment)."""

from __future__ import annotations

import torch

from rlhf.algorithms import entropy_from_logits, token_logprobs
from rlhf.models.positions import position_ids_from_mask
from rlhf.models.reward import token_values
from rlhf.rollout.types import Rollout


def response_logits(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """(batch, response_length, vocab) logits that predicted each response token; only the
    response region's logits are computed (logits_to_keep)."""
    response_length = rollout.response_mask.shape[1]
    logits = model(
        input_ids=rollout.sequences,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids_from_mask(rollout.attention_mask),
        use_cache=False,
        logits_to_keep=response_length + 1,
    ).logits
    return logits[:, :-1]


def policy_logprobs(
    model: torch.nn.Module, rollout: Rollout, temperature: float, with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the sampled response tokens under softmax(logits / temperature), the
    distribution the sampler drew them from; optionally the per-token entropy, differentiable
    only with `entropy_grad` (as a logged statistic its backward through the vocabulary-wide
    softmax would cost a sizeable share of the actor's step for nothing)."""
    logits = response_logits(model, rollout)
    logprobs = token_logprobs(logits, rollout.responses, temperature)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits.float() / temperature)
    return logprobs, entropy


def response_values(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """(batch, response_length) critic values V(s) of the state before each response token."""
    values = token_values(model, rollout.sequences, rollout.attention_mask)
    start = rollout.prompt_length - 1
    return values[:, start : start + rollout.response_mask.shape[1]]
