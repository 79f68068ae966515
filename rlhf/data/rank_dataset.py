"""Reward-model batches with InstructGPT's K-wise layout: a batch element is one prompt with
its K answers; the K sequences are scored in one forward pass and every (better, worse)
pair of that prompt is compared from those K scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.data.order import EpochOrder
from rlhf.data.records import RankRecord
from rlhf.data.sft_dataset import TruncationStats
from rlhf.data.template import answer_ids, prompt_text


@dataclass
class RankExample:
    sequences: list[list[int]]
    """K token sequences: prompt + answer_k (ending with EOS unless truncated)."""
    pairs: list[tuple[int, int]]
    """(better, worse) indices into `sequences`; ties give none."""
    margin: float | None


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
    return RankExample(sequences, record.pairs(), record.margin)


@dataclass
class RankBatch:
    input_ids: torch.Tensor
    """(answers, seq) every answer of every prompt in the micro-batch, right-padded."""
    attention_mask: torch.Tensor
    pair_index: torch.Tensor
    """(pairs, 2) (better, worse) rows of input_ids."""
    pair_group: torch.Tensor
    """(pairs,) which prompt of the micro-batch each pair belongs to."""
    pair_margin: torch.Tensor
    """(pairs,) margin of each pair (0 where the data gives none)."""
    num_prompts: int

    def to(self, device: torch.device) -> "RankBatch":
        return RankBatch(self.input_ids.to(device), self.attention_mask.to(device), self.pair_index.to(device),
                         self.pair_group.to(device), self.pair_margin.to(device), self.num_prompts)


def collate_rank(examples: Sequence[RankExample], pad_token_id: int) -> RankBatch:
    sequences = [seq for example in examples for seq in example.sequences]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    pairs, groups, margins = [], [], []
    offset = 0
    for group, example in enumerate(examples):
        for better, worse in example.pairs:
            pairs.append((offset + better, offset + worse))
            groups.append(group)
            margins.append(example.margin or 0.0)
        offset += len(example.sequences)
    return RankBatch(
        input_ids,
        attention_mask,
        torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        torch.tensor(groups, dtype=torch.long),
        torch.tensor(margins, dtype=torch.float32),
        len(examples),
    )


class RankBatches:
    """Micro-batches of prompts (each with its K answers), reshuffled per epoch from a seed,
    randomly addressable like `SFTBatches` so a step's data depends only on (step, rank)."""

    def __init__(self, examples: Sequence[RankExample], micro_batch_size: int, pad_token_id: int, seed: int,
                 shuffle: bool = True):
        self.examples = list(examples)
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self._order = EpochOrder(len(self.examples), seed, shuffle)

    def __len__(self) -> int:
        return (len(self.examples) + self.micro_batch_size - 1) // self.micro_batch_size

    def batch(self, epoch: int, index: int) -> RankBatch:
        order = self._order(epoch)
        chunk = order[index * self.micro_batch_size : (index + 1) * self.micro_batch_size]
        return collate_rank([self.examples[i] for i in chunk], self.pad_token_id)

    def epoch(self, epoch: int) -> Iterator[RankBatch]:
        for index in range(len(self)):
            yield self.batch(epoch, index)
