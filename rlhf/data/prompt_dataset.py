"""Prompt batches for rollouts: tokenised once, reshuffled per epoch from a seed, and
addressed by iteration so a resumed run continues with exactly the next prompts."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class PromptBatch:
    """Prompts as the rollout and the reward sources see them."""

    ids: list[list[int]]
    """Token ids (chat template with the generation prompt)."""
    texts: list[str]
    """The last user message of each prompt (what reward functions get as `prompt`)."""
    fields: list[dict]
    """Each prompt row's other columns (e.g. a reference answer)."""

    def repeated(self, n: int) -> "PromptBatch":
        """Each prompt n times in a row (a group of n answers per prompt)."""
        return PromptBatch(*([x for x in column for _ in range(n)] for column in (self.ids, self.texts, self.fields)))


def prompt_batch(tokenizer: PreTrainedTokenizerBase, records: Sequence[PromptRecord],
                 max_prompt_length: int) -> PromptBatch:
    return PromptBatch([encode_prompt(tokenizer, r, max_prompt_length) for r in records],
                       [r.prompt[-1].content for r in records], [dict(r.fields) for r in records])


class PromptStream:
    def __init__(self, prompts: Sequence[list[int]] | PromptBatch, batch_size: int, seed: int):
        """`prompts`: token ids, or a `PromptBatch` (texts and fields come along in `take`)."""
        if isinstance(prompts, PromptBatch):
            self.all = prompts
            prompts = prompts.ids
        else:
            self.all = PromptBatch(list(prompts), [""] * len(prompts), [{} for _ in prompts])
        if not prompts:
            raise ValueError("no prompts")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self._order = EpochOrder(len(self.prompts), seed)

    def take(self, iteration: int, rank: int = 0, world_size: int = 1) -> PromptBatch:
        """The `PromptBatch` of `indices`."""
        chosen = self.indices(iteration, rank, world_size)
        return PromptBatch([self.all.ids[i] for i in chosen], [self.all.texts[i] for i in chosen],
                           [self.all.fields[i] for i in chosen])

    def indices(self, iteration: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Which prompts (indices into the prompt list) worker `rank` rolls out at `iteration`:
        the global batch is positions [iteration·B, (iteration+1)·B) of the epoch stream,
        worker r taking every world_size-th from position r."""
        n = len(self.prompts)
        positions = range(iteration * self.batch_size + rank, (iteration + 1) * self.batch_size, world_size)
        return [self._order(p // n)[p % n] for p in positions]

    def batch(self, iteration: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """The prompts (token ids) of `indices`."""
        return [self.prompts[i] for i in self.indices(iteration, rank, world_size)]
