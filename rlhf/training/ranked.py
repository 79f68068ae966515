"""Ranked answers tokenised for the stages that read them (reward model, DPO): each prompt
once, each of its K answers after it, and the row layout the model allows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rlhf.data.rank_dataset import RankExample, encode_rank
from rlhf.data.records import RankRecord
from rlhf.data.sft_dataset import TruncationStats
from rlhf.models.shared_prefix import attention_window, shared_prefix_unsupported


@dataclass
class RankedExamples:
    train: list[RankExample]
    eval: list[RankExample]
    layout: dict
    """Keyword arguments of RankBatches / PreferenceBatches: `share_prompt` (one row
    [prompt, answer 1, ..., answer K] per prompt) and `max_shared_length`."""
    note: str
    """One line for the run's log: truncation counts, and why rows are one per answer if so."""


def encode_ranked(tokenizer, train: Sequence[RankRecord], eval: Sequence[RankRecord], data_cfg,
                  model_config) -> RankedExamples:
    """`data_cfg`: a stage's data section (max_length, max_prompt_length, share_prompt). The
    shared-prompt row is used unless the model's attention cannot take its block mask."""
    truncation = TruncationStats()
    lengths = (data_cfg.max_length, data_cfg.max_prompt_length)
    train_examples = [encode_rank(tokenizer, r, *lengths, truncation) for r in train]
    eval_examples = [encode_rank(tokenizer, r, *lengths) for r in eval]
    unsupported = data_cfg.share_prompt and shared_prefix_unsupported(model_config)
    layout = {"share_prompt": data_cfg.share_prompt and not unsupported,
              "max_shared_length": attention_window(model_config)}
    note = f"truncation: {truncation.as_dict()}" + (f"; one row per answer ({unsupported})" if unsupported else "")
    return RankedExamples(train_examples, eval_examples, layout, note)
