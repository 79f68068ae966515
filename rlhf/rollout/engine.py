"""Rollout engines: sample responses for a batch of prompts.

`HFGenerateEngine` uses transformers' `generate` (KV cache, left padding). A vLLM engine for
GPU deployments would implement the same `generate` and return the same `Rollout`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import GenerationConfig

from rlhf.rollout.types import Rollout


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def finish_rollout(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> Rollout:
    """Cut every response after its first EOS (kept), pad the rest, and build the masks."""
    is_eos = responses == eos_token_id
    eos_found = is_eos.any(dim=-1)
    first_eos = torch.where(eos_found, is_eos.float().argmax(dim=-1), torch.full_like(eos_found, responses.shape[1] - 1, dtype=torch.long))
    positions = torch.arange(responses.shape[1], device=responses.device)
    response_mask = (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).float()
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad_token_id))
    return Rollout(
        sequences=torch.cat([prompt_ids, responses], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        prompt_length=prompt_ids.shape[1],
        response_mask=response_mask,
        eos_found=eos_found,
    )


class RolloutEngine(ABC):
    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, batch_size: int = 32):
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size  # prompts generated together

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        """Sample one response per prompt (token ids, no padding) and return the rollout."""


class HFGenerateEngine(RolloutEngine):
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        device = next(self.model.parameters()).device
        parts = [self._generate(prompts[i : i + self.batch_size], params, device)
                 for i in range(0, len(prompts), self.batch_size)]
        return concat_rollouts(parts, self.pad_token_id)

    def _generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, device: torch.device) -> Rollout:
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        was_training = self.model.training
        self.model.eval()
        # A fresh GenerationConfig: a checkpoint's own defaults (top_k=50, repetition
        # penalties, ...) would make the sampler differ from the distribution PPO scores.
        config = GenerationConfig(
            do_sample=True,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        self.model.train(was_training)
        return finish_rollout(prompt_ids, prompt_mask, out[:, prompt_ids.shape[1] :], self.eos_token_id, self.pad_token_id)


def concat_rollouts(parts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """Join rollouts of different prompt/response widths (left-pad prompts, right-pad responses)."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.prompt_length for p in parts)
    response_width = max(p.response_mask.shape[1] for p in parts)
    seqs, masks, response_masks, logprobs = [], [], [], []
    for part in parts:
        left = prompt_width - part.prompt_length
        right = response_width - part.response_mask.shape[1]
        seqs.append(torch.nn.functional.pad(part.sequences, (left, right), value=pad_token_id))
        masks.append(torch.nn.functional.pad(part.attention_mask, (left, right), value=0))
        response_masks.append(torch.nn.functional.pad(part.response_mask, (0, right), value=0.0))
        if part.logprobs is not None:
            logprobs.append(torch.nn.functional.pad(part.logprobs, (0, right), value=0.0))
    return Rollout(torch.cat(seqs), torch.cat(masks), prompt_width, torch.cat(response_masks),
                   torch.cat([p.eos_found for p in parts]),
                   torch.cat(logprobs) if len(logprobs) == len(parts) else None)
