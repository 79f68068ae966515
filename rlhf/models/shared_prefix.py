"""Attention for one row holding a prompt followed by several answers to it.

Each answer attends causally to the prompt and to its own earlier tokens, never to another
answer, and its positions continue from the prompt's end. Every token then sees exactly
what it would see in its own row [prompt, answer], so the row gives the same hidden states
with the prompt forwarded once instead of once per answer.

transformers takes a ready 4-D mask as it is (masking_utils returns it untouched), which
works for the `sdpa` and `eager` attention implementations; flash-attention and flex
attention take their masks in other forms.

The reward model and DPO lay out a ranked record's K answers this way; PPO's actor and
reference forwards pack the n answers of a group (GRPO, RLOO, ...) the same way
(`pack_shared_prompts`) where `packed_cost_ratio` says it is cheaper, and under `sdpa` they
attend block by block (`shared_prompt_sdpa`) so that no answer-to-other-answer score is
computed only to be masked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from rlhf.data.rank_dataset import PAD_SEGMENT, PROMPT_SEGMENT

SHARED_PREFIX_ATTENTION = ("sdpa", "eager")


def shared_prefix_unsupported(config) -> str | None:
    """Why a model with this config cannot score answers sharing a prompt row; None when it can."""
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in SHARED_PREFIX_ATTENTION:
        return f"attention implementation '{implementation}' takes no ready 4-D mask"
    return None


def attention_window(config) -> int | None:
    """The sliding window of a model that has sliding-window layers, else None. A custom mask
    replaces the window, so rows longer than it must not share their prompt."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not any("sliding" in kind for kind in layer_types):
        return None
    return int(window)


