"""Where a stage's starting model comes from: the configured path, or a tiny model built
into the run directory from the stage's own training texts."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from rlhf.config_sections import ModelConfig
from rlhf.models.tiny import create_tiny_checkpoint


def resolve_model_path(cfg: ModelConfig, run_dir: Path, texts: Iterable[str], seed: int) -> str:
    if cfg.tiny is None:
        return cfg.path
    target = run_dir / "init_model"
    if not (target / "config.json").is_file():
        create_tiny_checkpoint(cfg.tiny, texts, target, seed)
    return str(target)
