"""Export a trained model as a plain `save_pretrained` directory (safetensors + tokenizer).

Also where a full disk is recognised (`disk_full_reason`) and turned into one clear
`DiskFullError` line, for exports here and for checkpoints (rlhf/distributed/checkpoint.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.errors import UserError
from rlhf.files import make_shareable, swap_directory

_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_NO_SPACE_TEXT = {
    "no space left on device": "no space left on device",
    "os error 28": "no space left on device",
    "storagefull": "no space left on device",
    "disk quota exceeded": "disk quota exceeded",
    "os error 122": "disk quota exceeded",
}
NEARLY_FULL_BYTES = 16 * 2**20
"""Below this much free space a failed write counts as a full disk (see `disk_full_reason`)."""


class DiskFullError(UserError):
    """A checkpoint or export did not fit on its filesystem; the partial files were removed."""


def disk_full_reason(exc: BaseException, path: str | os.PathLike | None = None) -> str | None:
    """"no space left on device" / "disk quota exceeded" when `exc` comes from a full disk,
    else None. Recognises ENOSPC/EDQUOT anywhere in the exception chain and errors that only
    carry the text (safetensors' SafetensorError). torch.save reports a full disk as a bare
    RuntimeError ("unexpected pos ..."); for an OSError or RuntimeError, the filesystem of
    `path` being (nearly) full right after the failure counts too, so call this before
    removing the partial files."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return _NO_SPACE[current.errno]
        text = str(current).lower()
        for needle, reason in _NO_SPACE_TEXT.items():
            if needle in text:
                return reason
        current = current.__cause__ or current.__context__
    if path is not None and isinstance(exc, (OSError, RuntimeError)) and _nearly_full(Path(path)):
        return "no space left on device"
    return None


def release_frames(exc: BaseException) -> None:
    """Drop the tracebacks of `exc` and its chain, clearing their frames' locals: a writer
    that failed midway (torch.save's) keeps its file open from there, and a deleted file
    that is still open keeps its space until the process ends."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
            current.__traceback__ = None
        current = current.__cause__ or current.__context__


def _nearly_full(path: Path) -> bool:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    root = hasattr(os, "geteuid") and os.geteuid() == 0  # root may write into the reserved blocks
    free = (st.f_bfree if root else st.f_bavail) * st.f_frsize
    inodes_out = st.f_files > 0 and (st.f_ffree if root else st.f_favail) == 0
    return free < NEARLY_FULL_BYTES or inodes_out


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into the base weights so plain transformers can load the result."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def export_pretrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_files: dict[str, dict] | None = None,
) -> Path:
    """Write to a temporary sibling directory and rename it into place, so a crash never
    leaves a half-written model where a later stage would load it. A full disk raises
    `DiskFullError` naming `directory`, with the temporary directory removed and an earlier
    export at `directory` kept as it was."""
    directory = Path(directory)
    existed = directory.exists()
    tmp: Path | None = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
        model = merge_lora(model)
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        make_shareable(tmp)
        swap_directory(tmp, directory)
    except BaseException as exc:
        reason = disk_full_reason(exc, tmp or directory.parent) if isinstance(exc, Exception) else None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        release_frames(exc)
        kept = (f"the previous export {directory} is kept" if existed
                else f"nothing was left at {directory}")
        raise DiskFullError(f"{reason} while writing {directory} (the partial export was removed); {kept}") from exc
    return directory
