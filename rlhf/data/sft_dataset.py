"""SFT examples: tokenisation with prompt masking, truncation, packing and batching.

Truncation policy (counted, never silent):
1. A prompt (everything before the final answer) longer than `max_prompt_length` keeps its
   last `max_prompt_length` tokens: the question is usually at the end of a long context.
2. If prompt + final answer is still longer than `max_length`, the answer keeps its first
   tokens. Because `max_prompt_length < max_length`, every answer keeps at least one token;
   a truncated answer loses its EOS, which the counts report.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.data.order import EpochOrder
from rlhf.data.records import SFTRecord
from rlhf.data.template import TemplateError, conversation_segments
from rlhf.errors import DataError

IGNORE_INDEX = -100


@dataclass
class SFTExample:
    input_ids: list[int]
    labels: list[int]
    """Equal to input_ids on trained (answer) tokens, IGNORE_INDEX elsewhere."""


@dataclass
class TruncationStats:
    examples: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def encode_sft(
    tokenizer: PreTrainedTokenizerBase,
    record: SFTRecord,
    max_length: int,
    max_prompt_length: int,
    all_assistant_turns: bool = True,
    stats: TruncationStats | None = None,
) -> SFTExample:
    try:
        segments = conversation_segments(tokenizer, record.messages, all_assistant_turns)
    except TemplateError as exc:
        raise DataError(record.source, "messages", str(exc)) from None
    ids: list[int] = []
    labels: list[int] = []
    answer_start = 0
    for segment in segments:
        if segment.final_answer:
            answer_start = len(ids)
        piece = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        if segment.append_eos:
            piece = piece + [tokenizer.eos_token_id]
        ids.extend(piece)
        labels.extend(piece if segment.trained else [IGNORE_INDEX] * len(piece))

    prompt_ids, prompt_labels = ids[:answer_start], labels[:answer_start]
    answer_ids, answer_labels = ids[answer_start:], labels[answer_start:]
    stats = stats if stats is not None else TruncationStats()
    stats.examples += 1
    if len(prompt_ids) > max_prompt_length:
        prompt_ids, prompt_labels = prompt_ids[-max_prompt_length:], prompt_labels[-max_prompt_length:]
        stats.prompt_truncated += 1
    room = max_length - len(prompt_ids)
    if len(answer_ids) > room:
        answer_ids, answer_labels = answer_ids[:room], answer_labels[:room]
        stats.response_truncated += 1
    return SFTExample(prompt_ids + answer_ids, prompt_labels + answer_labels)


@dataclass
class SFTBatch:
    input_ids: torch.Tensor
    """(batch, seq) token ids."""
    labels: torch.Tensor
    """(batch, seq), IGNORE_INDEX on prompt and padding tokens."""
    attention_mask: torch.Tensor | None
    """(batch, seq) 1 on real tokens; None for packed rows, whose `position_ids` restart at
    every example so that attention stays within it."""
    position_ids: torch.Tensor | None = None
    real_tokens: int = 0
    """Tokens of the examples themselves, padding left out (what throughput counts)."""
    segment_lengths: list[int] | None = None
    """For a padding-free row (one row, no padding): the lengths of its examples in order,
    which attention uses to keep within each (`rlhf.models.segments`)."""

    def to(self, device: torch.device) -> "SFTBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SFTBatch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids),
                        self.real_tokens, self.segment_lengths)

    @property
    def num_target_tokens(self) -> int:
        # Labels are shifted by one inside the loss: the first position is never a target.
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate_padded(examples: Sequence[SFTExample], pad_token_id: int) -> SFTBatch:
    """Right-pad to the longest example; padding is masked out by attention_mask and labels."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return SFTBatch(input_ids, labels, attention_mask, real_tokens=sum(len(e.input_ids) for e in examples))


