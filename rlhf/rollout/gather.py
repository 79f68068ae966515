"""Joining every worker's share of a PPO batch into the global batch, identical on all workers.

Worker r rolls out and scores global samples r, r + W, r + 2W, ... (the prompt stream's
order), so row i of worker r is global sample i·W + r. Shares are padded to the widest prompt
and response before the collective; a world of one returns its batch unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf.rollout.types import Rollout, Scored


_TOKEN_FIELDS = ("logprobs", "ref_logprobs", "values")


def gather_scored(scored: Scored, world, pad_token_id: int) -> Scored:
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
    }
    if rollout.logprobs is not None:
        local["rollout_logprobs"] = padded.logprobs
    joined = {name: _interleave(world.all_gather(tensor)) for name, tensor in local.items()}
    global_rollout = Rollout(joined["sequences"], joined["attention_mask"], prompt_width, joined["response_mask"],
                             joined["eos_found"].bool(), joined.get("rollout_logprobs"))
    return Scored(global_rollout, joined["logprobs"], joined["ref_logprobs"], joined["values"], joined["scores"])


def _interleave(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of worker shares [worker, row] in global order row·W + worker."""
    stacked = torch.stack(list(parts), dim=1)
    return stacked.reshape(-1, *stacked.shape[2:])


def local_rows(rows: int, rank: int, world_size: int) -> torch.Tensor:
    """Global sample ids of a worker's `rows` local samples (see `gather_scored`)."""
    return torch.arange(rows) * world_size + rank
