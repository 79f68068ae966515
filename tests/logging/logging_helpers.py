"""Shared by the logging tests: the secret values planted in the environment, and reading a
W&B offline run back."""

from __future__ import annotations

import json
import struct
from pathlib import Path

SECRETS = {"WANDB_API_KEY": "wbkey0123456789abcdef0123456789abcdefUNIQUE", "HF_TOKEN": "hf_tok_UNIQUE_5e3c9a1b7d"}

# wandb 0.31 ships no Python reader for its `.wandb` files;
# the file is a LevelDB-style log (a 7-byte header ":W&B", 0xBEE1, version; then 32 KiB
# blocks of chunks, each with a crc32 / length / type header) of wandb `Record` protobufs.


def wandb_records(run_dir: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    (path,) = list(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, position, pending, records = 32768, 7, b"", []
    while position < len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # zero padding up to the next block
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    rows = []
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def wandb_run_record(run_dir: Path):
    return next(r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run")