def shared_prefix_attention_mask(segment_ids: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(rows, 1, seq, seq) mask from (rows, seq) segment ids: PROMPT_SEGMENT for the prompt,
    1..K for the answers, PAD_SEGMENT for padding. `sdpa` gets booleans (True attends);
    `eager` adds the mask to its scores, so it gets 0 or the dtype's lowest value."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = causal & (key != PAD_SEGMENT) & ((key == PROMPT_SEGMENT) | (key == query))
    # A padding position attends to itself, so no query row is empty (an empty row softmaxes to NaN).
    allowed |= torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class SharedPromptRows:
    """A batch of [prompt, answer] rows regrouped as one row per distinct prompt:
    [prompt, answer slot 1, ..., answer slot m], each slot as wide as the batch's response
    region (a prompt with fewer than m answers leaves its last slots empty). The prompt is
    forwarded once per distinct prompt instead of once per answer, which is what a group of
    n answers per prompt (GRPO, RLOO, ...) spends most of its scoring and training forwards on
    when prompts are long next to the answers."""

    input_ids: torch.Tensor
    """(prompts, prompt_length + slots * response_length)."""
    segment_ids: torch.Tensor
    """Same shape: PROMPT_SEGMENT, the slot's number (1-based) or PAD_SEGMENT."""
    position_ids: torch.Tensor
    """Same shape: each answer's positions continue from its prompt's real tokens."""
    logits_positions: torch.Tensor
    """(slots * response_length,) the columns whose outputs predict each slot's tokens, slot by
    slot: the prompt's last column, then the slot's own columns but its last."""
    row_slots: torch.Tensor
    """(batch,) where each original row landed: packed row * slots + slot."""
    slots: int
    prompt_length: int
    response_length: int

    @property
    def answers(self) -> torch.Tensor:
        """(prompts * slots, response_length) each slot's answer tokens (zeros in empty slots)."""
        return self.input_ids[:, self.prompt_length :].reshape(-1, self.response_length)

    def per_slot(self, outputs: torch.Tensor) -> torch.Tensor:
        """(prompts, slots * response_length, ...) outputs at `logits_positions` -> (prompts *
        slots, response_length, ...): one row per slot, aligned with `answers`."""
        return outputs.reshape(-1, self.response_length, *outputs.shape[2:])

    def unpack(self, per_slot: torch.Tensor) -> torch.Tensor:
        """(prompts * slots, response_length, ...) -> the original rows' (batch, response_length, ...)."""
        return per_slot.index_select(0, self.row_slots)


def pack_shared_prompts(sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
                        ) -> SharedPromptRows | None:
    """Rows [left-padded prompt (prompt_length), response] regrouped by identical prompt (same
    real tokens); None when no two rows share one."""
    batch, width = sequences.shape
    response = width - prompt_length
    prompt_ids, prompt_mask = sequences[:, :prompt_length], attention_mask[:, :prompt_length]
    _, owner = torch.unique(prompt_ids.masked_fill(prompt_mask == 0, -1), dim=0, return_inverse=True)
    counts = torch.bincount(owner)
    prompts, slots = counts.shape[0], int(counts.max())
    if prompts == batch:
        return None
    # Each row's slot: its rank among the rows of its prompt, in batch order.
    order = torch.argsort(owner, stable=True)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(owner)
    rank[order] = torch.arange(batch, device=owner.device) - starts[owner[order]]
    row_slots = owner * slots + rank
    first_rows = order[starts]

    answers = sequences.new_zeros((prompts * slots, response))
    answers[row_slots] = sequences[:, prompt_length:]
    answer_mask = attention_mask.new_zeros((prompts * slots, response))
    answer_mask[row_slots] = attention_mask[:, prompt_length:]
    answer_mask = answer_mask.view(prompts, slots, response)
    prompt_mask = prompt_mask[first_rows]

    slot_numbers = torch.arange(1, slots + 1, device=sequences.device).view(1, slots, 1)
    segment_ids = torch.cat([
        torch.where(prompt_mask > 0, PROMPT_SEGMENT, PAD_SEGMENT),
        torch.where(answer_mask > 0, slot_numbers, PAD_SEGMENT).view(prompts, -1)], dim=1)
    prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp_min(0)
    answer_positions = prompt_mask.long().sum(-1).view(prompts, 1, 1) + torch.arange(response, device=sequences.device)
    position_ids = torch.cat([prompt_positions, answer_positions.expand(prompts, slots, response).reshape(prompts, -1)],
                             dim=1)
    columns = prompt_length + torch.arange(slots * response, device=sequences.device).view(slots, response) - 1
    columns[:, 0] = prompt_length - 1
    return SharedPromptRows(
        input_ids=torch.cat([prompt_ids[first_rows], answers.view(prompts, -1)], dim=1),
        segment_ids=segment_ids, position_ids=position_ids, logits_positions=columns.flatten(),
        row_slots=row_slots, slots=slots, prompt_length=prompt_length, response_length=response)


def packed_cost_ratio(rows: SharedPromptRows, batch: int, config) -> float:
    """The packed forward's cost over the unpacked one's, in multiply-adds of the decoder
    layers: the projections grow with the tokens, the attention with the scores computed: per
    block under `sdpa` (`shared_prompt_sdpa`), else the whole packed row's square (no kernel
    skips the masked blocks of a ready mask)."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 4 * hidden * hidden + 3 * hidden * intermediate
    prompts, packed_length = rows.input_ids.shape
    prompt, slots, width = rows.prompt_length, rows.slots, rows.response_length
    if config._attn_implementation == "sdpa":
        packed_scores = prompt * prompt + slots * width * (prompt + width)
    else:
        packed_scores = packed_length * packed_length
    plain_length = prompt + width
    packed = prompts * (packed_length * per_token + 2 * packed_scores * hidden)
    plain = batch * (plain_length * per_token + 2 * plain_length * plain_length * hidden)
    return packed / plain


SHARED_PROMPT_SDPA = "rlhf_shared_prompt_sdpa"
"""The attention implementation a packed forward switches an `sdpa` model to (registered with
transformers on first use): `shared_prompt_sdpa`."""


@dataclass
class PromptBlocks:
    """The attention masks of packed rows block by block (what `shared_prompt_sdpa` takes as
    `shared_prompt`): the prompt's queries against the prompt, and each slot's queries against
    the prompt and that slot."""

    prompt_length: int
    slots: int
    width: int
    prompt_mask: torch.Tensor
    """(prompts, 1, prompt_length, prompt_length) booleans, True attends."""
    answer_mask: torch.Tensor
    """(prompts * slots, 1, width, prompt_length + width) booleans."""

    @classmethod
    def of(cls, rows: SharedPromptRows) -> "PromptBlocks":
        prompt, slots, width = rows.prompt_length, rows.slots, rows.response_length
        prompt_segments = rows.segment_ids[:, :prompt]
        # Each slot as a plain row [prompt, its answer] (answer segments all slot 1): the rows of
        # its answer's queries are its block.
        answers = rows.segment_ids[:, prompt:].unflatten(1, (slots, width)).clamp(max=1)
        per_slot = torch.cat([prompt_segments[:, None].expand(-1, slots, -1), answers], dim=2).flatten(0, 1)
        return cls(prompt, slots, width, shared_prefix_attention_mask(prompt_segments, "sdpa", torch.bool),
                   shared_prefix_attention_mask(per_slot, "sdpa", torch.bool)[:, :, prompt:])


def shared_prompt_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       shared_prompt: PromptBlocks | None = None, **kwargs):
    """transformers' `sdpa` attention for rows [prompt, answer slot 1, ..., answer slot m]
    computed block by block (`shared_prompt`, whose masks replace `attention_mask`): the
    prompt's queries against the prompt, then every slot's queries against the prompt and that
    slot in one batched product. The dense product over the whole row computes every
    answer-to-other-answer block only to mask it out: (P + mR)² scores against P² + mR(P + R)
    here, with the same result."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prompt is None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    prompt, slots, width = shared_prompt.prompt_length, shared_prompt.slots, shared_prompt.width
    rows = query.shape[0]
    prompt_out, _ = sdpa_attention_forward(module, query[:, :, :prompt], key[:, :, :prompt], value[:, :, :prompt],
                                           shared_prompt.prompt_mask, dropout=dropout, scaling=scaling, **kwargs)

    def per_slot(states: torch.Tensor) -> torch.Tensor:
        """(rows, heads, prompt + slots * width, dim) -> (rows * slots, heads, width, dim)."""
        return states[:, :, prompt:].unflatten(2, (slots, width)).transpose(1, 2).flatten(0, 1)

    def with_prompt(states: torch.Tensor) -> torch.Tensor:
        """(rows, heads, length, dim) -> each slot's keys (or values): the prompt's, then its own."""
        shared = states[:, None, :, :prompt].expand(rows, slots, *states.shape[1:2], prompt, states.shape[-1])
        return torch.cat([shared.flatten(0, 1), per_slot(states)], dim=2)

    answer_out, _ = sdpa_attention_forward(module, per_slot(query), with_prompt(key), with_prompt(value),
                                           shared_prompt.answer_mask, dropout=dropout, scaling=scaling, **kwargs)
    # (rows * slots, width, heads, dim) -> (rows, slots * width, heads, dim), after the prompt's
    return torch.cat([prompt_out, answer_out.unflatten(0, (rows, slots)).flatten(1, 2)], dim=1), None


@contextlib.contextmanager
def shared_prompt_attention(config) -> Iterator[dict]:
    """Inside, an `sdpa` model's attention is `shared_prompt_sdpa` (its forward then takes
    `shared_prompt=(prompt length, slots, slot length)`); yields whether it is. Any other
    implementation is left alone: the dense masked product."""
    if config._attn_implementation != "sdpa":
        yield False
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if SHARED_PROMPT_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(SHARED_PROMPT_SDPA, shared_prompt_sdpa)
        AttentionMaskInterface.register(SHARED_PROMPT_SDPA, sdpa_mask)
    config._attn_implementation = SHARED_PROMPT_SDPA
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
