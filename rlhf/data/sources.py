"""Read the rows of a data source, each with the location a user needs to find it.

Local JSONL, JSON and CSV files are read with the standard library so that every row keeps
its physical line number. Parquet files, directories written by `datasets.save_to_disk` and
hub dataset ids are located by row index. A row that cannot be read (bad UTF-8, bad JSON)
comes back as a `Row` with an error rather than an exception, so callers can skip it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rlhf.config_sections import DataSourceConfig
from rlhf.errors import DataError, UserError

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
_BOM = b"\xef\xbb\xbf"
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
_CSV_FIELD_LIMIT = 2**31 - 1  # the largest value every platform's C long holds


@dataclass
class Row:
    """One row of a source: its data, or the reason it could not be read."""

    location: str
    """"path:line", "path:line (row i)", "path:row i" or "path[split]:row i"."""
    data: dict | None
    error: DataError | None = None


def type_name(value: Any) -> str:
    """The name users see for a value's type in error messages."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return type(value).__name__


def iter_rows(source: DataSourceConfig) -> Iterator[Row]:
    """Yield every row of `source` in order; raise UserError when the source itself is unusable."""
    path = source.path
    if not path:
        raise UserError("no data path given")
    local = Path(path).expanduser()
    if local.is_dir():
        rows = _read_directory(local, path, source)
    elif local.is_file():
        rows = _read_file(local, path)
    elif _looks_local(path):
        raise UserError(f"{path}: file not found")
    else:
        rows = _read_hub(path, source)
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise UserError(f"{path}: no rows")


def _looks_local(path: str) -> bool:
    # Hub ids look like "org/name", so a slash alone does not make a path local.
    return path.startswith((".", "/", "~")) or path.lower().endswith(FILE_SUFFIXES + (".gz",))


def _read_file(file: Path, path: str) -> Iterator[Row]:
    name = file.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(file, path)
    if name.endswith(".json"):
        return _read_json(file, path)
    if name.endswith(".csv"):
        return _read_csv(file, path)
    if name.endswith(".parquet"):
        return _read_parquet(file, path)
    raise UserError(
        f"{path}: unsupported file type; expected {', '.join(FILE_SUFFIXES)}, "
        "a directory written by datasets' save_to_disk, or a hub dataset id"
    )


# --- JSON Lines -------------------------------------------------------------------------


def _read_jsonl(file: Path, path: str) -> Iterator[Row]:
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    try:
        with opener(file, "rb") as stream:
            # Bytes, not text: a bad byte must fail its own line, not the whole file.
            for lineno, raw in enumerate(stream, start=1):
                # A BOM starts the file, or a later line where files were concatenated.
                if raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                if raw.strip():
                    yield _parse_json_line(raw, f"{path}:{lineno}")
    except (OSError, EOFError) as err:  # a truncated or corrupt .gz
        raise UserError(f"{path}: cannot read file: {err}") from err


def _parse_json_line(raw: bytes, location: str) -> Row:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        return _bad_row(location, f"invalid UTF-8 (byte offset {err.start} in the line)")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        return _bad_row(location, f"invalid JSON: {_json_problem(err, text, 'line')}")
    if not isinstance(value, dict):
        return _bad_row(location, f"expected a JSON object, got {type_name(value)}")
    return Row(location, value)


def _bad_row(location: str, message: str) -> Row:
    return Row(location, None, DataError(location, None, message))


def _json_problem(err: ValueError | RecursionError, text: str, unit: str) -> str:
    """What json.loads found wrong with `text` (a "line" or a "file"), in the user's words."""
    if isinstance(err, RecursionError):
        return "arrays or objects nested too deeply"
    if not isinstance(err, json.JSONDecodeError):
        return "a number has too many digits"  # int() refuses over sys.get_int_max_str_digits()
    if err.msg.startswith("Unterminated string") or err.pos >= len(text.rstrip()):
        return f"the {unit} ends before the JSON value is complete (cut off?)"
    return f"{err.msg} (column {err.colno})"


def _read_bytes(file: Path, path: str) -> bytes:
    try:
        return file.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read file: {err}") from err


# --- JSON -------------------------------------------------------------------------------


def _read_json(file: Path, path: str) -> Iterator[Row]:
    raw = _read_bytes(file, path)
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}", None, "invalid UTF-8") from err
    if not text.strip():
        return
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as err:
        if isinstance(err, json.JSONDecodeError) and err.msg == "Extra data" and text.lstrip().startswith("{"):
            # Many datasets name their JSON Lines files ".json".
            yield from _read_jsonl(file, path)
            return
        line = err.lineno if isinstance(err, json.JSONDecodeError) else None
        raise DataError(f"{path}:{line}" if line else path, None,
                        f"invalid JSON: {_json_problem(err, text, 'file')}") from err
    key, items = _find_row_list(document, path)
    lines = _element_lines(text, key)
    for index, (item, line) in enumerate(zip(items, lines)):
        location = f"{path}:{line} (row {index})"
        if isinstance(item, dict):
            yield Row(location, item)
        else:
            yield _bad_row(location, f"expected a JSON object, got {type_name(item)}")


