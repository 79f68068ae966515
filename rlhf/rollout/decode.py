"""`DecodeEngine`: our own sampling loop over the model's forward with a KV cache.

What it does that `model.generate` does not (benchmarks/rollout.py measures each):
- prompts are sorted by length before they are cut into batches, so a batch pads little;
- a row that has emitted EOS leaves the batch (and its KV cache rows are dropped), so the
  rest decode on a smaller batch instead of carrying finished rows to the end;
- plain Llama models run prompt and decode steps through `LlamaDecodeStep`
  (rlhf/kernels/llama_step.py, `kernels.llama_decode_step`): fused q/k/v and gate/up matmuls,
  a preallocated KV cache, none of the forward's per-call and per-step setup;
- one uniform number per row samples the token (inverse CDF), instead of an exponential
  draw per vocabulary entry; with `SampleSeeds` that number depends only on the seed, the
  step and the sample's id, so a sample is the same however prompts are batched, sorted or
  spread over workers;
- it returns the log-probability of every sampled token under softmax(logits / T), the
  distribution PPO scores, so PPO can skip a second forward of the actor (rollout.reuse_logprobs).

Sharded models (ZeRO-3, FSDP2): by default the strategy gathers the whole weights once per
`generate` call (`gather_weights`), so no decode step gathers anything and each rank decodes
on its own. Without that, they gather their weights inside every forward, so all ranks must
run the same number of forwards: a rank whose rows are all finished keeps running one-token
forwards until every rank is done (as `generate(synced_gpus=True)` does), and a rank with
fewer batches than another runs idle ones. Ranks agree through the engine's `world` (the
strategy), which gathers and reduces on the process group's device.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from rlhf.algorithms.losses import token_logprobs
from rlhf.kernels.llama_step import LlamaDecodeStep
from rlhf.models.autocast import autocast_dtype
from rlhf.rollout.engine import (Collective, RolloutEngine, SamplingParams, concat_rollouts, empty_rollout,
                                 finish_rollout, left_pad)
from rlhf.rollout.types import Rollout


class SampleSeeds:
    """Per-sample random streams: the uniform number that draws sample `i`'s token at decode
    step `t` is entry (t, i) of a (steps, sample_count) table drawn from a generator seeded
    with `seed`, so it depends on the seed, the step and the sample's id alone."""

    def __init__(self, seed: int, sample_ids: Sequence[int], sample_count: int | None = None):
        self.seed = seed
        self.ids = torch.as_tensor(list(sample_ids), dtype=torch.long)
        self.count = sample_count if sample_count is not None else (int(self.ids.max()) + 1 if len(self.ids) else 0)
        if len(self.ids) and int(self.ids.max()) >= self.count:
            raise ValueError(f"sample id {int(self.ids.max())} out of range for {self.count} samples")

    def table(self, steps: int, device: torch.device) -> torch.Tensor:
        """(steps, sample_count) float64 uniforms in [0, 1)."""
        generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand((steps, self.count), generator=generator, dtype=torch.float64, device=device)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering of (rows, vocab) logits: dropped entries become -inf.
    The nucleus keeps the smallest set of tokens whose probability reaches top_p (the token
    that crosses the threshold included)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_with_logprobs(logits: torch.Tensor, generator: torch.Generator | None = None,
                         workspace: torch.Tensor | None = None, uniform: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits), by inverting the CDF at one uniform number per
    row, and its log-probability (float32). The CDF is summed in float64: a float32 sum over a
    50k vocabulary drifts by ~1e-4.

    `workspace`, float64 and at least as large as `logits`, holds the CDF: the decode loop
    passes one buffer for all its steps instead of three fresh blocks per step (a float64
    copy, its softmax and its cumsum, 3 MB each at SmolLM2's vocabulary and 8 rows), and the
    log-probability comes from the same sums instead of a separate logsumexp. `uniform`, (rows,
    1) float64 in [0, 1), replaces the draw from `generator`."""
    rows, vocab = logits.shape
    if workspace is None:
        cdf = torch.empty((rows, vocab), dtype=torch.float64, device=logits.device)
    else:
        cdf = workspace[:rows, :vocab]
    cdf.copy_(logits)
    peak = cdf.amax(-1, keepdim=True)
    cdf.sub_(peak).exp_().cumsum_(-1)  # unnormalised: softmax's exp(z - max), summed
    total = cdf[:, -1:]
    if uniform is None:
        uniform = torch.rand((rows, 1), generator=generator, dtype=torch.float64, device=logits.device)
    else:
        uniform = uniform.clone()
    # The first entry above u·total, with u < 1 in float64 so that u·total < total: its CDF step
    # is positive, so a token of probability 0 (filtered to -inf) is never drawn. The clamp only
    # keeps NaN logits from indexing past the vocabulary.
    index = torch.searchsorted(cdf, uniform.mul_(total), right=True).clamp_(max=vocab - 1)  # (rows, 1)
    logprob = logits.gather(-1, index).double().sub_(peak).sub_(total.log())
    return index.squeeze(-1), logprob.squeeze(-1).float()


def sample_tokens(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The tokens of `sample_with_logprobs`."""
    return sample_with_logprobs(logits, generator)[0]


class DecodeEngine(RolloutEngine):
    takes_seeds = True

    def __init__(self, model: torch.nn.Module, eos_token_id: int, pad_token_id: int, batch_size: int = 32,
                 llama_step: bool = True, world: Collective | None = None, gather_weights: bool = True):
        super().__init__(model, eos_token_id, pad_token_id, batch_size, world, gather_weights)
        self.llama_step = llama_step
        """Run plain Llama models through `LlamaDecodeStep` (`kernels.llama_decode_step`)."""

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: SampleSeeds | None = None) -> Rollout:
        """Sample one response per prompt; with `seeds`, prompt i's sample depends only on the
        seed and its id `seeds.ids[i]` (otherwise on torch's global generator)."""
        was_training = self.model.training
        self.model.eval()
        # Longest first: batches of similar lengths, and the widest batch runs (and fails on
        # memory, if it must) first.
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        device = next(self.model.parameters()).device
        uniforms = seeds.table(params.max_new_tokens, device) if seeds is not None else None
        parts = []
        dtype = autocast_dtype(self.model)  # mixed precision by autocast: sample as training computes
        with self._whole_weights() as whole, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            synced = not whole and self._synced()
            # Our own decode step for plain Llama models; anything else steps through its forward.
            fast_step = (LlamaDecodeStep(self.model, dtype)
                         if self.llama_step and not synced and LlamaDecodeStep.supports(self.model) else None)
            for index in range(self._batch_count(len(order), synced)):
                batch = order[index * self.batch_size : (index + 1) * self.batch_size]
                if not batch:  # only when kept in step: another rank has more batches
                    self._idle_forwards(params.max_new_tokens, device)  # its prompt pass, then its steps
                    continue
                # Each row's uniform numbers, one per step: (steps, rows).
                rows = uniforms[:, seeds.ids[batch].to(uniforms.device)] if seeds is not None else None
                parts.append(self._generate([prompts[i] for i in batch], params, synced, fast_step, rows))
        self.model.train(was_training)
        if not parts:
            return empty_rollout(with_logprobs=True)
        joined = concat_rollouts(parts, self.pad_token_id)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return joined.select(inverse.to(joined.sequences.device))

    def _generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, synced: bool,
                  fast_step: LlamaDecodeStep | None, uniforms: torch.Tensor | None) -> Rollout:
        device = next(self.model.parameters()).device
        # A prompt repeated in the batch (a group of n answers) runs through the prompt pass once;
        # its keys and values are then copied to each of its rows.
        distinct: dict[tuple[int, ...], int] = {}
        copies = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=device)
        prompt_ids, prompt_mask = left_pad(list(distinct), self.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        repeated = len(distinct) < len(prompts)

        positions = (prompt_mask.cumsum(-1) - 1).clamp_(min=0)
        if fast_step is not None:
            logits = fast_step.prefill(prompt_ids, prompt_mask, params.max_new_tokens)
            if repeated:
                fast_step.keep(copies)
        else:
            cache = DynamicCache(config=getattr(self.model, "config", None))
            logits = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            if repeated:
                cache.batch_select_indices(copies)
        if repeated:
            logits, prompt_ids, prompt_mask, positions = (t[copies] for t in (logits, prompt_ids, prompt_mask, positions))
        rows = prompt_ids.shape[0]
        responses = torch.full((rows, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((rows, params.max_new_tokens), dtype=torch.float32, device=device)
        active = torch.arange(rows, device=device)  # batch rows still decoding -> original row
        attention = prompt_mask
        next_position = positions[:, -1] + 1
        steps = 0
        filtered = params.top_k > 0 or params.top_p < 1.0
        workspace = torch.empty(logits.shape, dtype=torch.float64, device=device)
        for step in range(params.max_new_tokens):
            steps = step + 1
            scaled = logits.float()
            if params.temperature != 1.0:
                scaled = scaled / params.temperature
            uniform = uniforms[step, active].unsqueeze(-1) if uniforms is not None else None
            tokens, token_logps = sample_with_logprobs(filter_logits(scaled, params.top_k, params.top_p),
                                                       workspace=workspace, uniform=uniform)
            if filtered:  # PPO scores the unfiltered distribution
                token_logps = token_logprobs(scaled.unsqueeze(1), tokens.unsqueeze(1)).squeeze(1)
            responses[active, step] = tokens
            logprobs[active, step] = token_logps
            keep = tokens != self.eos_token_id
            if step + 1 == params.max_new_tokens or not self._continue(bool(keep.any()), synced):
                break
            if not bool(keep.all()):
                kept = keep.nonzero().squeeze(-1)
                if kept.numel() == 0:  # synced: this rank is done, the others are not
                    self._idle_forwards(params.max_new_tokens - step - 1, device)
                    break
                if fast_step is not None:
                    fast_step.keep(kept)
                else:
                    cache.batch_select_indices(kept)
                active, tokens, attention, next_position = active[kept], tokens[kept], attention[kept], next_position[kept]
            if fast_step is not None:
                logits = fast_step(tokens, next_position)
            else:
                attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
                logits = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=attention,
                                    position_ids=next_position.unsqueeze(-1), past_key_values=cache,
                                    use_cache=True).logits[:, -1]
            next_position = next_position + 1
        rollout = finish_rollout(prompt_ids, prompt_mask, responses[:, :steps], self.eos_token_id, self.pad_token_id)
        rollout.logprobs = logprobs[:, :steps] * rollout.response_mask
        return rollout

    def _continue(self, local_running: bool, synced: bool) -> bool:
        """Whether to run another decode step: while any row of this rank runs, or under
        sharding while any row of any rank runs (a collective, through the world)."""
        if not synced:
            return local_running
        return self._any_rank(local_running)

    def _idle_forwards(self, remaining: int, device: torch.device) -> None:
        """Keep a finished rank in step with the others' collective forwards: up to `remaining`
        one-token forwards, with the others' check before each one after the first. A whole
        idle batch is `max_new_tokens` of them (the others' prompt pass, then their steps)."""
        dummy = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=device)
        for index in range(remaining):
            self.model(input_ids=dummy, use_cache=False)
            # The others check whether to go on before every forward except after the last.
            if index == remaining - 1 or not self._continue(False, synced=True):
                return
