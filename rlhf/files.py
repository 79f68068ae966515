"""Writing a small file so that a reader sees the old contents or the new ones, never a part:
the text goes to a hidden temporary file beside the target, which is then renamed over it."""

from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """`text` into `path` (its directory created), replacing it in one rename. `fsync`: flush it
    to disk before the rename, so that a power loss cannot leave an empty file behind it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
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


def default_mode(directory: bool = False) -> int:
    """The mode a plain open() or mkdir() gives under this process's umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def make_shareable(path: str | os.PathLike) -> None:
    """Give `path`, and everything in it if it is a directory, the permissions a plain open() or
    mkdir() would have: tempfile's directories and files are private (0700, 0600), and a model or
    run written through one would stay unreadable to the rest of a team's cluster."""
    path = Path(path)
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        executable = not item.is_dir() and item.stat().st_mode & stat.S_IXUSR
        os.chmod(item, dir_mode if item.is_dir() or executable else file_mode)
