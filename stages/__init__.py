"""The stage registry: every stage's name, config class, entry point and inputs.

The CLI, the pipeline and the Ray launcher find stages here and are handed the entries;
nothing under `rlhf/` imports this package (only the CLI entry point, `rlhf/cli.py`). Adding a
stage is a new file in stages/ with a `main(cfg) -> StageResult` plus one line in `STAGES`.
A stage module is imported when its `main` is first called, so `rlhf --help` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import DPOConfig, EvalConfig, PipelineConfig, PPOConfig, RMConfig, SFTConfig


@dataclass(frozen=True)
class Stage:
    name: str
    config: type
    """The stage's config dataclass (rlhf/config.py)."""
    module: str
    """The module holding `main(cfg)` (and, for a stage whose loop runs on the Ray driver,
    `runs_on_driver(cfg)`)."""
    summary: str
    """One line for `rlhf --help`."""
    inputs: tuple[str, ...] = ()
    """Config fields naming data sources, hashed into the stage's lineage."""

    def main(self, cfg: Any, **kwargs: Any) -> Any:
        return importlib.import_module(self.module).main(cfg, **kwargs)

    def runs_on_driver(self, cfg: Any) -> bool:
        """On Ray: whether the stage's loop runs in the driver process (which then starts its
        own worker groups) rather than in each of `resources.workers` identical workers."""
        check = getattr(importlib.import_module(self.module), "runs_on_driver", None)
        return bool(check and check(cfg))

    @staticmethod
    def code_dirs() -> list[str]:
        """Package directories a Ray cluster needs besides `rlhf` to run the stages."""
        return [str(Path(__file__).resolve().parent)]


STAGES: dict[str, Stage] = {
    "sft": Stage("sft", SFTConfig, "stages.sft", "Supervised fine-tuning on (prompt, response) demonstrations.",
                 ("data.train", "data.eval", "data.pretrain")),
    "rm": Stage("rm", RMConfig, "stages.rm", "Train a reward model on ranked answers (pairwise / K-wise ranking loss).",
                ("data.train", "data.eval")),
    "ppo": Stage("ppo", PPOConfig, "stages.ppo",
                 "Optimise the policy against the reward model with PPO / PPO-ptx and a KL penalty.",
                 ("data.prompts", "data.eval_prompts", "data.pretrain")),
    "dpo": Stage("dpo", DPOConfig, "stages.dpo",
                 "Direct preference optimisation (DPO / IPO) of the SFT model on ranked answers.",
                 ("data.train", "data.eval", "eval.prompts")),
    "eval": Stage("eval", EvalConfig, "stages.eval",
                  "Judge a policy's sampled answers (and its win rate against a baseline) on held-out prompts.",
                  ("prompts", "pretrain")),
    "pipeline": Stage("pipeline", PipelineConfig, "stages.pipeline",
                      "Run SFT -> RM -> PPO (or SFT -> DPO) with lineage, skipping stages that are up to date."),
}
