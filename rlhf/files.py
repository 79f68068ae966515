"""Writing a small file so that a reader sees the old contents or the new ones, never a part:
the text goes to a hidden temporary file beside the target, which is then renamed over it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`text` into `path` (its directory created), replacing it in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def swap_directory(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the directory `new` at `target` by renames: an existing `target` is moved aside, then
    removed once `new` is in place, or moved back if that second rename fails."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
