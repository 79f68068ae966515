"""Rollout engines: sample responses for a batch of prompts.

`HFGenerateEngine` uses transformers' `generate` (KV cache, left padding). A vLLM engine for
GPU deployments would implement the same `generate` and return the same `Rollout`.

Sharded models (ZeRO-3, FSDP2): by default (`gather_weights`, rollout.gather_weights) the
strategy gathers the whole weights once for a `generate` call, whose forwards are then local
to each rank. Otherwise they gather their weights inside every forward (every decode step), so
every rank must run the same number of forwards, whatever its prompt count and however early
its rows end. Either way the engines go through the run's `World` (the strategy), never
through `torch.distributed` directly: the strategy gathers and reduces on its own device,
which NCCL requires to be the rank's GPU.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ContextManager, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist
from transformers import GenerationConfig

from rlhf.models.engines import is_whole
from rlhf.rollout.types import Rollout


class Collective(Protocol):
    """What an engine needs from the run's `World` (rlhf/distributed/strategy.py): a reduction
    of scalar flags over the ranks, done on the device of the strategy's process group, and
    the model's weights gathered whole for a rollout. Structural, so that rollout/ does not
    import distributed/."""

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]: ...

    def gathered_for_generation(self, model: torch.nn.Module) -> ContextManager[bool]: ...


def is_sharded(model: torch.nn.Module) -> bool:
    """Parameters partitioned over ranks (ZeRO-3, FSDP2): forwards are collective.

    FSDP2 is recognised by its modules, not by its parameters: it swaps a module's DTensor
    shards for plain tensors while they are gathered, and the root's stay gathered after a
    forward under no_grad, so after one rollout the first parameter looks whole."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(module, FSDPModule) for module in model.modules()):
        return True
    return not all(is_whole(param) for param in model.parameters())


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


def empty_rollout(with_logprobs: bool) -> Rollout:
    """A rollout of no rows: a rank given no prompts still joins the others' forwards, and
    returns this instead of failing after them."""
    return Rollout(sequences=torch.empty((0, 0), dtype=torch.long), attention_mask=torch.empty((0, 0), dtype=torch.long),
                   prompt_length=0, response_mask=torch.empty((0, 0)), eos_found=torch.empty(0, dtype=torch.bool),
                   logprobs=torch.empty((0, 0)) if with_logprobs else None)


