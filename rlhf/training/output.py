"""A finished run's output directory is not trained over by accident."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.errors import UserError

FINISHED_MARKER = Path("model") / "rlhf_config.yaml"
"""Written by every stage after its export: its presence means the run finished."""


def claim_output_dir(cfg: Any) -> None:
    """Refuse an output_dir that holds a finished run unless `overwrite` is set; with it, the
    old checkpoints are ignored (the run starts over) and model/ is replaced at the end."""
    finished = Path(cfg.output_dir) / FINISHED_MARKER
    if not finished.is_file():
        return
    if not cfg.overwrite:
        raise UserError(f"output_dir {cfg.output_dir} holds a finished run ({finished}); pass --overwrite "
                        "(overwrite=true) to train again there, or choose another output_dir")
    cfg.train.resume = "never"
