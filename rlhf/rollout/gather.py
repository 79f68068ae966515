"""Joining every worker's share of a PPO batch into the global batch, identical on all workers.

Worker r rolls out global prompts r, r + W, r + 2W, ... (the prompt stream's order), each
`group` times (n answers per prompt, consecutive), so local row i·n + k of worker r is global
sample (i·W + r)·n + k. Shares are padded to the widest prompt and response before the
collective; a world of one returns its batch unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf.rollout.types import Rollout, Scored


_TOKEN_FIELDS = ("logprobs", "ref_logprobs", "values")


def gather_scored(scored: Scored, world, pad_token_id: int, group: int = 1) -> Scored:
    """Every worker's `Scored` share joined into the global batch (see the module doc); `world`
    has `world_size`, `all_reduce(values, op)` and `all_gather(tensor)`."""
    if world.world_size == 1:
        return scored
    rollout = scored.rollout
    widths = world.all_reduce({"prompt": rollout.prompt_length, "response": rollout.response_mask.shape[1]}, op="max")
    prompt_width, response_width = int(widths["prompt"]), int(widths["response"])
    padded = rollout.padded(prompt_width, response_width, pad_token_id)
    right = response_width - rollout.response_mask.shape[1]
    local = {
        "sequences": padded.sequences, "attention_mask": padded.attention_mask,
        "response_mask": padded.response_mask, "eos_found": padded.eos_found.to(torch.uint8),
        "scores": scored.scores.float(),
        **{name: torch.nn.functional.pad(getattr(scored, name).float(), (0, right)) for name in _TOKEN_FIELDS},
        **{f"source:{name}": values.float() for name, values in sorted(scored.sources.items())},
    }
    if rollout.logprobs is not None:
        local["rollout_logprobs"] = padded.logprobs
    joined = {name: _interleave(world.all_gather(tensor), group) for name, tensor in local.items()}
    global_rollout = Rollout(joined["sequences"], joined["attention_mask"], prompt_width, joined["response_mask"],
                             joined["eos_found"].bool(), joined.get("rollout_logprobs"))
    sources = {name.split(":", 1)[1]: tensor for name, tensor in joined.items() if name.startswith("source:")}
    return Scored(global_rollout, joined["logprobs"], joined["ref_logprobs"], joined["values"], joined["scores"],
                  sources)


def _interleave(parts: Sequence[torch.Tensor], group: int = 1) -> torch.Tensor:
    """Rows of worker shares [worker, row] in global order: blocks of `group` rows, block i of
    worker r at global block i·W + r."""
    stacked = torch.stack(list(parts))  # (W, rows, ...)
    workers, rows = stacked.shape[:2]
    blocks = stacked.reshape(workers, rows // group, group, *stacked.shape[2:]).transpose(0, 1)
    return blocks.reshape(-1, *stacked.shape[2:])


def local_rows(rows: int, rank: int, world_size: int, group: int = 1) -> torch.Tensor:
    """Global sample ids of a worker's `rows` local samples, `group` consecutive ones per prompt
    (see `gather_scored`)."""
    local = torch.arange(rows)
    return (local // group * world_size + rank) * group + local % group
