"""Prompt batches for rollouts: tokenised once, reshuffled per epoch from a seed, and
addressed by iteration so a resumed run continues with exactly the next prompts."""

from __future__ import annotations

import random
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from rlhf.data.records import PromptRecord
from rlhf.data.template import prompt_text


def encode_prompt(tokenizer: PreTrainedTokenizerBase, record: PromptRecord, max_prompt_length: int) -> list[int]:
    """Chat-template prompt with the generation prompt; long prompts keep their end."""
    ids = tokenizer(prompt_text(tokenizer, record.prompt), add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_length:]


class PromptStream:
    def __init__(self, prompts: Sequence[list[int]], batch_size: int, seed: int):
        if not prompts:
            raise ValueError("no prompts")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def batch(self, iteration: int, rank: int = 0, world_size: int = 1) -> tuple[list[list[int]], list[int]]:
        """The prompts (and their indices) worker `rank` rolls out at `iteration`: the global
        batch is positions [iteration·B, (iteration+1)·B) of the epoch stream."""
        n = len(self.prompts)
        positions = range(iteration * self.batch_size + rank, (iteration + 1) * self.batch_size, world_size)
        indices = [self._order(p // n)[p % n] for p in positions]
        return [self.prompts[i] for i in indices], indices
