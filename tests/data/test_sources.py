"""Reading rows and their locations from every supported kind of source."""

from __future__ import annotations

import gzip
import json

import pytest

from rlhf.config_sections import DataSourceConfig
from rlhf.data.sources import iter_rows
from rlhf.errors import UserError


def rows_of(path, **kwargs) -> list:
    return list(iter_rows(DataSourceConfig(path=str(path), **kwargs)))


def test_jsonl_locations_count_physical_lines_and_skip_blank_ones(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    rows = rows_of(path)
    assert [(row.location, row.data) for row in rows] == [(f"{path}:1", {"a": 1}), (f"{path}:4", {"a": 2})]
    assert all(row.error is None for row in rows)


def test_jsonl_with_utf8_bom_parses(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"text": "caf\u00e9"}\n'.encode())
    [row] = rows_of(path)
    assert row.data == {"text": "caf\u00e9"} and row.error is None


def test_jsonl_gz(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.write('{"a": 1}\n{"a": 2}\n')
    assert [row.data for row in rows_of(path)] == [{"a": 1}, {"a": 2}]


def test_jsonl_invalid_utf8_is_a_row_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    good, bad = rows_of(path)
    assert good.error is None and bad.data is None
    assert str(bad.error) == f"{path}:2: invalid UTF-8 (byte offset 7 in the line)"


def test_jsonl_truncated_line_is_a_row_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"prompt": "hi", "resp\n')
    bad = rows_of(path)[2]
    assert str(bad.error).startswith(f"{path}:3: invalid JSON: ")


def test_jsonl_non_object_is_a_row_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('["a", "b"]\n')
    assert str(rows_of(path)[0].error) == f"{path}:1: expected a JSON object, got list"


def test_json_array_locations_give_line_and_row(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}, 3], indent=2))
    rows = rows_of(path)
    assert [row.location for row in rows] == [f"{path}:2 (row 0)", f"{path}:5 (row 1)", f"{path}:8 (row 2)"]
    assert rows[1].data == {"a": 2}
    assert str(rows[2].error).endswith("expected a JSON object, got int")


def test_json_object_wrapping_one_list(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"version": "1.0",\n "data": [\n  {"a": 1},\n  {"a": 2}]}')
    rows = rows_of(path)
    assert [(row.location, row.data) for row in rows] == [(f"{path}:3 (row 0)", {"a": 1}), (f"{path}:4 (row 1)", {"a": 2})]


def test_json_object_with_several_lists_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"train": [{"a": 1}], "test": [{"a": 2}]}')
    with pytest.raises(UserError, match="found an object with keys: train, test"):
        rows_of(path)


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert [(row.location, row.data) for row in rows_of(path)] == [(f"{path}:1", {"a": 1}), (f"{path}:2", {"a": 2})]


def test_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n{"a": 1},\n{"a": }\n]')
    with pytest.raises(UserError, match=f"{path}:3: invalid JSON"):
        rows_of(path)


def test_csv_locations_and_json_list_cells(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('prompt,responses,note\n"multi\nline","[""a"", ""b""]",[not json\n\nq,"[1, 2]",plain\n')
    first, second = rows_of(path)
    assert first.location == f"{path}:2" and second.location == f"{path}:5"
    assert first.data == {"prompt": "multi\nline", "responses": ["a", "b"], "note": "[not json"}
    assert second.data["responses"] == [1, 2]


def test_csv_invalid_utf8_names_the_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"prompt,response\nhi,ok\nhi,\xff\xfe\n")
    good, bad = rows_of(path)
    assert good.error is None
    assert str(bad.error) == f"{path}:3: field 'response': invalid UTF-8"


def test_csv_row_with_extra_cells_is_a_row_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt,response\na,b,c\n")
    assert "the row has 3 cells but the header has 2 columns" in str(rows_of(path)[0].error)


def test_parquet(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "x.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["a", "b"], "n": [1, None]}), path)
    rows = rows_of(path)
    assert [(row.location, row.data) for row in rows] == [
        (f"{path}:row 0", {"text": "a", "n": 1}), (f"{path}:row 1", {"text": "b", "n": None})
    ]


def test_saved_dataset_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
    rows = rows_of(tmp_path / "ds")
    assert [(row.location, row.data) for row in rows] == [
        (f"{tmp_path / 'ds'}:row 0", {"text": "a"}), (f"{tmp_path / 'ds'}:row 1", {"text": "b"})
    ]


def test_saved_dataset_dict_picks_the_split(tmp_path):
    import datasets

    saved = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"text": "a"}]),
        "test": datasets.Dataset.from_list([{"text": "b"}, {"text": "c"}]),
    })
    saved.save_to_disk(str(tmp_path / "dd"))
    rows = rows_of(tmp_path / "dd", split="test")
    assert [row.data["text"] for row in rows] == ["b", "c"]
    assert rows[1].location == f"{tmp_path / 'dd'}[test]:row 1"
    with pytest.raises(UserError, match="no split 'validation'; available splits: test, train"):
        rows_of(tmp_path / "dd", split="validation")


def test_hub_id_failure_is_a_user_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as caught:
        rows_of("someone/some-dataset")
    assert str(caught.value) == (
        "cannot load dataset 'someone/some-dataset': file not found locally and the hub load failed: "
        "ConnectionError: no network"
    )


@pytest.mark.parametrize("path", ["./missing", "/nope/x", "missing.jsonl", "dir/missing.parquet"])
def test_missing_local_path(path):
    with pytest.raises(UserError, match=f"^{path}: file not found$"):
        rows_of(path)


@pytest.mark.parametrize("name, content", [
    ("x.jsonl", ""), ("y.jsonl", "\n  \n"), ("x.csv", "prompt,response\n"), ("x.json", "[]"), ("y.json", ""),
])
def test_empty_file_has_no_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=f"^{path}: no rows$"):
        rows_of(path)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hello")
    with pytest.raises(UserError, match="unsupported file type"):
        rows_of(path)
