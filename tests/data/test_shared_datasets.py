"""The real public datasets in ../shared/datasets load as the set kinds they are meant for."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config_sections import DataSourceConfig
from rlhf.data.builders import load_records

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")

HH_PAIRS = SHARED / "hh_rlhf_harmless_pairs.jsonl"


def load(kind: str, name: str, on_error: str = "raise"):
    return load_records(kind, DataSourceConfig(path=str(SHARED / name)), on_error=on_error)


def test_self_instruct_seed_tasks_as_sft():
    records, report = load("sft", "self_instruct_seed_tasks.jsonl")
    assert report.rows == 175 and len(records) >= 175


def test_hh_pairs_as_rank_all_rows_parse():
    # Every row parses, including the ones HH makes awkward: four rows whose sampled answer
    # runs on into invented "\n\nHuman:"/"\n\nAssistant:" turns (lines 1255, 1689, 1951, 1953:
    # the answer keeps them), and four whose chosen answer is empty (lines 87, 517, 926,
    # 1104: an empty reply was the preferred, harmless one).
    records, report = load("rank", "hh_rlhf_harmless_pairs.jsonl")
    assert report.rows == len(records) == 2000
    assert all(record.prompt[-1].role == "user" and len(record.pairs()) == 1 for record in records)
    assert sum(record.responses[0] == "" for record in records) == 4
    run_on = records[1952]  # line 1953
    assert run_on.prompt[-1].content == "Yes, please find me a serial."
    assert "\n\nAssistant:" in run_on.responses[0]


def test_hh_pairs_as_sft_on_chosen():
    # SFT needs an answer to learn, so the four rows with an empty chosen answer are skipped.
    records, report = load("sft", "hh_rlhf_harmless_pairs.jsonl", on_error="skip")
    assert (report.rows, len(records), report.skipped) == (2000, 1996, 4)
    assert all(f"field 'chosen': turn {n} ('Assistant:') is empty" in error
               for n, error in zip((4, 2, 2, 2), report.first_errors))
    assert all(record.messages[-1].role == "assistant" for record in records)


def test_hh_pairs_as_prompt_set():
    records, _ = load("prompt", "hh_rlhf_harmless_pairs.jsonl")
    assert len(records) == 2000 and all(record.prompt[-1].role == "user" for record in records)
    # Each row's chosen answer is its reference for rlhf eval; the four empty ones are empty.
    references = [record.fields["reference"] for record in records]
    assert sum(reference == "" for reference in references) == 4
    assert "\n\nAssistant:" not in references[1952] and references[1952]  # the run-on answer's turns are joined


def test_self_instruct_user_oriented_as_prompt_set():
    records, report = load("prompt", "self_instruct_user_oriented.jsonl")
    assert report.rows == len(records) == 252
    assert all(len(record.prompt) == 1 and record.prompt[0].role == "user" for record in records)
