"""`rlhf export`: a finished run's model as a shareable directory, its files copied byte for byte
(nothing re-saved) plus a README.md model card, built in a temporary directory beside the target
and renamed into place so that the target never holds half an export."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from rlhf.errors import UserError
from rlhf.files import make_shareable, swap_directory
from rlhf.sharing.card import render
from rlhf.sharing.run_dir import FINISHED_CONFIG, Located, chain, locate, trained_from

CARD = "README.md"
LEFT_OUT = {FINISHED_CONFIG.name}
"""Files of the run's model/ not shared: rlhf_config.yaml is the raw config (the card holds it
without secrets)."""


@dataclass
class Exported:
    located: Located
    directory: Path
    files: list[str]
    bytes: int


def export_run(run_dir: str | os.PathLike, to: str | os.PathLike, force: bool = False,
               hub_repo: str | None = None, stages: Optional[Mapping[str, Any]] = None) -> Exported:
    """Copy the finished run at `run_dir` (a stage's run directory or a pipeline's output) to
    `to` with a model card. `to` may not exist or be empty unless `force`, which replaces it in
    one rename. `hub_repo` is the repository the card's loading snippet names (default: `to`).
    `stages`, the stage registry, lets a run started directly (no lineage.json) be exported:
    it tells its stage and data keys from its saved config."""
    located = locate(run_dir, stages)
    run = located.run
    target = Path(to)
    _check_target(target, run.dir, force)
    ancestors = chain(run)
    ancestor_dirs = {p.run.dir for p in ancestors if p.run is not None}
    others = [p for p in trained_from(run) if p.run is None or p.run.dir not in ancestor_dirs]
    card = render(located, ancestors, others, hub_repo or str(target))

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        shutil.copytree(run.model_dir, tmp, dirs_exist_ok=True, ignore=lambda _, names: LEFT_OUT & set(names))
        (tmp / CARD).write_text(card, encoding="utf-8")
        make_shareable(tmp)  # mkdtemp makes it private, and a run's files may be; an export is for sharing
        swap_directory(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write {target}: {exc.strerror or exc} (nothing was left half-way; "
                        f"{'the previous contents are kept' if target.exists() else 'it was not created'})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    return Exported(located, target, files, sum((target / f).stat().st_size for f in files))


def _check_target(target: Path, run_dir: Path, force: bool) -> None:
    resolved, run = target.resolve(), run_dir.resolve()
    model = run / "model"
    if resolved in (run, model) or resolved in run.parents or model in resolved.parents:
        raise UserError(f"--to {target}: would replace the run itself or its model; choose a directory outside "
                        f"{run_dir / 'model'} that does not hold the run")
    if target.exists() and not target.is_dir():
        raise UserError(f"--to {target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UserError(f"--to {target}: exists and is not empty; pass --force to replace it")
