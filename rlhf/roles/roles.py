"""The four PPO roles as plain classes (usable without Ray): each holds one model.

Actor and critic train through their Strategy and own their update step; reference and reward
model are frozen. Dropout is off in all four, so log-probs and values of the same tokens are
reproducible. A trained role updates on its share of every global mini-batch
(rlhf/training/ppo.py), so the same experience gives the same update on any number of workers.

Their scoring forwards (log-probs, values, reward-model scores of a whole rollout) run in pieces
of `forwards.size` rows (`RoleForwards`, ppo.micro_batch_size in PPO), so that the activations
and the (rows, response, vocabulary) logits of that phase are those of one micro-batch however
large the rollout batch is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rlhf.algorithms.losses import loss_denominator
from rlhf.distributed.strategy import TrainedModel
from rlhf.models.engines import reshard_frozen
from rlhf.models.loading import disable_dropout
from rlhf.models.reward import RewardStats
from rlhf.roles.forward import policy_logprobs, response_scores, response_values
from rlhf.rollout.decode import SampleSeeds
from rlhf.rollout.engine import RolloutEngine, SamplingParams
from rlhf.rollout.types import Experience, Rollout
from rlhf.kernels.lm_loss import lm_forward_nll
from rlhf.roles.update import (Means, PhaseTimes, PolicyLossSettings, actor_loss, critic_loss, mini_batch_shares,
                               ptx_loss)


@dataclass(frozen=True)
class RoleForwards:
    """How a role forwards rollout rows: how its scoring forward splits a rollout batch, and
    whether its scoring and training forwards drop the rows' padding. The default, one padded
    forward over the whole batch, is what a caller that builds a role by hand gets; PPO's roles
    get ppo.micro_batch_size, the group size and ppo.padding_free (rlhf/roles/team.py,
    rlhf/ray/role_worker.py)."""

    size: int | None = None
    """Most rows per forward; None: the whole batch in one forward."""
    group: int = 1
    """Consecutive rows that share a prompt (rollout.n_samples_per_prompt). Pieces are cut at
    multiples of it where `size` allows, so that the packed forward (rlhf/roles/forward.py)
    keeps every group behind one copy of its prompt instead of forwarding a split group's
    prompt twice."""
    padding_free: bool = False
    """Forward each piece's rows back to back without their padding where that pays
    (rlhf/roles/forward.py `padding_free_rows`; ppo.padding_free)."""

    def step(self) -> int:
        """Rows per piece: the most whole groups that fit in `size`; `size` itself where one
        group is larger (a split is then unavoidable)."""
        assert self.size is not None
        return self.size // self.group * self.group if self.size >= self.group else self.size

    def slices(self, rows: int, pieces: int | None = None) -> list[slice]:
        """Contiguous row ranges, in order, covering `rows` rows. Their number depends on
        `rows` and the settings alone, so workers with as many rows run as many forwards; with
        `pieces` (at least the natural number) exactly that many, near-equal, in whole groups
        where there are enough (some empty when `rows < pieces`): what a sharded model needs,
        whose forward is a collective (ZeRO-3, FSDP2), when workers hold different row counts."""
        if self.size is None or rows <= self.size:
            natural = [slice(0, rows)]
        else:
            step = self.step()
            natural = [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
        if pieces is None or pieces == len(natural):
            return natural
        if pieces < len(natural):
            raise ValueError(f"{rows} rows need {len(natural)} pieces of at most {self.size}, not {pieces}")
        unit = self.group if rows % self.group == 0 and rows // self.group >= pieces else 1
        base, extra = divmod(rows // unit, pieces)
        bounds = [0]
        for piece in range(pieces):
            bounds.append(bounds[-1] + (base + (1 if piece < extra else 0)) * unit)
        return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def in_pieces(forward: Callable[[Rollout], torch.Tensor], rollout: Rollout, batches: RoleForwards,
              strategy=None) -> torch.Tensor:
    """`forward(rollout)` ((batch,) or (batch, response_length)) computed piece by piece
    (`batches.slices`). Each piece is trimmed of the columns that are padding in all of its
    rows (`Rollout.trimmed`), so a piece of short answers is not as wide as the batch's
    longest; per-token columns past a piece's longest response are 0 (they are off the
    response mask, as the sampler's own log-probs are). Positions come from the attention
    mask: every real token's value is the one the whole-batch forward gives, up to float
    rounding. One piece: the forward on the rollout as it is. With a `strategy` of several
    workers the workers agree on the number of pieces first (a max over them), since their
    forwards are collectives under ZeRO-3 and FSDP2."""
    rows = rollout.sequences.shape[0]
    pieces = None
    if strategy is not None and strategy.world_size > 1:
        natural = len(batches.slices(rows))
        pieces = int(strategy.all_reduce({"pieces": float(natural)}, op="max")["pieces"])
    slices = batches.slices(rows, pieces)
    if len(slices) == 1:
        return forward(rollout)
    width = rollout.response_mask.shape[1]
    device = rollout.sequences.device
    out: torch.Tensor | None = None
    for piece in slices:
        if piece.stop == piece.start:  # more pieces agreed than rows: one row's forward, only to keep in step
            forward(rollout.select(torch.arange(rows - 1, rows, device=device)).trimmed())
            continue
        part = forward(rollout.select(torch.arange(piece.start, piece.stop, device=device)).trimmed())
        if out is None:
            out = part.new_zeros((rows, width) if part.ndim == 2 else (rows,))
        if part.ndim == 2:
            out[piece, : part.shape[1]] = part
        else:
            out[piece] = part
    assert out is not None
    return out


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
        self.forwards = RoleForwards()
        """How `logprobs` splits a rollout (whole, unless the builder of the PPO roles sets it)."""
        self.engine_current = not getattr(engine, "needs_sync", False)
        """The engine samples from the trained weights as they are now. An engine with its own
        copy (vLLM) starts without: the first rollout loads them, whatever the trainer's
        checkpoint, resume or LoRA did to them since the engine was built."""

    @property
    def strategy(self):
        return self.trained.strategy

    def sync_engine(self) -> None:
        """Bring the engine's copy of the weights up to date (a collective where the actor is
        sharded: every worker calls it, through `generate`)."""
        if not self.engine_current:
            self.engine.sync_weights(self.trained.module, self.strategy)
            self.engine_current = True

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None,
                 sample_ids: Sequence[int] | None = None, sample_count: int | None = None) -> Rollout:
        """Sample one response per prompt. With a seed the randomness depends on it alone (the
        process RNG is left as it was): with the decode and vLLM engines each prompt's sample
        depends only on (seed, its id in `sample_ids` among `sample_count` samples of the global
        batch; default 0..n-1 of n), so a rollout is the same on any worker layout and after a
        restart; other engines draw from one stream seeded by `seed`. An engine with its own
        copy of the weights gets the current ones first (`sync_engine`)."""
        self.sync_engine()
        if seed is None:
            return self.engine.generate(prompts, params)
        if self.engine.takes_seeds:
            ids = range(len(prompts)) if sample_ids is None else sample_ids
            return self.engine.generate(prompts, params, seeds=SampleSeeds(seed, ids, sample_count))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.engine.generate(prompts, params)

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, temperature: float | None = None) -> torch.Tensor:
        """(batch, response) log-probs under softmax(logits / T), T the rollout temperature
        unless given; in pieces of `forwards`."""
        temperature = temperature or self.temperature
        self.trained.module.eval()
        try:
            return in_pieces(lambda part: policy_logprobs(self.trained.module, part, temperature,
                                                          padding_free=self.forwards.padding_free)[0],
                             rollout, self.forwards, self.strategy)
        finally:
            self.trained.module.train()

    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float,
               step_offset: int) -> dict[str, float]:
        """Clipped policy-gradient steps (plus entropy, in-loss KL and the PPO-ptx LM term), one
        optimizer step per global mini-batch of `orders`, on this worker's share of it.
        `experience` is the global batch; `step_offset` numbers the optimizer steps of the run
        (the PPO-ptx data position). Returns the iteration's statistics over every worker of
        this role (a collective), with its time per phase (`PhaseTimes`)."""
        strategy, settings = self.strategy, self.loss
        means, clock = Means(), PhaseTimes("actor", strategy.device)
        steps = mini_batch_shares(orders, self.mini_batch_size, self.micro_batch_size, strategy.rank,
                                  strategy.world_size)
        for step, mini_batch in enumerate(steps):
            denominator = loss_denominator(experience.rollout.response_mask[mini_batch.samples], settings.aggregation,
                                           self.aggregation_constant)
            for index in mini_batch.micro_batches:
                with clock.phase("forward_backward"):
                    part = experience.select(index.to(experience.rollout.sequences.device)).trimmed()
                    logprobs, entropy = policy_logprobs(self.trained.module, part.rollout, self.temperature,
                                                        with_entropy=True, entropy_grad=settings.entropy_coef != 0,
                                                        padding_free=self.forwards.padding_free)
                    loss, stats = actor_loss(logprobs, entropy, part, kl_coef, settings, denominator)
                    strategy.backward(self.trained, loss)
                means.add("ppo/", weight=float(part.rollout.response_mask.sum()), **stats)
            if self.ptx_batch is not None:
                with clock.phase("ptx"):
                    batch = self.ptx_batch(step_offset + step).to(strategy.device)
                    nll, tokens = lm_forward_nll(self.trained.module, batch)
                    tokens_all = strategy.all_reduce({"n": float(tokens)}, op="sum")["n"]
                    strategy.backward(self.trained, ptx_loss(nll, tokens_all, self.ptx_coef))
                means.add(weight=float(tokens), **{"ppo/ptx_loss": float(nll.detach()) / max(tokens, 1)})
            with clock.phase("step"):
                grad_norm = strategy.step(self.trained)
            means.add(**{"ppo/actor_grad_norm": grad_norm})
            self.engine_current = not getattr(self.engine, "needs_sync", False)
        means.add(**clock.result())  # once per worker: the mean over the role's workers
        return means.result(strategy)


class Critic:
    def __init__(self, trained: TrainedModel, value_clip_eps: float | None, mini_batch_size: int,
                 micro_batch_size: int):
        disable_dropout(trained.module)
        self.trained, self.value_clip_eps = trained, value_clip_eps
        self.mini_batch_size, self.micro_batch_size = mini_batch_size, micro_batch_size
        self.forwards = RoleForwards()
        """How `values` splits a rollout (whole, unless the builder of the PPO roles sets it)."""

    @property
    def strategy(self):
        return self.trained.strategy

    @torch.no_grad()
    def values(self, rollout: Rollout) -> torch.Tensor:
        """(batch, response) values, in pieces of `forwards`."""
        self.trained.module.eval()
        try:
            return in_pieces(lambda part: response_values(self.trained.module, part, self.forwards.padding_free),
                             rollout, self.forwards, self.strategy)
        finally:
            self.trained.module.train()

    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float = 0.0,
               step_offset: int = 0) -> dict[str, float]:
        """Clipped value-loss steps over the same mini-batches as the actor's (token mean over
        each global mini-batch)."""
        strategy = self.strategy
        means, clock = Means(), PhaseTimes("critic", strategy.device)
        for mini_batch in mini_batch_shares(orders, self.mini_batch_size, self.micro_batch_size, strategy.rank,
                                            strategy.world_size):
            tokens = float(experience.rollout.response_mask[mini_batch.samples].sum())
            for index in mini_batch.micro_batches:
                with clock.phase("forward_backward"):
                    part = experience.select(index.to(experience.rollout.sequences.device)).trimmed()
                    values = response_values(self.trained.module, part.rollout, self.forwards.padding_free)
                    loss, stats = critic_loss(values, part, self.value_clip_eps, tokens)
                    strategy.backward(self.trained, loss)
                means.add("ppo/", weight=float(part.rollout.response_mask.sum()), **stats)
            with clock.phase("step"):
                grad_norm = strategy.step(self.trained)
            means.add(**{"ppo/critic_grad_norm": grad_norm})
        means.add(**clock.result())  # once per worker: the mean over the role's workers
        return means.result(strategy)


class Reference:
    def __init__(self, model: torch.nn.Module, temperature: float, forwards: RoleForwards | None = None,
                 world=None):
        """`world`: the workers that score together; where it shards `model` its forwards are
        collectives, and the workers agree on their number (`in_pieces`)."""
        disable_dropout(model)
        model.eval()  # not chained: a DeepSpeed engine's eval() returns None
        self.model = model.requires_grad_(False)
        self.temperature = temperature
        self.forwards = forwards or RoleForwards()
        self.world = world

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, temperature: float | None = None) -> torch.Tensor:
        """(batch, response) log-probs under softmax(logits / T), in pieces of `forwards`."""
        temperature = temperature or self.temperature
        try:
            return in_pieces(lambda part: policy_logprobs(self.model, part, temperature,
                                                          padding_free=self.forwards.padding_free)[0],
                             rollout, self.forwards, self.world)
        finally:
            reshard_frozen(self.model)


class RewardModel:
    def __init__(self, model: torch.nn.Module, stats: RewardStats | None, forwards: RoleForwards | None = None,
                 world=None):
        """`world` as for `Reference`."""
        disable_dropout(model)
        model.eval()  # not chained: a DeepSpeed engine's eval() returns None
        self.model = model.requires_grad_(False)
        self.stats = stats
        self.forwards = forwards or RoleForwards()
        self.world = world

    @torch.no_grad()
    def scores(self, rollout: Rollout) -> torch.Tensor:
        """(batch,) raw scores, read at the last response token (EOS, or the last token of a
        truncated response), never at padding; in pieces of `forwards`."""
        try:
            return in_pieces(lambda part: response_scores(self.model, part, self.forwards.padding_free), rollout,
                             self.forwards, self.world)
        finally:
            reshard_frozen(self.model)
