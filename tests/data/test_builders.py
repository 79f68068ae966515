"""load_records over whole sources (errors, skipping, column mapping) and the train/eval split."""

from __future__ import annotations

import json

import pytest

from rlhf.config_sections import DataSourceConfig
from rlhf.data.builders import load_records, split_train_eval
from rlhf.data.records import Message, PretrainRecord, RankRecord, SFTRecord
from rlhf.errors import DataError, UserError


def write_jsonl(path, rows: list) -> str:
    """Rows are dicts, or raw strings written as they are (for malformed lines)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


GOOD = {"prompt": "Q", "response": "A"}


def test_sft_records_keep_their_source_and_the_report_counts(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, {"instruction": "I", "instances": [{"output": "1"}, {"output": "2"}]}])
    records, report = load_records("sft", DataSourceConfig(path=path))
    assert [type(r) for r in records] == [SFTRecord] * 3
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2", f"{path}:2"]
    assert (report.rows, report.records, report.skipped, report.first_errors) == (2, 3, 0, [])


def test_raise_stops_at_the_first_bad_row_including_read_errors(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, '{"prompt": "Q", "resp', {"prompt": "Q"}])
    with pytest.raises(DataError, match=f"^{path}:2: invalid JSON"):
        load_records("sft", DataSourceConfig(path=path))


def test_skip_counts_bad_rows_and_keeps_the_first_five_errors(tmp_path):
    bad = [{"prompt": "Q", "response": ""}] * 6 + ["[1]"]
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, *bad, GOOD])
    records, report = load_records("sft", DataSourceConfig(path=path), on_error="skip")
    assert len(records) == 2 and (report.rows, report.records, report.skipped) == (9, 2, 7)
    assert len(report.first_errors) == 5
    assert report.first_errors[0] == f"{path}:2: field 'response': empty or whitespace-only"


def test_skip_with_every_row_bad_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Q"}, {"prompt": "Q"}])
    with pytest.raises(UserError, match=f"^{path}: all 2 rows are malformed; first error: {path}:1: field 'response'"):
        load_records("sft", DataSourceConfig(path=path), on_error="skip")


def test_unknown_kind_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown data set kind 'dpo'"):
        load_records("dpo", DataSourceConfig(path=str(tmp_path / "x.jsonl")))


def test_unknown_format_and_unknown_column_field_are_user_errors(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD])
    with pytest.raises(UserError, match="'alpaca' is not one of the rank formats"):
        load_records("rank", DataSourceConfig(path=path, format="alpaca"))
    with pytest.raises(UserError, match="unknown field\\(s\\) in columns: promt"):
        load_records("sft", DataSourceConfig(path=path, columns={"promt": "question"}))


def test_csv_rank_with_column_mapping_and_list_cells(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('question,answers,ranking,margin\nQ,"[""a"", ""b"", ""c""]","[2, 1, 3]",0.5\n')
    source = DataSourceConfig(path=str(path), columns={"prompt": "question", "responses": "answers", "ranks": "ranking"})
    [record], _ = load_records("rank", source)
    assert record.prompt == [Message("user", "Q")] and record.responses == ["a", "b", "c"]
    assert record.scores == [-2.0, -1.0, -3.0] and record.margin == 0.5 and record.source == f"{path}:2"


def test_csv_malformed_cell_names_file_line_and_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("question,answer\nQ,A\nQ,\n")
    source = DataSourceConfig(path=str(path), columns={"prompt": "question", "response": "answer"})
    with pytest.raises(DataError, match=f"^{path}:3: field 'answer': empty or whitespace-only$"):
        load_records("sft", source)


def test_json_source(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    records, _ = load_records("pretrain", DataSourceConfig(path=str(path)))
    assert records == [PretrainRecord("a", f"{path}:1 (row 0)"), PretrainRecord("b", f"{path}:1 (row 1)")]


def test_parquet_rank_source(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "x.parquet"
    table = pyarrow.table({"prompt": ["Q1", "Q2"], "chosen": ["good", "fine"], "rejected": ["bad", "fine"]})
    pyarrow.parquet.write_table(table, path)
    [record], report = load_records("rank", DataSourceConfig(path=str(path)), on_error="skip")
    assert isinstance(record, RankRecord) and record.responses == ["good", "bad"]
    assert report.first_errors == [f"{path}:row 1: field 'rejected': chosen and rejected are identical"]


def test_saved_dataset_dict_prompt_source(tmp_path):
    import datasets

    datasets.DatasetDict({"eval": datasets.Dataset.from_list([{"prompt": "Q"}])}).save_to_disk(str(tmp_path / "dd"))
    [record], _ = load_records("prompt", DataSourceConfig(path=str(tmp_path / "dd"), split="eval"))
    assert record.prompt == [Message("user", "Q")] and record.source == f"{tmp_path / 'dd'}[eval]:row 0"


def test_split_is_deterministic_disjoint_and_complete():
    records = list(range(100))
    train, evaluation = split_train_eval(records, 0.1, seed=3)
    assert len(evaluation) == 10 and sorted(train + evaluation) == records
    assert split_train_eval(records, 0.1, seed=3) == (train, evaluation)
    assert split_train_eval(records, 0.1, seed=4) != (train, evaluation)


@pytest.mark.parametrize("count, fraction, sizes", [(2, 0.01, (1, 1)), (10, 0.0, (10, 0)), (1, 0.5, (1, 0))])
def test_split_sizes(count, fraction, sizes):
    train, evaluation = split_train_eval(list(range(count)), fraction, seed=0)
    assert (len(train), len(evaluation)) == sizes


def test_split_rejects_a_bad_fraction():
    with pytest.raises(ValueError):
        split_train_eval([1, 2], 1.0, seed=0)
