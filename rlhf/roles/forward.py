"""Forward passes over a rollout's sequences, returning per-token tensors of the response
region (see rlhf/rollout/types.py for the alignment)."""

from __future__ import annotations

import torch

from rlhf.algorithms import entropy_from_logits, token_logprobs
from rlhf.models.positions import position_ids_from_mask
from rlhf.models.reward import final_hidden, score_head, sequence_scores, token_values, transformers_model
from rlhf.models.segments import PaddingFreeRows, pack_padding_free, segment_attention, takes_segments
from rlhf.models.shared_prefix import (PromptBlocks, SharedPromptRows, attention_window, pack_shared_prompts,
                                       packed_cost_ratio, shared_prefix_attention_mask, shared_prefix_unsupported,
                                       shared_prompt_attention)
from rlhf.rollout.types import Rollout

PACKED_COST_LIMIT = 0.9
"""Rows sharing a prompt are packed into one when that is estimated to cost at most this share
of the plain forward (a small saving is not worth the dense mask)."""

PACKED_MASK_LIMIT = 1 << 28
"""Most elements of the packed rows' dense (rows, length, length) attention mask, where the
attention takes one (not `sdpa`, which works block by block)."""


def shared_prompt_rows(model: torch.nn.Module, rollout: Rollout) -> SharedPromptRows | None:
    """The rollout's rows packed by shared prompt (the n answers of a group), where the model
    takes a ready mask and packing saves compute; else None."""
    config = getattr(transformers_model(model), "config", None)
    if config is None or shared_prefix_unsupported(config):
        return None
    rows = pack_shared_prompts(rollout.sequences, rollout.attention_mask, rollout.prompt_length)
    if rows is None:
        return None
    prompts, length = rows.input_ids.shape
    window = attention_window(config)
    if window is not None and length > window:
        return None
    if config._attn_implementation != "sdpa" and prompts * length * length > PACKED_MASK_LIMIT:
        return None  # the dense mask (block attention builds only its blocks)
    if packed_cost_ratio(rows, rollout.sequences.shape[0], config) > PACKED_COST_LIMIT:
        return None
    return rows


PADDING_FREE_MIN_SHARE = 0.05
"""A padded micro-batch is laid out padding-free when at least this share of its columns is
padding (below it, the fewer calls of the padded forward are worth more)."""


def padding_free_rows(model: torch.nn.Module, rollout: Rollout, enabled: bool) -> PaddingFreeRows | None:
    """The rollout's rows as one padding-free row where that is `enabled`, the model's attention
    can take it (`takes_segments`) and the rows hold padding worth skipping; else None."""
    if not enabled:
        return None
    config = getattr(transformers_model(model), "config", None)
    mask = rollout.attention_mask
    if config is None or not takes_segments(config) or mask.shape[0] < 2:
        return None
    if 1.0 - float(mask.sum()) / mask.numel() < PADDING_FREE_MIN_SHARE:
        return None
    return pack_padding_free(rollout.sequences, mask, rollout.prompt_length, rollout.response_mask)


def padding_free_logits(model: torch.nn.Module, rows: PaddingFreeRows) -> torch.Tensor:
    """(response tokens, vocab) logits that predicted each response token of the packed rows."""
    with segment_attention(transformers_model(model).config):
        return model(**rows.kwargs(), use_cache=False, logits_to_keep=rows.predictors).logits[0]


def padding_free_hidden(model: torch.nn.Module, rows: PaddingFreeRows) -> torch.Tensor:
    """(real tokens, hidden) final hidden states of the packed rows (a scalar-head model's)."""
    inputs = rows.kwargs()
    with segment_attention(transformers_model(model).config):
        return final_hidden(model, inputs.pop("input_ids"), None, inputs.pop("position_ids"), **inputs)[0]


