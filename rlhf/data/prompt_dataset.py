"""Prompt batches for rollouts: tokenised once, reshuffled per epoch from a seed, and
addressed by iteration so a resumed run continues with exactly the next prompts."""

from __future__ import annotations

from typing import Sequence

from transformers import PreTrainedTokenizerBase

from rlhf.data.order import EpochOrder
from rlhf.data.records import PromptRecord
from rlhf.data.sft_dataset import TruncationStats
from rlhf.data.template import prompt_text


def encode_prompt(tokenizer: PreTrainedTokenizerBase, record: PromptRecord, max_prompt_length: int,
                  stats: TruncationStats | None = None) -> list[int]:
    """Chat-template prompt with the generation prompt; long prompts keep their end (counted in `stats`)."""
    ids = tokenizer(prompt_text(tokenizer, record.prompt), add_special_tokens=False)["input_ids"]
    if stats is not None:
        stats.examples += 1
        if len(ids) > max_prompt_length:
            stats.prompt_truncated += 1
    return ids[-max_prompt_length:]


class PromptStream:
    def __init__(self, prompts: Sequence[list[int]], batch_size: int, seed: int):
        if not prompts:
            raise ValueError("no prompts")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self._order = EpochOrder(len(self.prompts), seed)

    def batch(self, iteration: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """The prompts worker `rank` rolls out at `iteration`: the global batch is positions
        [iteration·B, (iteration+1)·B) of the epoch stream."""
        n = len(self.prompts)
        positions = range(iteration * self.batch_size + rank, (iteration + 1) * self.batch_size, world_size)
        return [self.prompts[self._order(p // n)[p % n]] for p in positions]