class RolloutEngine(ABC):
    takes_seeds = False
    """`generate` takes `seeds` (a SampleSeeds): each sample depends on its seed and id alone."""
    needs_sync = False
    """The engine keeps its own copy of the weights: `sync_weights(model, world)` must bring the
    trainer's after every update (vLLM); otherwise it samples from the trained module itself."""

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, batch_size: int = 32,
                 world: Collective | None = None, gather_weights: bool = True):
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size  # prompts generated together
        self.world = world
        """The run's world (the strategy): gathers a sharded model's weights for a rollout, or
        keeps ranks in step. None for an engine used by one process alone."""
        self.gather_weights = gather_weights
        """Sharded weights gathered whole once per `generate` call (rollout.gather_weights);
        otherwise every forward gathers them again, and ranks run forwards in step."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        """Sample one response per prompt (token ids, no padding) and return the rollout."""

    # -- sharded weights: gathered for the call, or ranks kept in step ----------------------
    def _whole_weights(self) -> ContextManager[bool]:
        """The weights held whole for one `generate` call where the engine gathers them (yields
        whether that happened: then forwards are local, and ranks need not stay in step)."""
        if not self.gather_weights or self.world is None:
            return nullcontext(False)
        return self.world.gathered_for_generation(self.model)

    def _synced(self) -> bool:
        """Whether this rank's forwards are collective (sharded weights), so that it must run
        as many as every other rank. A sharded model needs the world to agree on that count."""
        if not is_sharded(self.model):
            return False
        if self.world is None:
            raise RuntimeError(
                f"{type(self).__name__}: the model's weights are sharded over ranks, so every rank must run the "
                "same forwards; build the engine with the run's world (world=strategy) to keep them in step")
        return True

    def _any_rank(self, local: bool) -> bool:
        """Whether the flag is set on any rank (a collective: every rank calls it together)."""
        return self.world.all_reduce({"flag": 1.0 if local else 0.0}, op="max")["flag"] > 0

    def _batch_count(self, prompt_count: int, synced: bool) -> int:
        """Batches to run: this rank's own, or under sharding the most any rank has (a rank
        that runs out joins the others' batches with idle forwards)."""
        local = -(-prompt_count // self.batch_size)
        if not synced:
            return local
        return int(self.world.all_reduce({"batches": float(local)}, op="max")["batches"])


class HFGenerateEngine(RolloutEngine):
    """Sampling with transformers' `generate`, with exactly the given `SamplingParams`.

    `generate` merges three layers (transformers 5.x, `GenerationMixin._prepare_generation_config`
    in generation/utils.py): the `generation_config` argument, then every field it leaves unset
    (`None`) filled from the model's own `model.generation_config` (a checkpoint's
    generation_config.json: repetition_penalty, min_p, no_repeat_ngram_size, suppress_tokens,
    min_new_tokens, typical_p, ...), then transformers' global defaults. PPO scores the samples
    with plain softmax(logits / temperature), so any of the checkpoint's filters would make the
    sampler differ from the distribution the ratio assumes. During each call the model-level
    config is therefore replaced by one holding our settings only (and restored afterwards,
    also on errors): what is left unset falls through to the global defaults, which are the
    neutral values (no penalty, no filter), and `top_k=0` is passed explicitly so that it
    means "no top-k" rather than the global default of 50.
    """

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        """Sample one response per prompt. Under sharding (ZeRO-3, FSDP2) without gathered
        weights `generate` runs with `synced_gpus=True`, so a rank whose rows have all ended
        keeps running forwards until every rank's have; a rank with fewer batches than another
        runs a throw-away one-prompt `generate` for each missing batch, which joins the others'
        forwards the same way."""
        device = next(self.model.parameters()).device
        parts = []
        with self._whole_weights() as whole:
            synced = not whole and self._synced()
            for index in range(self._batch_count(len(prompts), synced)):
                batch = prompts[index * self.batch_size : (index + 1) * self.batch_size]
                if batch:
                    parts.append(self._generate(batch, params, device, synced))
                else:  # only when kept in step: the other ranks still have prompts
                    self._generate([[self.eos_token_id]], params, device, synced)
        if not parts:
            return empty_rollout(with_logprobs=False)
        return concat_rollouts(parts, self.pad_token_id)

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        return GenerationConfig(
            do_sample=True,
            temperature=params.temperature,
            top_k=params.top_k,  # 0: no top-k (the global default would be 50)
            top_p=params.top_p,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

    def _generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, device: torch.device,
                  synced: bool) -> Rollout:
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        config = self._generation_config(params)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._model_generation_config(self.model, config):
                # Explicit either way: transformers guesses ZeRO-3 from a global HfDeepSpeedConfig,
                # which need not describe this model. Its synced loop reduces its flag on the
                # inputs' device, the rank's own.
                out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                                          synced_gpus=synced)
        finally:
            self.model.train(was_training)
        return finish_rollout(prompt_ids, prompt_mask, out[:, prompt_ids.shape[1] :], self.eos_token_id, self.pad_token_id)

    @staticmethod
    @contextmanager
    def _model_generation_config(model: torch.nn.Module, config: GenerationConfig) -> Iterator[None]:
        """Make `config` the model-level `generation_config` of `model` and of every submodule that
        holds its own (a PEFT wrapper copies its own onto the wrapped model inside `generate`),
        then put the originals back."""
        holders = [model] + [m for m in model.modules() if m is not model and "generation_config" in vars(m)]
        saved = [(m, "generation_config" in vars(m), vars(m).get("generation_config")) for m in holders]
        try:
            for module in holders:
                module.generation_config = copy.deepcopy(config)
            yield
        finally:
            for module, owned, original in saved:
                if owned:
                    module.generation_config = original
                elif "generation_config" in vars(module):
                    del module.generation_config


def row_slices(rows: int, parts: int) -> list[slice]:
    """`parts` contiguous, near-equal slices of `rows` rows (the first ones one longer)."""
    base, extra = divmod(rows, parts)
    slices, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


def concat_rollouts(parts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """Join rollouts of different prompt/response widths (left-pad prompts, right-pad responses)."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.prompt_length for p in parts)
    response_width = max(p.response_mask.shape[1] for p in parts)
    parts = [p.padded(prompt_width, response_width, pad_token_id) for p in parts]
    logprobs = [p.logprobs for p in parts if p.logprobs is not None]
    return Rollout(torch.cat([p.sequences for p in parts]), torch.cat([p.attention_mask for p in parts]), prompt_width,
                   torch.cat([p.response_mask for p in parts]), torch.cat([p.eos_found for p in parts]),
                   torch.cat(logprobs) if len(logprobs) == len(parts) else None)
