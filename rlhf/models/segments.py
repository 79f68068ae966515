"""Padding-free rows: several examples concatenated in one row, each attending to itself only.

A padding-free micro-batch is one row holding its examples back to back, positions restarting
at every example, with `cu_seq_lens_q`/`cu_seq_lens_k` (the examples' cumulative lengths, the
names transformers' flash-attention kernels read) passed through the model's forward to its
attention layers:
- `flash_attention_2/3` use them as they are (varlen kernels);
- an `sdpa` model is switched for that call only (`segment_attention`) to `rlhf_segment_sdpa`,
  which runs PyTorch's SDPA once per example with `is_causal` and builds no mask: no work is
  spent on pairs of tokens from different examples (a block-diagonal mask over the whole row
  does that work and masks it, and on SmolLM2-sized examples took about three times as long
  per layer; BENCHMARKS.md, 'Measurements behind the code'), and no (tokens x tokens) mask is
  allocated (1 GiB at 32k tokens);
- any other implementation, and `sdpa` models with sliding-window layers (their window lives
  in the mask) or logit softcapping, get the block-diagonal mask that transformers builds from
  the restarting positions: exact, but slower.
The SFT loss (`lm_forward_nll`) and PPO's actor, critic, reference and reward model
(`pack_padding_free`, ppo.padding_free) take this path; every other forward of the same model
(padded rows, generation, shared-prompt rows) keeps its own attention. Gradient checkpointing
recomputes under the attention of the forward (rlhf/models/checkpointing.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

SEGMENT_SDPA = "rlhf_segment_sdpa"
LENGTH_AWARE_ATTENTION = (SEGMENT_SDPA, "flash_attention_2", "flash_attention_3")
"""Attention implementations that read the examples' lengths (`segment_kwargs`) and attend
within each example only."""


def segment_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, heads, seq, dim) in, (batch, seq,
    heads, dim) out; one padding-free row and its examples' lengths (`segment_kwargs`)."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise RuntimeError("a padding-free forward takes one row and its examples' lengths (segment_kwargs)")
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    edges = bounds.tolist()
    lengths = [end - start for start, end in zip(edges[:-1], edges[1:])]
    # split, not slicing: its backward concatenates, where a slice's backward zero-fills a
    # full-size gradient per example.
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=grouped)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if SEGMENT_SDPA in AttentionInterface._global_mapping:
        return
    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_SDPA, _no_mask)


def segment_kwargs(lengths: list[int], device: torch.device) -> dict:
    """The forward kwargs that tell attention where each example of a padding-free row ends."""
    bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    longest = max(lengths, default=0)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def _sdpa_switchable(config) -> bool:
    """An `sdpa` model whose attention needs nothing the lengths cannot carry (no sliding
    window, no logit softcapping)."""
    from rlhf.models.shared_prefix import attention_window

    return (getattr(config, "_attn_implementation", None) == "sdpa" and attention_window(config) is None
            and not getattr(config, "attn_logit_softcapping", None))


def takes_segments(config) -> bool:
    """A model with this config attends within each example of a padding-free row without a
    mask: its attention reads the examples' lengths, or is `sdpa` that `segment_attention`
    switches for the call."""
    return getattr(config, "_attn_implementation", None) in LENGTH_AWARE_ATTENTION or _sdpa_switchable(config)


@contextlib.contextmanager
def segment_attention(config) -> Iterator[None]:
    """Inside, an `sdpa` model attends as `rlhf_segment_sdpa` (once per example of a
    padding-free row, no mask built); any other implementation is left as it is. Switched for
    the call only, as `shared_prompt_attention` does, so the model's other forwards keep their
    own attention, and nothing of the switch reaches a saved config.json."""
    if not _sdpa_switchable(config):
        yield
        return
    _register()
    config._attn_implementation = SEGMENT_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


@dataclass
class PaddingFreeRows:
    """The real tokens of a batch of [left-padded prompt, right-padded response] rows laid back
    to back in one row, positions restarting at every example: the projections and MLPs then
    run on real tokens only, where the padded batch runs them on every column of every row
    (with prompts of mixed lengths, most of a batch can be padding)."""

    input_ids: torch.Tensor
    """(1, real tokens)."""
    position_ids: torch.Tensor
    """(1, real tokens): each example's positions from 0."""
    lengths: list[int]
    """Real tokens of each example, in batch order."""
    predictors: torch.Tensor
    """(response tokens,) the positions in the row whose outputs predict each response token
    (a response token's previous token), in row-major order of the response mask."""
    response_slots: torch.Tensor
    """(response tokens,) where each lands in the flattened (batch, response_length) layout."""
    batch: int
    response_length: int

    def kwargs(self) -> dict:
        """The forward's inputs (no attention mask: the lengths say where each example ends)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                **segment_kwargs(self.lengths, self.input_ids.device)}

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """(response tokens,) -> (batch, response_length), zero off the response mask
        (differentiable)."""
        flat = per_token.new_zeros(self.batch * self.response_length)
        return flat.index_put((self.response_slots,), per_token).view(self.batch, self.response_length)


def pack_padding_free(sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                      response_mask: torch.Tensor) -> PaddingFreeRows:
    """A rollout's rows (see rlhf/rollout/types.py; each row's attended tokens contiguous) as
    one padding-free row."""
    attended = attention_mask.bool()
    batch, response_length = response_mask.shape
    # Each attended token's place in the packed row.
    packed_at = (attended.flatten().long().cumsum(0) - 1).view(attended.shape)
    positions = (attended.long().cumsum(-1) - 1)[attended]
    responses = response_mask.bool()
    predictors = packed_at[:, prompt_length - 1 : prompt_length - 1 + response_length][responses]
    return PaddingFreeRows(
        input_ids=sequences[attended][None], position_ids=positions[None],
        lengths=attended.sum(-1).tolist(), predictors=predictors,
        response_slots=responses.flatten().nonzero().squeeze(-1), batch=batch, response_length=response_length)