@dataclass
class PackedRow:
    examples: list[SFTExample] = field(default_factory=list)

    @property
    def length(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def pack_examples(examples: Sequence[SFTExample], max_length: int) -> list[PackedRow]:
    """Best-fit-decreasing bin packing of whole examples into rows of at most max_length
    tokens; an example is never split across rows."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[PackedRow] = []
    for index in order:
        example = examples[index]
        fits = [r for r in rows if r.length + len(example.input_ids) <= max_length]
        if fits:
            min(fits, key=lambda r: max_length - r.length).examples.append(example)
        else:
            rows.append(PackedRow([example]))
    return rows


def collate_packed(rows: Sequence[PackedRow], pad_token_id: int) -> SFTBatch:
    """Concatenate each row's examples with restarting position_ids and no attention_mask:
    transformers then builds a block-diagonal causal mask (no attention across examples).
    The tail padding forms its own block and carries no labels."""
    width = max(r.length for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for row_index, row in enumerate(rows):
        at = 0
        for example in row.examples:
            n = len(example.input_ids)
            input_ids[row_index, at : at + n] = torch.tensor(example.input_ids)
            labels[row_index, at : at + n] = torch.tensor(example.labels)
            # The first token of an example is never a target of the previous one.
            labels[row_index, at] = IGNORE_INDEX
            position_ids[row_index, at : at + n] = torch.arange(n)
            at += n
        position_ids[row_index, at:] = torch.arange(width - at)
    return SFTBatch(input_ids, labels, None, position_ids, real_tokens=sum(r.length for r in rows))


def collate_padding_free(examples: Sequence[SFTExample]) -> SFTBatch:
    """All examples in one row, back to back, with no padding: positions restart at every
    example and `segment_lengths` tells attention where each ends. The first token of an
    example is never a target of the previous one."""
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX] + example.labels[1:]
        positions += range(len(example.input_ids))
    return SFTBatch(torch.tensor([input_ids]), torch.tensor([labels]), None, torch.tensor([positions]),
                    real_tokens=len(input_ids), segment_lengths=[len(e.input_ids) for e in examples])


GROUP_WINDOW = 64
"""Micro-batches per length-sorted window: wide enough that neighbours have close lengths,
narrow enough that the epoch's random order still decides what meets what."""


def group_by_length(order: Sequence[int], lengths: Sequence[int], micro_batch_size: int,
                    rng: random.Random) -> list[int]:
    """`order` rearranged so that each consecutive `micro_batch_size` slice holds examples of
    similar length: windows of GROUP_WINDOW micro-batches are sorted longest first and cut
    into micro-batches, then all micro-batches are shuffled. Only the last micro-batch may be
    short, as without grouping."""
    window = micro_batch_size * GROUP_WINDOW
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [part[m : m + micro_batch_size] for m in range(0, len(part), micro_batch_size)]
    short = batches.pop() if batches and len(batches[-1]) < micro_batch_size else None
    rng.shuffle(batches)
    if short is not None:
        batches.append(short)
    return [i for batch in batches for i in batch]


class SFTBatches:
    """Micro-batches of SFT examples (padding-free, padded or packed), reshuffled each epoch
    from a seed. Padding-free micro-batches hold the same examples as padded ones (or, with
    packing, as the packed rows), concatenated into one row.

    The order depends only on (seed, epoch), so a resumed run can skip to the same position
    and a sharded run can take every world_size-th micro-batch.
    """

    def __init__(
        self,
        examples: Sequence[SFTExample],
        micro_batch_size: int,
        pad_token_id: int,
        packing: bool,
        max_length: int,
        seed: int,
        shuffle: bool = True,
        group_by_length: bool = False,
        padding_free: bool = False,
    ):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.padding_free = padding_free
        self.micro_batch_size = micro_batch_size
        self.units: Sequence = pack_examples(examples, max_length) if packing else list(examples)
        self._order = EpochOrder(len(self.units), seed, shuffle)
        self.seed = seed
        # Packed and padding-free rows are already full; grouping only makes sense for padded batches.
        self.group_by_length = group_by_length and not packing and not padding_free and shuffle
        self._grouped: tuple[int, list[int]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        order = self._order(epoch)
        if not self.group_by_length:
            return order
        if self._grouped is None or self._grouped[0] != epoch:
            self._grouped = (epoch, group_by_length(order, [len(u.input_ids) for u in self.units],
                                                    self.micro_batch_size, random.Random(f"{self.seed}-{epoch}")))
        return self._grouped[1]

    def __len__(self) -> int:
        return (len(self.units) + self.micro_batch_size - 1) // self.micro_batch_size

    def batch(self, epoch: int, index: int) -> SFTBatch:
        """Micro-batch `index` of `epoch`: random access, so any position can be resumed."""
        order = self._epoch_order(epoch)
        chunk = [self.units[i] for i in order[index * self.micro_batch_size : (index + 1) * self.micro_batch_size]]
        if self.padding_free:
            return collate_padding_free([e for row in chunk for e in row.examples] if self.packing else chunk)
        return collate_packed(chunk, self.pad_token_id) if self.packing else collate_padded(chunk, self.pad_token_id)

    def epoch(self, epoch: int) -> Iterator[SFTBatch]:
        for index in range(len(self)):
            yield self.batch(epoch, index)


def tokenize_sft(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[SFTRecord],
    max_length: int,
    max_prompt_length: int,
    all_assistant_turns: bool,
) -> tuple[list[SFTExample], TruncationStats]:
    stats = TruncationStats()
    examples = [
        encode_sft(tokenizer, record, max_length, max_prompt_length, all_assistant_turns, stats) for record in records
    ]
    return examples, stats


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> SFTExample:
    """Plain text (pretraining data): every token is a target; EOS closes the document."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 1] + [tokenizer.eos_token_id]
    return SFTExample(ids, list(ids))
