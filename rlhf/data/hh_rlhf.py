"""`rlhf data fetch hh-rlhf`: Anthropic's HH-RLHF, split into the files each stage reads.

InstructGPT trained SFT, the reward model and PPO on different prompts, and so does this
split: rows are grouped by their prompt (the dialogue before the last answer) and whole groups
go to one file, so no held-out prompt was seen in training. The rows stay HH dialogues
(`{"chosen", "rejected"}`), which every loader reads (rlhf/data/formats.py); the two
pretraining files hold the chosen dialogues as plain text, for PPO-ptx and for perplexity.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from rlhf.config_sections import DataSourceConfig
from rlhf.data.formats import parse_hh_dialogue
from rlhf.data.sources import iter_rows
from rlhf.errors import DataError, UserError

HUB_ID = "Anthropic/hh-rlhf"
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")

SHARES = {
    "sft": 0.30,
    "rank": 0.40,
    "prompts": 0.15,
    "rank_eval": 0.05,
    "prompts_eval": 0.05,
    "pretrain_eval": 0.05,
}
"""Fraction of the prompt groups per file. The reward model gets the most: on HH its held-out
accuracy is what limits PPO. The held-out shares are small but at least one group each."""

MANIFEST = "manifest.json"
_ANSWER = "\n\nAssistant:"


@dataclass
class Pair:
    location: str
    chosen: str
    rejected: str

    @property
    def prompt(self) -> str:
        return self.chosen[: self.chosen.rfind(_ANSWER)].strip()

    @property
    def chosen_is_empty(self) -> bool:
        return not self.chosen[self.chosen.rfind(_ANSWER) + len(_ANSWER):].strip()


def fetch(out_dir: str | os.PathLike, source: str | None = None, subset: str = "harmless-base",
          split: str = "train", rows: int | None = None, seed: int = 0) -> dict[str, str]:
    """Read HH-RLHF from the hub (or `source`, a local copy), split it by prompt and write the
    stage files plus a manifest into `out_dir`, all or nothing. Returns name -> path."""
    if subset not in SUBSETS:
        raise UserError(f"--subset {subset!r}: choose one of {', '.join(SUBSETS)}")
    if rows is not None and rows < len(SHARES):
        raise UserError(f"--rows {rows}: need at least {len(SHARES)} rows, one per file")
    skipped: list[DataError] = []
    if source:
        pairs = list(_read_local(source, rows, skipped))
        origin = {"path": str(Path(source).resolve()), "sha256": _sha256(Path(source))}
    else:
        pairs = list(_read_hub(subset, split, rows, skipped))
        origin = {"hub_id": HUB_ID, "subset": subset, "split": split}
    if not pairs:
        raise UserError(f"{source or HUB_ID}: no usable HH rows" + (f"; the first problem: {skipped[0]}" if skipped else ""))
    files, dropped = split_pairs(pairs, seed)
    dropped["unreadable"] = len(skipped)
    dropped["unreadable_examples"] = [str(err) for err in skipped[:5]]
    manifest = {"source": origin, "rows_read": len(pairs), "seed": seed, "shares": SHARES,
                "rows": {name: len(items) for name, items in files.items()}, "dropped": dropped}
    return _write_all(Path(out_dir), files, manifest)


def split_pairs(pairs: list[Pair], seed: int) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Rows per output file, whole prompt groups per file, and counts of what was left out."""
    groups: dict[str, list[Pair]] = {}
    for pair in pairs:
        groups.setdefault(pair.prompt, []).append(pair)
    if len(groups) < len(SHARES):
        raise UserError(f"only {len(groups)} distinct prompts: need at least {len(SHARES)}, one per file")
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    assigned = _assign(keys, groups)
    files: dict[str, list[dict]] = {name: [] for name in ("sft", "rank", "rank_eval", "prompts", "prompts_eval",
                                                           "pretrain", "pretrain_eval")}
    dropped = {"ties": 0, "empty_chosen": 0}
    for name, members in assigned.items():
        for pair in (p for key in members for p in groups[key]):
            row = {"chosen": pair.chosen, "rejected": pair.rejected}
            if name in ("sft", "pretrain_eval") and pair.chosen_is_empty:
                dropped["empty_chosen"] += 1
            elif name == "sft":
                files["sft"].append(row)
                files["pretrain"].append({"text": pair.chosen.strip()})
            elif name == "pretrain_eval":
                files["pretrain_eval"].append({"text": pair.chosen.strip()})
            elif name.startswith("rank") and pair.chosen == pair.rejected:
                # Identical answers carry no preference; the ranking loss would only push their
                # rewards apart at random.
                dropped["ties"] += 1
            else:
                files[name].append(row)
    return files, dropped


