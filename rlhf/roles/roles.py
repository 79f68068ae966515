"""The four PPO roles as plain classes (usable without Ray): each holds one model.

Actor and critic train through their Strategy and own their update step; reference and reward
model are frozen. Dropout is off in all four, so log-probs and values of the same tokens are
reproducible. A trained role updates on its share of every global mini-batch
(rlhf/training/ppo.py), so the same experience gives the same update on any number of workers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from rlhf.algorithms.losses import loss_denominator
from rlhf.distributed.strategy import TrainedModel
from rlhf.models.loading import disable_dropout
from rlhf.models.reward import RewardStats, sequence_scores
from rlhf.roles.forward import policy_logprobs, response_values
from rlhf.rollout.decode import DecodeEngine, SampleSeeds
from rlhf.rollout.engine import RolloutEngine, SamplingParams
from rlhf.rollout.types import Experience, Rollout
from rlhf.kernels.lm_loss import lm_forward_nll
from rlhf.roles.update import Means, PolicyLossSettings, actor_loss, critic_loss, mini_batch_shares, ptx_loss


class Actor:
    def __init__(self, trained: TrainedModel, engine: RolloutEngine, temperature: float,
                 loss: PolicyLossSettings, mini_batch_size: int, micro_batch_size: int,
                 aggregation_constant: float | None = None, ptx_coef: float = 0.0,
                 ptx_batch: Callable[[int], object] | None = None):
        """`engine` samples from `trained.module`; `ptx_batch(step)` gives the pretraining
        micro-batch of optimizer step `step` under PPO-ptx."""
        disable_dropout(trained.module)
        self.trained, self.engine, self.temperature = trained, engine, temperature
        self.loss, self.aggregation_constant = loss, aggregation_constant
        self.mini_batch_size, self.micro_batch_size = mini_batch_size, micro_batch_size
        self.ptx_coef, self.ptx_batch = ptx_coef, ptx_batch

    @property
    def strategy(self):
        return self.trained.strategy

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None,
                 sample_ids: Sequence[int] | None = None, sample_count: int | None = None) -> Rollout:
        """Sample one response per prompt. With a seed the randomness depends on it alone (the
        process RNG is left as it was): with the decode engine each prompt's sample depends
        only on (seed, its id in `sample_ids` among `sample_count` samples of the global batch;
        default 0..n-1 of n), so a rollout is the same on any worker layout and after a
        restart; other engines draw from one stream seeded by `seed`."""
        if seed is None:
            return self.engine.generate(prompts, params)
        if isinstance(self.engine, DecodeEngine):
            ids = range(len(prompts)) if sample_ids is None else sample_ids
            return self.engine.generate(prompts, params, seeds=SampleSeeds(seed, ids, sample_count))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.engine.generate(prompts, params)

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, temperature: float | None = None) -> torch.Tensor:
        """(batch, response) log-probs under softmax(logits / T), T the rollout temperature
        unless given."""
        self.trained.module.eval()
        logprobs, _ = policy_logprobs(self.trained.module, rollout, temperature or self.temperature)
        self.trained.module.train()
        return logprobs

    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float,
               step_offset: int) -> dict[str, float]:
        """Clipped policy-gradient steps (plus entropy, in-loss KL and the PPO-ptx LM term), one
        optimizer step per global mini-batch of `orders`, on this worker's share of it.
        `experience` is the global batch; `step_offset` numbers the optimizer steps of the run
        (the PPO-ptx data position). Returns the iteration's statistics over every worker of
        this role (a collective)."""
        strategy, settings = self.strategy, self.loss
        means = Means()
        steps = mini_batch_shares(orders, self.mini_batch_size, self.micro_batch_size, strategy.rank,
                                  strategy.world_size)
        for step, mini_batch in enumerate(steps):
            denominator = loss_denominator(experience.rollout.response_mask[mini_batch.samples], settings.aggregation,
                                           self.aggregation_constant)
            for index in mini_batch.micro_batches:
                part = experience.select(index.to(experience.rollout.sequences.device)).trimmed()
                logprobs, entropy = policy_logprobs(self.trained.module, part.rollout, self.temperature,
                                                    with_entropy=True, entropy_grad=settings.entropy_coef != 0)
                loss, stats = actor_loss(logprobs, entropy, part, kl_coef, settings, denominator)
                strategy.backward(self.trained, loss)
                means.add("ppo/", weight=float(part.rollout.response_mask.sum()), **stats)
            if self.ptx_batch is not None:
                batch = self.ptx_batch(step_offset + step).to(strategy.device)
                nll, tokens = lm_forward_nll(self.trained.module, batch)
                tokens_all = strategy.all_reduce({"n": float(tokens)}, op="sum")["n"]
                strategy.backward(self.trained, ptx_loss(nll, tokens_all, self.ptx_coef))
                means.add(weight=float(tokens), **{"ppo/ptx_loss": float(nll.detach()) / max(tokens, 1)})
            means.add(**{"ppo/actor_grad_norm": strategy.step(self.trained)})
        return means.result(strategy)


class Critic:
    def __init__(self, trained: TrainedModel, value_clip_eps: float | None, mini_batch_size: int,
                 micro_batch_size: int):
        disable_dropout(trained.module)
        self.trained, self.value_clip_eps = trained, value_clip_eps
        self.mini_batch_size, self.micro_batch_size = mini_batch_size, micro_batch_size

    @property
    def strategy(self):
        return self.trained.strategy

    @torch.no_grad()
    def values(self, rollout: Rollout) -> torch.Tensor:
        self.trained.module.eval()
        values = response_values(self.trained.module, rollout)
        self.trained.module.train()
        return values

    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float = 0.0,
               step_offset: int = 0) -> dict[str, float]:
        """Clipped value-loss steps over the same mini-batches as the actor's (token mean over
        each global mini-batch)."""
        strategy = self.strategy
        means = Means()
        for mini_batch in mini_batch_shares(orders, self.mini_batch_size, self.micro_batch_size, strategy.rank,
                                            strategy.world_size):
            tokens = float(experience.rollout.response_mask[mini_batch.samples].sum())
            for index in mini_batch.micro_batches:
                part = experience.select(index.to(experience.rollout.sequences.device)).trimmed()
                values = response_values(self.trained.module, part.rollout)
                loss, stats = critic_loss(values, part, self.value_clip_eps, tokens)
                strategy.backward(self.trained, loss)
                means.add("ppo/", weight=float(part.rollout.response_mask.sum()), **stats)
            means.add(**{"ppo/critic_grad_norm": strategy.step(self.trained)})
        return means.result(strategy)


class Reference:
    def __init__(self, model: torch.nn.Module, temperature: float):
        disable_dropout(model)
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, temperature: float | None = None) -> torch.Tensor:
        return policy_logprobs(self.model, rollout, temperature or self.temperature)[0]


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
