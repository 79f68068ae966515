"""What `rlhf eval` measures with a policy's own weights: seeded samples from the decode
engine, the KL of those samples to a reference model, and perplexity on plain text. One
process on one device (`pick_device`): each model is loaded whole, nothing is sharded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf.algorithms import token_logprobs
from rlhf.models.positions import position_ids_from_mask
from rlhf.roles.evaluate import decode_responses
from rlhf.roles.forward import policy_logprobs
from rlhf.rollout.decode import DecodeEngine, SampleSeeds
from rlhf.rollout.engine import SamplingParams, left_pad
from rlhf.rollout.types import Rollout


@dataclass
class Answers:
    rollout: Rollout
    texts: list[str]

    @property
    def lengths(self) -> torch.Tensor:
        """(batch,) answer tokens, EOS included."""
        return self.rollout.response_mask.sum(-1)

    @property
    def eos_found(self) -> torch.Tensor:
        return self.rollout.eos_found


@torch.no_grad()
def sample_answers(model: torch.nn.Module, tokenizer, prompt_ids: Sequence[list[int]], params: SamplingParams,
                   seed: int, batch_size: int, llama_step: bool = True) -> Answers:
    """One answer per prompt from the decode engine; answer i depends only on (seed, i), so two
    models sampled with one seed draw with the same random numbers (a paired comparison)."""
    engine = DecodeEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, batch_size, llama_step=llama_step)
    rollout = engine.generate(list(prompt_ids), params, seeds=SampleSeeds(seed, range(len(prompt_ids))))
    return Answers(rollout, decode_responses(tokenizer, rollout.responses, rollout.response_mask))


@torch.no_grad()
def answer_kl(policy: torch.nn.Module, reference: torch.nn.Module, rollout: Rollout, temperature: float,
              batch_size: int) -> torch.Tensor:
    """(batch,) log π(y|x) - log π_ref(y|x) of each sampled answer: the per-token log-ratio at
    the sampling temperature summed over the answer; its mean over samples from π estimates
    KL(π || π_ref) in nats per answer."""
    out = []
    for start in range(0, rollout.sequences.shape[0], batch_size):
        part = rollout.select(torch.arange(start, min(start + batch_size, rollout.sequences.shape[0]),
                                           device=rollout.sequences.device))
        ratio = policy_logprobs(policy, part, temperature)[0] - policy_logprobs(reference, part, temperature)[0]
        out.append((ratio.float() * part.response_mask).sum(-1))
    return torch.cat(out).cpu()


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> float:
    """exp(mean next-token NLL) over every token of the texts, each closed by EOS as the
    PPO-ptx term trains on them (rlhf/data/sft_dataset.py `encode_text`)."""
    device = next(model.parameters()).device
    nll = tokens = 0.0
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1] + [tokenizer.eos_token_id]
               for t in texts]
    for start in range(0, len(encoded), batch_size):
        ids, mask = left_pad(encoded[start : start + batch_size], tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=False).logits
        logprobs = token_logprobs(logits[:, :-1].float(), ids[:, 1:])
        targets = mask[:, 1:] * mask[:, :-1]  # a token is predicted only from a real one
        nll -= float((logprobs * targets).sum())
        tokens += float(targets.sum())
    return float(torch.exp(torch.tensor(nll / max(tokens, 1.0))))
