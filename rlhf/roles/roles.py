"""The four PPO roles as plain classes (usable without Ray): each holds one model.

Actor and critic train through the shared Strategy; reference and reward model are frozen.
Dropout is off in all four, so log-probs and values of the same tokens are reproducible.
"""

from __future__ import annotations

import torch

from rlhf.distributed.strategy import TrainedModel
from rlhf.models.loading import disable_dropout
from rlhf.models.reward import RewardStats, sequence_scores
from rlhf.roles.forward import policy_logprobs, response_values
from rlhf.rollout.decode import DecodeEngine
from rlhf.rollout.engine import HFGenerateEngine, SamplingParams
from rlhf.rollout.types import Rollout


class Actor:
    def __init__(self, trained: TrainedModel, eos_token_id: int, pad_token_id: int, temperature: float,
                 generate_batch_size: int, engine: str = "decode"):
        disable_dropout(trained.module)
        self.trained = trained
        self.temperature = temperature
        engine_class = DecodeEngine if engine == "decode" else HFGenerateEngine
        self.engine = engine_class(self.generation_model, eos_token_id, pad_token_id, generate_batch_size)

    @property
    def generation_model(self) -> torch.nn.Module:
        module = self.trained.module
        return getattr(module, "module", module)  # engines wrap the HF model as .module

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None) -> Rollout:
        """Sample one response per prompt. With a seed the sampler's randomness depends on it
        alone (and the process RNG is left as it was), so a rollout is reproducible on any
        worker layout and after a restart."""
        if seed is None:
            return self.engine.generate(prompts, params)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.engine.generate(prompts, params)

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        self.trained.module.eval()
        logprobs, _ = policy_logprobs(self.trained.module, rollout, self.temperature)
        self.trained.module.train()
        return logprobs


class Critic:
    def __init__(self, trained: TrainedModel):
        disable_dropout(trained.module)
        self.trained = trained

    @torch.no_grad()
    def values(self, rollout: Rollout) -> torch.Tensor:
        self.trained.module.eval()
        values = response_values(self.trained.module, rollout)
        self.trained.module.train()
        return values


class Reference:
    def __init__(self, model: torch.nn.Module, temperature: float):
        disable_dropout(model)
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        return policy_logprobs(self.model, rollout, self.temperature)[0]


class RewardModel:
    def __init__(self, model: torch.nn.Module, stats: RewardStats | None):
        disable_dropout(model)
        self.model = model.eval().requires_grad_(False)
        self.stats = stats

    @torch.no_grad()
    def scores(self, rollout: Rollout) -> torch.Tensor:
        """(batch,) raw scores, read at the last response token (EOS, or the last token of a
        truncated response), never at padding."""
        return sequence_scores(self.model, rollout.sequences, rollout.attention_mask)
