"""Bad input for the dataset builders (issue 8): every malformed row gives one clear error that
names file:line and the field, or is skipped and counted under on_error="skip"; file-level
problems (empty, unreadable, undecodable as a whole) always stop the load.

Most cases write a three-line JSONL file `good, bad, good`, so the bad row is on line 2 and the
skip tests can check that the good rows around it survive.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config_sections import DataSourceConfig, ModelConfig
from rlhf.data import sources
from rlhf.data.builders import load_records
from rlhf.data.prompt_dataset import encode_prompt
from rlhf.data.rank_dataset import encode_rank
from rlhf.data.records import LoadReport, Message, PromptRecord, RankRecord, SFTRecord
from rlhf.data.sft_dataset import TruncationStats, tokenize_sft
from rlhf.data.template import prompt_text
from rlhf.errors import DataError, UserError

REPO = Path(__file__).resolve().parents[2]
BOM = b"\xef\xbb\xbf"
KINDS = ("sft", "rank", "prompt", "pretrain")
GOOD = {
    "sft": {"prompt": "Name a fruit.", "response": "Apple."},
    "rank": {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Rock."},
    "prompt": {"prompt": "Name a fruit."},
    "pretrain": {"text": "Apples grow on trees."},
}
HH = "\n\nHuman: Name a fruit.\n\nAssistant: Apple."
CONVERSATION = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]


def line_bytes(row: dict | bytes) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row).encode()


def write_lines(path: Path, rows: list, final_newline: bool = True) -> str:
    """Rows are dicts (written as JSON) or raw bytes (written as they are)."""
    path.write_bytes(b"\n".join(line_bytes(row) for row in rows) + (b"\n" if final_newline else b""))
    return str(path)


def load(path: str, kind: str, on_error: str = "raise", **source) -> tuple[list, LoadReport]:
    return load_records(kind, DataSourceConfig(path=path, **source), on_error)


def plain(records: list) -> list:
    """Records without their source, to compare loads of different files."""
    return [dataclasses.replace(record, source="") for record in records]


def utf8_case(kind: str) -> tuple:
    line = json.dumps(GOOD[kind]).encode().replace(b'": "', b'": "\xff', 1)
    offset = line.index(b"\xff")
    return (f"invalid-utf8-{kind}", kind, line, None, f"invalid UTF-8 (byte offset {offset} in the line)")


def truncated_case(kind: str) -> tuple:
    return (f"truncated-{kind}", kind, json.dumps(GOOD[kind])[:-4].encode(), None,
            "invalid JSON: the line ends before the JSON value is complete (cut off?)")


# (id, kind, bad row, field named by the error, message after "file:2: " [, more fragments]).
CASES = [
    # Missing fields: the message lists the row's fields and the accepted formats.
    ("missing-response", "sft", {"prompt": "Q"}, "response",
     "field 'response': missing; the row has fields: prompt; accepted sft formats: messages | "),
    ("missing-rejected", "rank", {"prompt": "Q", "chosen": "A"}, "rejected",
     "field 'rejected': missing; the row has fields: prompt, chosen; accepted rank formats: "),
    ("missing-prompt", "prompt", {"system": "Be brief."}, "prompt",
     "field 'prompt': missing; the row has fields: system; accepted prompt formats: "),
    ("missing-text", "pretrain", {}, "text", "field 'text': missing; the row has fields: none; accepted pretrain"),
    ("empty-object", "sft", {}, None, "no known fields; the row has fields: none; accepted sft formats: "),
    # Renamed fields: the unknown column is suggested as the mapping.
    # A numeric column (an id) is not what a text field was renamed to.
    ("renamed-prompt-sft", "sft", {"id": 3, "question": "Q", "response": "A"}, "prompt",
     "field 'prompt': missing; the row has fields: id, question, response;",
     "; if 'question' holds the prompt, map it with `columns: {prompt: question}`"),
    # A plain-text chosen without a prompt was read as a broken HH dialogue before.
    ("renamed-prompt-rank", "rank", {"question": "Q", "chosen": "A", "rejected": "B"}, "prompt",
     "field 'prompt': missing; the row has fields: question, chosen, rejected;",
     "map it with `columns: {prompt: question}`"),
    ("renamed-chosen", "rank", {"prompt": "Q", "better": "A", "rejected": "B"}, "chosen",
     "field 'chosen': missing; the row has fields: prompt, better, rejected;",
     "map it with `columns: {chosen: better}`"),
    ("renamed-prompt-prompt", "prompt", {"question": "Q"}, "prompt", "field 'prompt': missing;",
     "map it with `columns: {prompt: question}`"),
    ("renamed-text", "pretrain", {"content": "T"}, "text", "field 'text': missing;",
     "map it with `columns: {text: content}`"),
    # Wrong types.
    ("number-sft", "sft", {"prompt": "Q", "response": 42}, "response",
     "field 'response': expected a string or a list with one assistant message, got int"),
    ("number-rank", "rank", {"prompt": "Q", "chosen": 1.5, "rejected": "B"}, "chosen",
     "field 'chosen': expected a string or a list with one assistant message, got float"),
    ("number-prompt", "prompt", {"prompt": 7}, "prompt",
     "field 'prompt': expected a string or a list of messages, got int"),
    ("number-pretrain", "pretrain", {"text": 7}, "text", "field 'text': expected a string, got int"),
    ("bool-prompt", "prompt", {"prompt": True}, "prompt",
     "field 'prompt': expected a string or a list of messages, got bool"),
    ("object-rank", "rank", {"prompt": "Q", "chosen": {"text": "A"}, "rejected": "B"}, "chosen",
     "field 'chosen': expected a string or a list with one assistant message, got object"),
    ("list-of-strings-sft", "sft", {"prompt": ["Q"], "response": "A"}, "prompt",
     "field 'prompt': message 0: expected an object with 'role' and 'content', got str"),
    ("list-pretrain", "pretrain", {"text": ["T"]}, "text", "field 'text': expected a string, got list"),
    ("string-for-list", "rank", {"prompt": "Q", "responses": "A"}, "responses",
     "field 'responses': expected a list of strings, got str"),
    ("number-in-answers", "rank", {"prompt": "Q", "responses": ["A", 2]}, "responses",
     "field 'responses': answer 1: expected a string, got int"),
    ("string-score", "rank", {"prompt": "Q", "responses": ["A", "B"], "scores": [1, "high"]}, "scores",
     "field 'scores': value 1: expected a number, got str"),
    ("nan-score", "rank", {"prompt": "Q", "responses": ["A", "B"], "scores": [float("nan"), 1]}, "scores",
     "field 'scores': value 0: expected a finite number, got nan"),
    ("unknown-role", "sft", {"messages": [CONVERSATION[0], {"role": "bot", "content": "A"}]}, "messages",
     "field 'messages': message 1: role 'bot' is not one of system, user, assistant"),
    ("null-sft", "sft", {"prompt": "Q", "response": None}, "response", "field 'response': null instead of a value"),
    ("null-rank", "rank", {"prompt": "Q", "chosen": "A", "rejected": None}, "rejected",
     "field 'rejected': null instead of a value"),
    ("null-prompt", "prompt", {"prompt": None}, "prompt", "field 'prompt': null instead of a value"),
    ("null-pretrain", "pretrain", {"text": None}, "text", "field 'text': null instead of a value"),
    # Empty and whitespace-only strings (Unicode spaces included).
    ("empty-sft", "sft", {"prompt": "Q", "response": ""}, "response", "field 'response': empty or whitespace-only"),
    ("whitespace-sft", "sft", {"prompt": " \t\n", "response": "A"}, "prompt",
     "field 'prompt': empty or whitespace-only"),
    ("empty-rank", "rank", {"prompt": "Q", "chosen": "", "rejected": "B"}, "chosen",
     "field 'chosen': empty or whitespace-only"),
    ("whitespace-answer", "rank", {"prompt": "Q", "responses": ["A", "  "]}, "responses",
     "field 'responses': answer 1: empty or whitespace-only"),
    ("whitespace-prompt", "prompt", {"prompt": "\n\n"}, "prompt", "field 'prompt': empty or whitespace-only"),
    ("unicode-space-pretrain", "pretrain", {"text": "\u00a0\u3000"}, "text", "field 'text': empty or whitespace-only"),
    ("empty-content", "sft", {"messages": [CONVERSATION[0], {"role": "assistant", "content": " "}]}, "messages",
     "field 'messages': message 1: content: empty or whitespace-only"),
    ("empty-messages", "prompt", {"messages": []}, "messages", "field 'messages': empty message list"),
    # Bytes and JSON that cannot be read: the line is named, no field applies.
    *[utf8_case(kind) for kind in KINDS],
    # JSON may escape half a surrogate pair; tokenizers then fail with a TypeError.
    ("lone-surrogate", "sft", b'{"prompt": "Q\\ud800", "response": "A"}', "prompt",
     "field 'prompt': invalid Unicode: an unpaired surrogate \\ud800 at character 1"),
    *[truncated_case(kind) for kind in KINDS],
    ("not-an-object", "rank", b'["Q", "A", "B"]', None, "expected a JSON object, got list"),
    ("single-quotes", "prompt", b"{'prompt': 'Q'}", None,
     "invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    ("deeply-nested", "sft", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None,
     "invalid JSON: arrays or objects nested too deeply"),
    ("huge-integer", "rank", b'{"prompt": "Q", "responses": ["A", "B"], "scores": [1' + b"0" * 5000 + b", 1]}", None,
     "invalid JSON: a number has too many digits"),
    # Preference rows that give no usable pair.
    ("chosen-equals-rejected", "rank", {"prompt": "Q", "chosen": "Same.", "rejected": "Same."}, "rejected",
     "field 'rejected': chosen and rejected are identical"),
    ("equal-up-to-whitespace", "rank", {"prompt": "Q", "chosen": "Same.", "rejected": " Same.\n"}, "rejected",
     "field 'rejected': chosen and rejected are identical"),
    ("hh-identical", "rank", {"chosen": HH, "rejected": HH}, "rejected",
     "field 'rejected': chosen and rejected are identical"),
    ("conversations-identical", "rank", {"chosen": CONVERSATION, "rejected": CONVERSATION}, "rejected",
     "field 'rejected': chosen and rejected are identical"),
    ("one-answer", "rank", {"prompt": "Q", "responses": ["A"]}, "responses",
     "field 'responses': needs at least 2 answers to rank, got 1"),
    ("no-answers", "rank", {"prompt": "Q", "responses": []}, "responses",
     "field 'responses': needs at least 2 answers to rank, got 0"),
    ("tied-scores", "rank", {"prompt": "Q", "responses": ["A", "B"], "scores": [0.5, 0.5]}, "scores",
     "field 'scores': all answers are tied: no preference pair"),
    ("tied-ranks", "rank", {"prompt": "Q", "responses": ["A", "B", "C"], "ranks": [2, 2, 2]}, "ranks",
     "field 'ranks': all answers are tied: no preference pair"),
    ("scores-length", "rank", {"prompt": "Q", "responses": ["A", "B"], "scores": [1]}, "scores",
     "field 'scores': has 1 values but there are 2 responses"),
]
CASE_PARAMS = [pytest.param(kind, bad, field, fragments, id=case_id) for case_id, kind, bad, field, *fragments in CASES]


def bad_file(tmp_path: Path, kind: str, bad) -> str:
    return write_lines(tmp_path / "data.jsonl", [GOOD[kind], bad, GOOD[kind]])


@pytest.mark.parametrize("kind, bad, field, fragments", CASE_PARAMS)
def test_bad_row_is_one_line_error_naming_file_line_and_field(tmp_path, kind, bad, field, fragments):
    path = bad_file(tmp_path, kind, bad)
    with pytest.raises(DataError) as caught:
        load(path, kind)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: {fragments[0]}"), message
    assert all(fragment in message for fragment in fragments[1:]), message
    assert caught.value.field == field
    assert "\n" not in message  # the CLI prints it as one line


@pytest.mark.parametrize("kind, bad, field, fragments", CASE_PARAMS)
def test_bad_row_is_skipped_and_counted(tmp_path, kind, bad, field, fragments):
    path = bad_file(tmp_path, kind, bad)
    with pytest.raises(DataError) as caught:
        load(path, kind)
    records, report = load(path, kind, on_error="skip")
    assert [record.source for record in records] == [f"{path}:1", f"{path}:3"]
    assert (report.rows, report.records, report.skipped) == (3, 2, 1)
    assert report.first_errors == [str(caught.value)]


@pytest.mark.parametrize("kind, row, columns", [
    ("sft", {"question": "Q", "response": "A"}, {"prompt": "question"}),
    ("rank", {"question": "Q", "chosen": "A", "rejected": "B"}, {"prompt": "question"}),
    ("rank", {"prompt": "Q", "better": "A", "rejected": "B"}, {"chosen": "better"}),
    ("prompt", {"question": "Q"}, {"prompt": "question"}),
    ("pretrain", {"content": "T"}, {"text": "content"}),
])
def test_the_suggested_column_mapping_loads_the_renamed_row(tmp_path, kind, row, columns):
    path = write_lines(tmp_path / "data.jsonl", [row])
    [record], report = load(path, kind, columns=columns)
    assert report.skipped == 0
    if kind == "pretrain":
        assert record.text == "T"
    else:
        assert record.prompt == [Message("user", "Q")]


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_last_line_names_that_line(tmp_path, kind):
    # A download or a write cut off mid-object: no newline after the last, partial line.
    rows = [GOOD[kind], GOOD[kind], json.dumps(GOOD[kind])[:-6].encode()]
    path = write_lines(tmp_path / "data.jsonl", rows, final_newline=False)
    with pytest.raises(DataError, match=f"^{path}:3: invalid JSON: the line ends before the JSON value is complete"):
        load(path, kind)
    records, report = load(path, kind, on_error="skip")
    assert len(records) == 2 and (report.rows, report.skipped) == (3, 1)


# --- a BOM is accepted ------------------------------------------------------------------


def as_csv(rows: list[dict]) -> bytes:
    header = list(rows[0])
    return ("\n".join([",".join(header), *(",".join(row[name] for name in header) for row in rows)]) + "\n").encode()


ENCODERS = {
    "jsonl": lambda rows: b"".join(json.dumps(row).encode() + b"\n" for row in rows),
    "json": lambda rows: json.dumps(rows, indent=1).encode(),
    "csv": as_csv,
}


@pytest.mark.parametrize("suffix", sorted(ENCODERS))
@pytest.mark.parametrize("kind", KINDS)
def test_bom_at_file_start_is_accepted(tmp_path, kind, suffix):
    rows = [GOOD[kind], {name: value.upper() for name, value in GOOD[kind].items()}]
    content = ENCODERS[suffix](rows)
    (tmp_path / f"plain.{suffix}").write_bytes(content)
    (tmp_path / f"bom.{suffix}").write_bytes(BOM + content)
    expected, _ = load(str(tmp_path / f"plain.{suffix}"), kind)
    records, report = load(str(tmp_path / f"bom.{suffix}"), kind)
    # A BOM left in place would rename the first CSV column or break the first JSON line.
    assert plain(records) == plain(expected) and len(records) == 2 and report.skipped == 0


def test_bom_starting_a_later_jsonl_line_is_accepted(tmp_path):
    # `cat a.jsonl b.jsonl` where both files were written with a BOM.
    path = tmp_path / "data.jsonl"
    path.write_bytes(BOM + line_bytes(GOOD["sft"]) + b"\n" + BOM + line_bytes(GOOD["sft"]) + b"\n")
    records, report = load(str(path), "sft")
    assert len(records) == 2 and report.skipped == 0


# --- enormous rows ----------------------------------------------------------------------
# A 5 MB field is data, not an error: it loads whole and is cut to max_length when tokenised
# (covered below with a shorter prompt, since tokenising 5 MB takes seconds).

HUGE_FIELD = {"sft": "response", "rank": "chosen", "prompt": "prompt", "pretrain": "text"}


def huge_text() -> str:
    return "word " * 1_000_000  # 5 MB


@pytest.mark.parametrize("kind", KINDS)
def test_enormous_row_loads_whole(tmp_path, kind):
    text = huge_text()
    path = write_lines(tmp_path / "data.jsonl", [{**GOOD[kind], HUGE_FIELD[kind]: text}, GOOD[kind]])
    records, report = load(path, kind)
    assert (report.rows, report.records, report.skipped) == (2, 2, 0)
    record = records[0]
    kept = {
        "sft": lambda: record.response,
        "rank": lambda: record.responses[0],
        "prompt": lambda: record.prompt[-1].content,
        "pretrain": lambda: record.text,
    }[kind]()
    assert kept == text


def test_enormous_csv_cell_loads_whole(tmp_path):
    # The csv module refuses cells over 128 KiB unless its limit is raised.
    path = tmp_path / "data.csv"
    text = huge_text()
    path.write_text(f"prompt,response\nQ,{text}\nQ,A\n")
    records, report = load(str(path), "sft")
    assert records[0].response == text and report.records == 2


# --- empty and unreadable files: always an error, also under on_error=skip ----------------

EMPTY_FILES = {
    "empty.jsonl": b"",
    "blank-lines.jsonl": b"\n  \n\t\r\n",
    "bom-only.jsonl": BOM,
    "empty.jsonl.gz": gzip.compress(b""),
    "empty.json": b"",
    "blank.json": b" \n\n",
    "empty-list.json": b"[]",
    "empty.csv": b"",
    "header-only.csv": b"prompt,response,chosen,rejected,text\n",
}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("name", sorted(EMPTY_FILES))
@pytest.mark.parametrize("kind", KINDS)
def test_empty_file_is_an_error_naming_the_file(tmp_path, kind, name, on_error):
    path = tmp_path / name
    path.write_bytes(EMPTY_FILES[name])
    with pytest.raises(UserError) as caught:
        load(str(path), kind, on_error=on_error)
    assert str(caught.value) == f"{path}: no rows"


def good_jsonl(kind: str = "sft") -> bytes:
    return ENCODERS["jsonl"]([GOOD[kind]] * 3)


FILE_LEVEL = {
    "not-gzip.jsonl.gz": (b'{"prompt": "Q"}\n', UserError, "{path}: cannot read file: Not a gzipped file"),
    "cut.jsonl.gz": (gzip.compress(good_jsonl() * 50)[:-20], UserError,
                     "{path}: cannot read file: Compressed file ended"),
    "cut.json": (b'[\n{"prompt": "Q", "response": "A"},\n{"prompt": "Q", "resp', DataError,
                 "{path}:3: invalid JSON: the file ends before the JSON value is complete (cut off?)"),
    "bad-utf8.json": (b'[\n{"prompt": "Q", "response": "A"},\n{"prompt": "Q\xff", "response": "A"}\n]', DataError,
                      "{path}:3: invalid UTF-8"),
    "deep.json": (b"[" * 100_000 + b"]" * 100_000, DataError,
                  "{path}: invalid JSON: arrays or objects nested too deeply"),
}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("name", sorted(FILE_LEVEL))
def test_file_level_problems_stop_the_load_even_when_skipping(tmp_path, name, on_error):
    content, error, message = FILE_LEVEL[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error) as caught:
        load(str(path), "sft", on_error=on_error)
    assert str(caught.value).startswith(message.format(path=path))


@pytest.mark.parametrize("name", ["data.json", "data.csv", "data.jsonl"])
def test_unreadable_file_is_a_user_error(tmp_path, monkeypatch, name):
    path = tmp_path / name
    path.write_bytes(b"")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Tests run as root here, so chmod cannot make a file unreadable.
    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr(sources, "open", refuse, raising=False)
    with pytest.raises(UserError, match=f"^{path}: cannot read file: .*Permission denied"):
        load(str(path), "sft", on_error="skip")


def test_csv_row_with_invalid_utf8_names_the_column_and_is_skippable(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"prompt,response\nQ,A\nQ,A\xff\nQ,A\n")
    with pytest.raises(DataError, match=f"^{path}:3: field 'response': invalid UTF-8$"):
        load(str(path), "sft")
    records, report = load(str(path), "sft", on_error="skip")
    assert len(records) == 2 and report.skipped == 1


# --- long prompts keep their end, counted -------------------------------------------------

MAX_PROMPT = 48


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from rlhf.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(path=str(tiny_model_dir)))


def long_question() -> list[Message]:
    context = " ".join(f"item {i} is a red apple." for i in range(200))
    return [Message("user", f"{context} Which fruit is item 7?")]


def test_sft_long_prompt_keeps_its_last_tokens_and_is_counted(tokenizer):
    short = SFTRecord([Message("user", "Name a fruit."), Message("assistant", "Apple.")], "x:1")
    long = SFTRecord([*long_question(), Message("assistant", "Apple.")], "x:2")
    examples, stats = tokenize_sft(tokenizer, [short, long], 96, MAX_PROMPT, True)
    full, _ = tokenize_sft(tokenizer, [long], 100_000, 99_999, True)
    prompt_ids = tokenizer(prompt_text(tokenizer, long.prompt), add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) > 10 * MAX_PROMPT
    assert stats.as_dict() == {"examples": 2, "prompt_truncated": 1, "response_truncated": 0}
    # The end of the prompt (the question and the assistant header) and the whole answer stay.
    assert examples[1].input_ids == prompt_ids[-MAX_PROMPT:] + full[0].input_ids[len(prompt_ids):]
    assert examples[1].labels[MAX_PROMPT:] == full[0].labels[len(prompt_ids):]
    assert "item 7?" in tokenizer.decode(examples[1].input_ids[:MAX_PROMPT])


def test_rank_long_prompt_and_long_answer_are_cut_and_counted(tokenizer):
    long_answer = "Apple, " * 100
    record = RankRecord(long_question(), ["Apple.", long_answer], [1.0, 0.0], source="x:1")
    stats = TruncationStats()
    example = encode_rank(tokenizer, record, 96, MAX_PROMPT, stats)
    prompt_ids = tokenizer(prompt_text(tokenizer, record.prompt), add_special_tokens=False)["input_ids"]
    assert stats.as_dict() == {"examples": 1, "prompt_truncated": 1, "response_truncated": 1}
    assert all(sequence[:MAX_PROMPT] == prompt_ids[-MAX_PROMPT:] for sequence in example.sequences)
    assert len(example.sequences[1]) == 96 and len(example.sequences[0]) < 96
    assert example.sequences[0][-1] == tokenizer.eos_token_id  # the short answer keeps its EOS


def test_prompt_set_long_prompt_keeps_its_end_and_is_counted(tokenizer):
    short, long = PromptRecord([Message("user", "Name a fruit.")]), PromptRecord(long_question())
    stats = TruncationStats()
    ids = [encode_prompt(tokenizer, record, MAX_PROMPT, stats) for record in (short, long)]
    full = tokenizer(prompt_text(tokenizer, long.prompt), add_special_tokens=False)["input_ids"]
    assert stats.as_dict() == {"examples": 2, "prompt_truncated": 1, "response_truncated": 0}
    assert len(ids[0]) < MAX_PROMPT and ids[1] == full[-MAX_PROMPT:]
    # Without stats the result is the same (callers that do not count keep working).
    assert encode_prompt(tokenizer, long, MAX_PROMPT) == ids[1]


# --- through the CLI: exit 2, one line on stderr, no traceback, nothing written -----------


def rlhf(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "rlhf", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, prefix: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(prefix), result.stderr


@pytest.mark.parametrize("bad, message", [
    (json.dumps(GOOD["rank"])[:-3].encode(), "{path}:2: invalid JSON: the line ends before"),
    ({"prompt": "Q", "chosen": "Same.", "rejected": "Same."},
     "{path}:2: field 'rejected': chosen and rejected are identical"),
    # json raised RecursionError here before: a traceback, not an error line.
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "{path}:2: invalid JSON: arrays or objects nested"),
], ids=["truncated", "identical", "deeply-nested"])
def test_cli_data_inspect_reports_the_bad_row(tmp_path, bad, message):
    path = write_lines(tmp_path / "data.jsonl", [GOOD["rank"], bad], final_newline=False)
    assert_one_line_error(rlhf("data", "inspect", path, "--kind", "rank"), "error: " + message.format(path=path))


def test_cli_data_inspect_empty_file_and_skipping(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert_one_line_error(rlhf("data", "inspect", str(empty), "--kind", "rank", "--on-error", "skip"),
                          f"error: {empty}: no rows")


def test_cli_data_inspect_skip_counts_bad_rows(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD["rank"], {"prompt": "Q", "responses": ["A"]}, GOOD["rank"]])
    result = rlhf("data", "inspect", path, "--kind", "rank", "--on-error", "skip", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert (stats["rows"], stats["records"], stats["skipped_rows"], stats["pairs"]) == (3, 2, 1, 2)


def test_cli_sft_with_bad_data_fails_before_writing_anything(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD["sft"], {"question": "Q", "response": "A"}])
    out = tmp_path / "out"
    result = rlhf("sft", "--config", "configs/sft.yaml", f"data.train.path={path}", f"output_dir={out}",
                  "logging.progress=false")
    assert_one_line_error(result, f"error: {path}:2: field 'prompt': missing;")
    assert not out.exists()
