"""Padding-free rows: several examples concatenated in one row, each attending to itself only.

A padding-free SFT micro-batch is one row holding its examples back to back, positions
restarting at every example, with `cu_seq_lens_q`/`cu_seq_lens_k` (the examples' cumulative
lengths, the names transformers' flash-attention kernels read) passed through the model's
forward to its attention layers:
- `flash_attention_2/3` use them as they are (varlen kernels);
- `rlhf_segment_sdpa`, which `use_segment_attention` sets in place of `sdpa`, runs PyTorch's
  SDPA once per example with `is_causal`, so no work is spent on pairs of tokens from
  different examples (a block-diagonal mask over the whole row does that work and masks it,
  and on SmolLM2-sized examples took about three times as long per layer; BENCHMARKS.md,
  'Measurements behind the code');
- any other implementation ignores them and gets the block-diagonal mask that transformers
  builds from the restarting positions, which is exact but slower.
Calls without the lengths (evaluation with padding, generation) go through transformers' own
`sdpa` unchanged. Models with sliding-window layers keep `sdpa` (their window lives in the mask).

PPO's actor, critic, reference and reward model lay a micro-batch of [left-padded prompt,
right-padded response] rows out the same way (`pack_padding_free`, ppo.padding_free): their
models keep `sdpa` for generation and padded forwards, and `segment_attention` switches it for
the padding-free call only.
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
    heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if (bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]
            or getattr(module, "sliding_window", None) or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
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


SEGMENT_SDPA_BY_LENGTHS = "rlhf_segment_sdpa_by_lengths"
"""What `segment_attention` switches an `sdpa` model to for one padding-free call: the same
attention, and no mask built at all. transformers would otherwise build the packed row's
block-diagonal mask, (tokens x tokens) booleans that the lengths make useless: 1 GiB at 32k
tokens."""


def _segment_sdpa_by_lengths(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    if kwargs.get("cu_seq_lens_q") is None or query.shape[0] != 1:
        raise RuntimeError("a padding-free forward takes one row and its examples' lengths (segment_kwargs)")
    return segment_sdpa_attention(module, query, key, value, None, **kwargs)


def _no_mask(*args, **kwargs) -> None:
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if SEGMENT_SDPA in AttentionInterface._global_mapping:
        return
    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention)
    # The same masks as sdpa for the calls that carry no lengths.
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_SDPA, sdpa_mask)
    AttentionInterface.register(SEGMENT_SDPA_BY_LENGTHS, _segment_sdpa_by_lengths)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENT_SDPA_BY_LENGTHS, _no_mask)


def use_segment_attention(model: torch.nn.Module) -> bool:
    """Switch a model that attends with `sdpa` to `rlhf_segment_sdpa`; True when it did.
    The switch is not saved with the model (transformers keeps it out of config.json)."""
    config = getattr(model, "config", None)
    if config is None or not _sdpa_switchable(config):
        return False
    _register()
    model.set_attn_implementation(SEGMENT_SDPA)
    return True


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
    """A model with this config can forward a padding-free row: its attention reads the
    examples' lengths, or is `sdpa` that `segment_attention` switches for the call."""
    return getattr(config, "_attn_implementation", None) in LENGTH_AWARE_ATTENTION or _sdpa_switchable(config)


@contextlib.contextmanager
def segment_attention(config) -> Iterator[None]:
    """Inside, an `sdpa` model attends as `rlhf_segment_sdpa` (once per example of a
    padding-free row, every call with the lengths, no mask built); any other implementation is
    left as it is. Switched for the call only, as `shared_prompt_attention` does, so the model's
    other forwards (padded rows, shared-prompt rows, generation) keep their own attention."""
    if not _sdpa_switchable(config):
        yield
        return
    _register()
    config._attn_implementation = SEGMENT_SDPA_BY_LENGTHS
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