def _find_row_list(document: Any, path: str) -> tuple[str | None, list]:
    """The list of rows: the document itself, or the one list held by a wrapper object."""
    if isinstance(document, list):
        return None, document
    if isinstance(document, dict):
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(lists) > 1:
            lists = [key for key in lists if all(isinstance(item, dict) for item in document[key])]
        if len(lists) == 1:
            return lists[0], document[lists[0]]
        keys = ", ".join(document) or "none"
        raise UserError(
            f"{path}: expected a JSON array of objects or an object holding one such list "
            f'(e.g. {{"data": [...]}}); found an object with keys: {keys}'
        )
    raise UserError(f"{path}: expected a JSON array of objects, got {type_name(document)}")


def _element_lines(text: str, key: str | None) -> Iterator[int]:
    """Line numbers where the elements of the row list start; `text` is known to be valid JSON."""
    decoder = json.JSONDecoder()

    def skip_space(pos: int) -> int:
        return _JSON_WHITESPACE.match(text, pos).end()

    pos = skip_space(0)
    if key is not None:
        # Walk the wrapper object's members to the (last, as json.loads keeps) one named `key`.
        pos, found = skip_space(pos + 1), None
        while text[pos] != "}":
            name, pos = decoder.raw_decode(text, pos)
            value_start = skip_space(skip_space(pos) + 1)
            if name == key:
                found = value_start
            _, pos = decoder.raw_decode(text, value_start)
            pos = skip_space(pos)
            if text[pos] == ",":
                pos = skip_space(pos + 1)
        pos = found
    pos, line, counted = skip_space(pos + 1), 1, 0
    while text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        yield line
        _, pos = decoder.raw_decode(text, pos)
        pos = skip_space(pos)
        if text[pos] == ",":
            pos = skip_space(pos + 1)


# --- CSV --------------------------------------------------------------------------------


def _read_csv(file: Path, path: str) -> Iterator[Row]:
    raw = _read_bytes(file, path)
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    # surrogateescape keeps bad bytes as markers, so only the rows holding them fail.
    text = raw.decode("utf-8", errors="surrogateescape")
    # The csv module refuses cells over 128 KiB by default; long documents are ordinary data
    # (truncated later, at tokenisation). The limit is process-wide, so it is only ever raised.
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        last_line = reader.line_num
        for cells in reader:
            # A quoted cell may span lines: the row starts right after the previous one ended.
            start, last_line = last_line + 1, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            yield _csv_row(header, cells, f"{path}:{start}")
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: invalid CSV: {err}") from err


def _csv_row(header: list[str], cells: list[str], location: str) -> Row:
    if len(cells) > len(header):
        return _bad_row(location, f"the row has {len(cells)} cells but the header has {len(header)} columns")
    for name, cell in zip(header, cells):
        if _has_undecodable_bytes(cell):
            return Row(location, None, DataError(location, name, "invalid UTF-8"))
    # Short rows leave their last columns out, as if those fields were absent.
    return Row(location, {name: _parse_list_cell(cell) for name, cell in zip(header, cells)})


def _has_undecodable_bytes(cell: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in cell)


def _parse_list_cell(cell: str) -> Any:
    """CSV has no lists: a cell holding a JSON list (responses, scores, messages) is parsed."""
    if not cell.lstrip().startswith("["):
        return cell
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        return cell
    return value if isinstance(value, list) else cell


# --- Parquet, saved datasets, the hub ----------------------------------------------------


def _read_parquet(file: Path, path: str) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(file)
        index = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for data in batch.to_pylist():
                yield Row(f"{path}:row {index}", data)
                index += 1
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"{path}: cannot read Parquet file: {err}") from err


def _read_directory(directory: Path, path: str, source: DataSourceConfig) -> Iterator[Row]:
    import datasets

    saved = (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()
    if not saved:
        # Not a save_to_disk directory: let `datasets` infer a builder from the files in it.
        yield from _read_loaded(path, source, f"cannot load directory '{path}' as a dataset")
        return
    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as err:  # noqa: BLE001 - any failure here means the directory is unusable
        raise UserError(f"{path}: cannot load saved dataset: {_short(err)}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            available = ", ".join(sorted(loaded)) or "none"
            raise UserError(f"{path}: no split '{source.split}'; available splits: {available}")
        yield from _dataset_rows(loaded[source.split], f"{path}[{source.split}]")
    else:
        yield from _dataset_rows(loaded, path)


def _read_hub(path: str, source: DataSourceConfig) -> Iterator[Row]:
    return _read_loaded(
        path, source, f"cannot load dataset '{path}': file not found locally and the hub load failed"
    )


def _read_loaded(path: str, source: DataSourceConfig, failure: str) -> Iterator[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(path, name=source.name, split=source.split)
    except Exception as err:  # noqa: BLE001 - network, auth, missing split: all the user's to fix
        raise UserError(f"{failure}: {_short(err)}") from err
    yield from _dataset_rows(dataset, f"{path}[{source.split}]")


def _dataset_rows(dataset: Any, where: str) -> Iterator[Row]:
    for index, data in enumerate(dataset):
        yield Row(f"{where}:row {index}", dict(data))


def _short(err: Exception) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    text = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