def response_logits(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """(batch, response_length, vocab) logits that predicted each response token; only the
    response region's logits are computed (logits_to_keep)."""
    response_length = rollout.response_mask.shape[1]
    logits = model(
        input_ids=rollout.sequences,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids_from_mask(rollout.attention_mask),
        use_cache=False,
        logits_to_keep=response_length + 1,
    ).logits
    return logits[:, :-1]


def packed_response_logits(model: torch.nn.Module, rows: SharedPromptRows) -> torch.Tensor:
    """(prompts * slots, response_length, vocab) logits that predicted each slot's tokens."""
    inner = transformers_model(model)
    with shared_prompt_attention(inner.config) as by_blocks:
        if by_blocks:  # the blocks' own masks; the model's causal mask goes unused
            mask, blocks = None, {"shared_prompt": PromptBlocks.of(rows)}
        else:
            mask, blocks = shared_prefix_attention_mask(rows.segment_ids, inner.config._attn_implementation,
                                                        inner.dtype), {}
        logits = model(input_ids=rows.input_ids, attention_mask=mask, position_ids=rows.position_ids, use_cache=False,
                       logits_to_keep=rows.logits_positions, **blocks).logits
    return rows.per_slot(logits)


def policy_logprobs(
    model: torch.nn.Module, rollout: Rollout, temperature: float, with_entropy: bool = False,
    entropy_grad: bool = False, padding_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the sampled response tokens under softmax(logits / temperature), the
    distribution the sampler drew them from; optionally the per-token entropy, differentiable
    only with `entropy_grad` (as a logged statistic its backward through the vocabulary-wide
    softmax would cost a sizeable share of the actor's step for nothing). Answers sharing a
    prompt are forwarded in one row behind one copy of it where that is cheaper
    (`shared_prompt_rows`); other rows, with `padding_free`, back to back without their
    padding (`padding_free_rows`): the same values up to float rounding."""
    packed = shared_prompt_rows(model, rollout)
    flat = padding_free_rows(model, rollout, padding_free) if packed is None else None
    if flat is not None:
        logits = padding_free_logits(model, flat)
        targets = rollout.responses.flatten()[flat.response_slots]
        logprobs = token_logprobs(logits[None], targets[None], temperature)[0]
        entropy = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropy = flat.unpack(entropy_from_logits(logits.float() / temperature))
        return flat.unpack(logprobs), entropy
    if packed is not None:
        logits, responses = packed_response_logits(model, packed), packed.answers
    else:
        logits, responses = response_logits(model, rollout), rollout.responses
    logprobs = token_logprobs(logits, responses, temperature)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits.float() / temperature)
    if packed is not None:  # back to the rollout's rows, as per-token values (not vocabulary-wide logits)
        logprobs = packed.unpack(logprobs)
        entropy = packed.unpack(entropy) if entropy is not None else None
    return logprobs, entropy


def response_values(model: torch.nn.Module, rollout: Rollout, padding_free: bool = False) -> torch.Tensor:
    """(batch, response_length) critic values V(s) of the state before each response token;
    with `padding_free`, from the rows laid back to back where that pays (`padding_free_rows`)."""
    flat = padding_free_rows(model, rollout, padding_free)
    if flat is not None:
        hidden = padding_free_hidden(model, flat)
        return flat.unpack(score_head(model)(hidden[flat.predictors]).squeeze(-1).float())
    values = token_values(model, rollout.sequences, rollout.attention_mask)
    start = rollout.prompt_length - 1
    return values[:, start : start + rollout.response_mask.shape[1]]


def response_scores(model: torch.nn.Module, rollout: Rollout, padding_free: bool = False) -> torch.Tensor:
    """(batch,) reward-model scores, each read at its row's last attended token; with
    `padding_free`, from the rows laid back to back where that pays (`padding_free_rows`)."""
    flat = padding_free_rows(model, rollout, padding_free)
    if flat is None:
        return sequence_scores(model, rollout.sequences, rollout.attention_mask)
    hidden = padding_free_hidden(model, flat)
    last = torch.tensor(flat.lengths, device=hidden.device).cumsum(0) - 1
    return score_head(model)(hidden[last]).squeeze(-1).float()
