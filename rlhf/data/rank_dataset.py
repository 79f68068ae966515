"""Reward-model batches with InstructGPT's K-wise layout: a batch element is one prompt with
its K answers; the K sequences are scored in one forward pass and every (better, worse)
pair of that prompt is compared from those K scores.

Two layouts of the same sequences: one row per answer ([prompt, answer k], right-padded),
or one row per prompt ([prompt, answer 1, ..., answer K]) where the prompt is forwarded
once and a block mask keeps the answers apart (rlhf/models/shared_prefix.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.data.order import EpochOrder
from rlhf.data.records import RankRecord
from rlhf.data.sft_dataset import TruncationStats
from rlhf.data.template import answer_ids, prompt_text

PROMPT_SEGMENT = 0
PAD_SEGMENT = -1
"""Segment ids of the shared-prompt layout: the prompt, then 1..K for the answers, padding."""


@dataclass
class RankExample:
    sequences: list[list[int]]
    """K token sequences: prompt + answer_k (ending with EOS unless truncated)."""
    pairs: list[tuple[int, int]]
    """(better, worse) indices into `sequences`; ties give none."""
    margin: float | None
    prompt_length: int
    """Every sequence starts with the same `prompt_length` prompt tokens."""

    def shared_length(self) -> int:
        """Length of the row [prompt, answer 1, ..., answer K]."""
        return self.prompt_length + sum(len(seq) - self.prompt_length for seq in self.sequences)


def encode_rank(
    tokenizer: PreTrainedTokenizerBase,
    record: RankRecord,
    max_length: int,
    max_prompt_length: int,
    stats: TruncationStats | None = None,
) -> RankExample:
    """Same truncation policy as SFT: the prompt keeps its end, each answer its start."""
    stats = stats if stats is not None else TruncationStats()
    prompt = tokenizer(prompt_text(tokenizer, record.prompt), add_special_tokens=False)["input_ids"]
    stats.examples += 1
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        stats.prompt_truncated += 1
    sequences = []
    for answer in record.responses:
        ids = answer_ids(tokenizer, record.prompt, answer)
        if len(prompt) + len(ids) > max_length:
            ids = ids[: max_length - len(prompt)]
            stats.response_truncated += 1
        sequences.append(prompt + ids)
    return RankExample(sequences, record.pairs(), record.margin, len(prompt))


@dataclass
class RankBatch:
    input_ids: torch.Tensor
    """One row per answer: (answers, seq), every answer of every prompt in the micro-batch.
    Shared prompts: (prompts, seq), each prompt followed by its answers. Right-padded."""
    attention_mask: torch.Tensor
    """(rows, seq) 1 on tokens, 0 on padding."""
    pair_index: torch.Tensor
    """(pairs, 2) (better, worse) answers, numbered in order over the micro-batch's prompts."""
    pair_group: torch.Tensor
    """(pairs,) which prompt of the micro-batch each pair belongs to."""
    pair_margin: torch.Tensor
    """(pairs,) margin of each pair (0 where the data gives none)."""
    num_prompts: int
    segment_ids: torch.Tensor | None = None
    """Shared prompts only: (prompts, seq) PROMPT_SEGMENT, answer k (1-based) or PAD_SEGMENT."""
    position_ids: torch.Tensor | None = None
    """Shared prompts only: each answer's positions continue from its prompt's end."""
    score_index: torch.Tensor | None = None
    """Shared prompts only: (answers,) flat index (row * seq + column) of each answer's last token."""

    @property
    def shares_prompts(self) -> bool:
        return self.segment_ids is not None

    def to(self, device: torch.device) -> "RankBatch":
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return RankBatch(self.input_ids.to(device), self.attention_mask.to(device), self.pair_index.to(device),
                         self.pair_group.to(device), self.pair_margin.to(device), self.num_prompts,
                         move(self.segment_ids), move(self.position_ids), move(self.score_index))


def _pairs(examples: Sequence[RankExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs, groups, margins = [], [], []
    offset = 0
    for group, example in enumerate(examples):
        for better, worse in example.pairs:
            pairs.append((offset + better, offset + worse))
            groups.append(group)
            margins.append(example.margin or 0.0)
        offset += len(example.sequences)
    return (torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), torch.tensor(groups, dtype=torch.long),
            torch.tensor(margins, dtype=torch.float32))


def collate_rank(examples: Sequence[RankExample], pad_token_id: int) -> RankBatch:
    sequences = [seq for example in examples for seq in example.sequences]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    return RankBatch(input_ids, attention_mask, *_pairs(examples), len(examples))


def collate_rank_shared(examples: Sequence[RankExample], pad_token_id: int) -> RankBatch:
    """One row per prompt: [prompt, answer 1, ..., answer K], right-padded."""
    width = max(example.shared_length() for example in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, PAD_SEGMENT, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    score_index = []
    for row, example in enumerate(examples):
        prompt_length = example.prompt_length
        tokens = list(example.sequences[0][:prompt_length])
        segments = [PROMPT_SEGMENT] * prompt_length
        positions = list(range(prompt_length))
        for k, sequence in enumerate(example.sequences, start=1):
            answer = sequence[prompt_length:]
            tokens += answer
            segments += [k] * len(answer)
            positions += range(prompt_length, prompt_length + len(answer))
            # An empty answer (truncated away) is scored where its own row would end: the prompt's last token.
            end = len(tokens) - 1 if answer else prompt_length - 1
            score_index.append(row * width + max(end, 0))
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        segment_ids[row, : len(tokens)] = torch.tensor(segments)
        position_ids[row, : len(tokens)] = torch.tensor(positions)
    return RankBatch(input_ids, attention_mask, *_pairs(examples), len(examples), segment_ids, position_ids,
                     torch.tensor(score_index, dtype=torch.long))


class RankBatches:
    """Micro-batches of prompts (each with its K answers), reshuffled per epoch from a seed,
    randomly addressable like `SFTBatches` so a step's data depends only on (step, rank).

    With `share_prompt`, a micro-batch comes in the shared-prompt layout unless one of its
    rows would be longer than `max_shared_length` (a sliding attention window)."""

    def __init__(self, examples: Sequence[RankExample], micro_batch_size: int, pad_token_id: int, seed: int,
                 shuffle: bool = True, share_prompt: bool = False, max_shared_length: int | None = None):
        self.examples = list(examples)
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self.share_prompt = share_prompt
        self.max_shared_length = max_shared_length
        self._order = EpochOrder(len(self.examples), seed, shuffle)

    def __len__(self) -> int:
        return (len(self.examples) + self.micro_batch_size - 1) // self.micro_batch_size

    def batch(self, epoch: int, index: int) -> RankBatch:
        order = self._order(epoch)
        chunk = order[index * self.micro_batch_size : (index + 1) * self.micro_batch_size]
        examples = [self.examples[i] for i in chunk]
        if self.share_prompt and (self.max_shared_length is None
                                  or max(e.shared_length() for e in examples) <= self.max_shared_length):
            return collate_rank_shared(examples, self.pad_token_id)
        return collate_rank(examples, self.pad_token_id)

    def epoch(self, epoch: int) -> Iterator[RankBatch]:
        for index in range(len(self)):
            yield self.batch(epoch, index)
