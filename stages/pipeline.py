"""The InstructGPT recipe in one command: SFT -> reward model -> PPO.

    rlhf pipeline --config configs/pipeline.yaml [key=value ...] [--from rm]

Each stage writes `output_dir/<stage>/` and, last, its lineage.json: the stage, a hash of its
resolved config, hashes of its input data, its parents' lineage ids, the code version and a
metrics summary. A stage is skipped when the stored lineage equals the one it would produce
and its model export is complete, so a second run of the same config trains nothing; a
changed field re-runs its stage and, through the parent ids, every stage after it. `--from`
forces a restart point. A stage that was interrupted resumes from its last checkpoint. With an
`eval` section, `rlhf eval` then judges the last stage's export against the SFT export
(output_dir/eval/eval.json, eval.md), every time: it is quick and trains nothing.
"""

from __future__ import annotations

from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf.config import PipelineConfig, config_to_dict, save_config
from rlhf.errors import UserError
from rlhf.lineage import (
    LINEAGE_FILE,
    Lineage,
    check_up_to_date,
    code_version,
    config_hash,
    data_hash,
    read_lineage,
    write_lineage,
)
from rlhf.ray.stage_worker import stage_summary
from rlhf.summary import print_table, summary_rows
from rlhf.training.output import FINISHED_MARKER
from rlhf.training.run_lock import RunLock
from stages import STAGES

PENDING_FILE = "lineage.pending.json"
# How a stage is run does not change what it produces; these keys stay out of its hash.
NOT_HASHED = ("logging", "ray", "resources", "train.resume", "train.save_every", "train.keep_last", "output_dir",
              "overwrite")


def _lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def expected_lineage(stage: str, cfg: Any, parents: dict[str, Lineage]) -> Lineage:
    """The lineage this stage's artifact will carry when run with `cfg` on top of `parents`."""
    inputs = {name: data_hash(_lookup(cfg, name).path) for name in STAGES[stage].inputs if _lookup(cfg, name).path}
    parent_exports = {str(Path(cfg.output_dir).parent / name / "model") for name in parents}
    for section in ("model", "reward_model"):
        path = getattr(getattr(cfg, section, None), "path", "")
        if path and path not in parent_exports:
            inputs[f"{section}.path"] = data_hash(path)  # a model the user gave: its files are an input too
    return Lineage(
        stage=stage,
        config_hash=config_hash(config_to_dict(cfg), ignore=NOT_HASHED),
        inputs=inputs,
        parents={name: parent.lineage_id for name, parent in parents.items()},
        code=code_version(),
        metrics={},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _run(stage: str, cfg: Any) -> dict:
    if cfg.ray.enabled:
        from rlhf.ray.launch import run_stage_on_ray

        return run_stage_on_ray(STAGES[stage], cfg)
    return stage_summary(STAGES[stage].main(cfg))


def main(cfg: PipelineConfig, start_from: str | None = None) -> dict[str, str]:
    """Run the pipeline; returns each stage's outcome ("ran" or "skipped")."""
    root = Path(cfg.output_dir)
    lineages: dict[str, Lineage] = {}
    outcome: dict[str, str] = {}
    forced = ray_started = False
    with ExitStack() as session:
        session.enter_context(RunLock(root))  # a second pipeline into this directory stops here
        save_config(cfg, root / "pipeline.yaml")
        for stage in cfg.stages:
            stage_cfg = cfg.wired(stage)
            run_dir = Path(stage_cfg.output_dir)

            # 1. The lineage this stage would produce, from its config, data and parents.
            parents = {}
            for parent in cfg.parents(stage):
                parents[parent] = lineages.get(parent) or read_lineage(root / parent)
                if parents[parent] is None:
                    raise UserError(f"{stage} reads the {parent} export, but {root / parent} has no {LINEAGE_FILE}: "
                                    f"run the pipeline with {parent} in `stages` first")
            expected = expected_lineage(stage, stage_cfg, parents)

            # 2. Skip it when the stored lineage matches and the export is complete.
            forced = forced or stage == start_from
            up_to_date, reason = check_up_to_date(run_dir, expected)
            if up_to_date and not forced:
                print(f"[pipeline] {stage}: {reason}; skipped (lineage {expected.lineage_id[:12]})")
                lineages[stage] = read_lineage(run_dir)
                outcome[stage] = "skipped"
                continue

            # 3. Run it; resume only checkpoints of an interrupted run of this same lineage.
            pending = read_lineage(run_dir, PENDING_FILE) if (run_dir / PENDING_FILE).is_file() else None
            resume = pending is not None and pending.lineage_id == expected.lineage_id and not forced
            stage_cfg.train.resume = "auto" if resume else "never"
            print(f"[pipeline] {stage}: {'--from ' + start_from if forced else reason}; "
                  f"{'resuming' if resume else 'running'} (lineage {expected.lineage_id[:12]})")
            (run_dir / LINEAGE_FILE).unlink(missing_ok=True)
            # The pipeline owns its directories: an old export is replaced, and its marker goes
            # now so that the stage keeps the resume decision made here.
            (run_dir / FINISHED_MARKER).unlink(missing_ok=True)
            write_lineage(run_dir, expected, PENDING_FILE)
            if cfg.ray.enabled and not ray_started:
                from rlhf.distributed.precision import probe_shape
                from rlhf.ray.session import ray_session

                # Once, when a stage runs; its workers take this stage's bf16 decision (the
                # pipeline's stages share one backbone, so later stages' widths agree).
                session.enter_context(ray_session(cfg.ray, STAGES[stage].code_dirs(), probe_shape(stage_cfg),
                                                  cfg.verbose))
                ray_started = True
            result = _run(stage, stage_cfg)

            # 4. Record what was made: the lineage goes last, marking the artifact complete.
            expected.metrics = {k: float(v) for k, v in result["metrics"].items()}
            write_lineage(run_dir, expected)
            (run_dir / PENDING_FILE).unlink(missing_ok=True)
            lineages[stage] = expected
            outcome[stage] = "ran"

        # 5. Judge the last stage's export against the SFT export (always: it trains nothing).
        if cfg.eval is not None:
            eval_cfg = cfg.wired_eval()
            eval_cfg.validate()
            print(f"[pipeline] eval: {eval_cfg.policy.path} against {eval_cfg.baseline.path or 'no baseline'}")
            STAGES["eval"].main(eval_cfg)
            outcome["eval"] = "ran"

    print_table(summary_rows(root))
    return outcome