def _assign(keys: list[str], groups: dict[str, list[Pair]]) -> dict[str, list[str]]:
    """Consecutive runs of the shuffled groups sized by rows, at least one group per file; the
    last file takes what is left."""
    total = sum(len(groups[k]) for k in keys)
    names = list(SHARES)
    assigned: dict[str, list[str]] = {}
    index = 0
    for position, name in enumerate(names):
        last = position == len(names) - 1
        stop = len(keys) if last else len(keys) - (len(names) - position - 1)
        members: list[str] = []
        taken = 0
        while index < stop and (last or not members or taken < SHARES[name] * total):
            members.append(keys[index])
            taken += len(groups[keys[index]])
            index += 1
        assigned[name] = members
    return assigned


def _read_local(source: str, rows: int | None, skipped: list[DataError]) -> Iterator[Pair]:
    if not Path(source).expanduser().is_file():
        raise UserError(f"--from {source}: file not found")
    yield from _pairs(iter_rows(DataSourceConfig(path=source)), rows, skipped)


def _read_hub(subset: str, split: str, rows: int | None, skipped: list[DataError]) -> Iterator[Pair]:
    import datasets

    try:
        dataset = datasets.load_dataset(HUB_ID, data_dir=subset, split=split)
    except Exception as err:  # noqa: BLE001 - offline, auth, a moved dataset: all reported the same way
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(
            f"could not download {HUB_ID} ({subset}, {split}) from the Hugging Face hub: {reason}\n"
            f"Offline? Point --from at a local copy: a JSONL file of HH rows "
            f'{{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}}'
        ) from None
    from rlhf.data.sources import Row

    yield from _pairs((Row(f"{HUB_ID}/{subset}[{split}]:row {i}", dict(data)) for i, data in enumerate(dataset)),
                      rows, skipped)


def _pairs(source_rows: Iterable, rows: int | None, skipped: list[DataError]) -> Iterator[Pair]:
    """The usable pairs; a row HH itself got wrong (an empty turn, a missing field) goes to
    `skipped`: the published data has a few, and the user cannot fix them."""
    for count, row in enumerate(source_rows):
        if rows is not None and count >= rows:
            return
        try:
            if row.error is not None:
                raise row.error
            for field in ("chosen", "rejected"):
                value = row.data.get(field)
                if not isinstance(value, str):
                    raise DataError(row.location, field, "expected an HH dialogue string "
                                                         "('\\n\\nHuman: ...\\n\\nAssistant: ...')")
                # HH's preferred answer is sometimes an empty reply (the harmless one): fine to
                # rank, not to imitate (split_pairs keeps it out of the SFT files).
                parse_hh_dialogue(value, row.location, field, allow_empty_answer=True)
        except DataError as err:
            skipped.append(err)
            continue
        yield Pair(row.location, row.data["chosen"], row.data["rejected"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_all(out: Path, files: dict[str, list[dict]], manifest: dict) -> dict[str, str]:
    """Every file into a temp dir beside `out`, then each renamed into place: a failure leaves
    `out` as it was, and files of `out` that are not ours are kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, rows in files.items():
            (staging / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        out.mkdir(exist_ok=True)
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: str(out / f"{name}.jsonl") for name in files} | {"manifest": str(out / MANIFEST)}
