"""`rlhf rm score` and `rlhf rm eval`: a trained reward model's score for every answer of a data
file, and its pairwise accuracy on it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from rlhf.config_sections import DataSourceConfig, KernelsConfig, ModelConfig
from rlhf.data.builders import load_records
from rlhf.data.rank_dataset import RankBatches, encode_rank
from rlhf.data.records import RankRecord
from rlhf.distributed.strategy import pick_device
from rlhf.kernels import accelerate
from rlhf.models.loading import load_tokenizer
from rlhf.models.reward import load_scalar_model
from rlhf.models.shared_prefix import attention_window, shared_prefix_unsupported
from rlhf.training.reward import rank_scores


@torch.no_grad()
def score_records(model: torch.nn.Module, tokenizer, records: list[RankRecord], max_length: int,
                  max_prompt_length: int, batch_size: int = 8,
                  finished: Sequence[bool] | None = None) -> list[list[float]]:
    """Scores of each record's answers, in order. Answers are encoded closed by EOS, as the RM
    trained on them; `finished[i]` False marks record i's answers as cut at a token limit before
    EOS (a sampled answer that ran out of tokens): those are scored without the EOS, at their
    last token, as PPO's reward model scores a cut rollout (rlhf/roles/roles.py `scores`)."""
    device = next(model.parameters()).device
    examples = [encode_rank(tokenizer, r, max_length, max_prompt_length) for r in records]
    for example, done in zip(examples, finished or ()):
        if not done:
            for sequence in example.sequences:
                if len(sequence) > example.prompt_length and sequence[-1] == tokenizer.eos_token_id:
                    sequence.pop()
    batches = RankBatches(examples, batch_size, tokenizer.pad_token_id, seed=0, shuffle=False,
                          share_prompt=shared_prefix_unsupported(model.config) is None,
                          max_shared_length=attention_window(model.config))
    flat: list[float] = []
    for batch in batches.epoch(0):
        flat.extend(rank_scores(model, batch.to(device)).tolist())
    out, at = [], 0
    for record in records:
        out.append(flat[at : at + len(record.responses)])
        at += len(record.responses)
    return out


def _load_and_score(model_dir: str, data: str, max_length: int, max_prompt_length: int, on_error: str,
                    batch_size: int) -> tuple[list[RankRecord], list[list[float]], int]:
    records, report = load_records("rank", DataSourceConfig(path=data), on_error)
    cfg = ModelConfig(path=model_dir)
    tokenizer = load_tokenizer(cfg)
    model = load_scalar_model(cfg, pick_device()).eval()
    accelerate(model, KernelsConfig())
    return records, score_records(model, tokenizer, records, max_length, max_prompt_length, batch_size), report.skipped


def pair_accuracy(records: list[RankRecord], scores: list[list[float]]) -> dict[str, float]:
    """Over every pair of a record's answers whose preference scores differ (all C(K,2) pairs
    of a K-way ranking without ties): the share the model orders as the data does (a model
    tie counts as wrong), and the mean margin score(better) - score(worse)."""
    pairs = correct = 0
    margin = 0.0
    for record, row_scores in zip(records, scores):
        for better, worse in record.pairs():
            pairs += 1
            correct += row_scores[better] > row_scores[worse]
            margin += row_scores[better] - row_scores[worse]
    return {"pairs": pairs, "accuracy": correct / max(pairs, 1), "mean_margin": margin / max(pairs, 1)}


def rank_accuracy(model_dir: str, data: str, max_length: int, max_prompt_length: int, on_error: str = "raise",
                  batch_size: int = 8) -> dict[str, float]:
    records, scores, skipped = _load_and_score(model_dir, data, max_length, max_prompt_length, on_error, batch_size)
    return {"model": model_dir, "data": data, "rows": len(records), "skipped": skipped,
            **pair_accuracy(records, scores)}


def score_file(model_dir: str, data: str, out: str, max_length: int, max_prompt_length: int,
               on_error: str = "raise", batch_size: int = 8) -> dict[str, float]:
    records, scores, skipped = _load_and_score(model_dir, data, max_length, max_prompt_length, on_error, batch_size)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        for record, row_scores in zip(records, scores):
            handle.write(json.dumps({"source": record.source, "prompt": record.prompt[-1].content,
                                     "responses": record.responses, "scores": row_scores}) + "\n")
    os.replace(tmp, out_path)
    return {"rows": len(records), "skipped": skipped, **pair_accuracy(records, scores)}
