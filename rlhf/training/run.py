"""The bookkeeping every stage shares, so that a stage's `main` holds only its recipe.

`Run.start` claims the output directory (a finished run is refused unless `overwrite`; a run
still going there is refused at once, through an advisory lock held for this run's life), sets
up the world (the configured strategy, or the one a caller passes), applies the process-wide
kernel settings. `begin` writes `config.yaml`, resumes from the newest complete checkpoint,
opens the metrics, runs the step-0 evaluation of a fresh run and starts the progress bar.
`end_step` is the tail of every step: evaluate, log, checkpoint, and stop cleanly when asked
(SIGTERM / Ctrl-C). `export` and `finish` write the model and the marker of a finished run.
Used as a context manager, the run releases its lock, closes its trackers and shuts down what
it was handed (`own`) on any exit.
"""

from __future__ import annotations

import math
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from rlhf.config import save_config
from rlhf.distributed.checkpoint import Checkpointable, CheckpointManager
from rlhf.distributed.factory import build_strategy
from rlhf.distributed.strategy import Strategy, World
from rlhf.errors import UserError
from rlhf.distributed.precision import LOW_PRECISION, describe as describe_precision, probe_shape
from rlhf.kernels import configure_process
from rlhf.logging.alarms import AlarmMonitor
from rlhf.logging.metrics import MetricsWriter, Progress, read_metrics
from rlhf.logging.quiet import quiet_third_party
from rlhf.training.guards import NonFiniteGuard
from rlhf.training.output import FINISHED_MARKER, claim_output_dir
from rlhf.training.run_lock import LOCK_NAME, RunLock
from rlhf.training.stop import STOP, interrupted


class LoopState(Protocol):
    """Algorithm state a checkpoint holds besides the models (KL controller, best score...)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Exportable(Protocol):
    def export(self, directory: Path, tokenizer: Any, extra_files: dict | None = None) -> None: ...


@dataclass
class StageResult:
    metrics: dict[str, float]
    """The run's summary (also written to model/rlhf_summary.json)."""
    model_dir: Path
    model: torch.nn.Module | None = None
    """The trained model in memory (sharded under a sharded strategy; None when it lives in
    Ray workers)."""
    nodes: dict | None = None
    """Where worker groups the stage started itself ran (Ray node ids per role), if any."""


@dataclass
class Schedule:
    """When the tail of a step evaluates, logs and checkpoints (every N steps; 0: never)."""

    total: int
    eval_every: int = 0
    log_every: int = 1
    save_every: int = 0


class Run:
    def __init__(self, stage: str, cfg: Any, world: World, layout: str | None = None):
        self.stage, self.cfg, self.world = stage, cfg, world
        self.dir = Path(cfg.output_dir)
        self.checkpoints = CheckpointManager(self.dir / "checkpoints", world, cfg.train.keep_last, layout,
                                             batch=_batch_fields(cfg))
        self.guard = NonFiniteGuard(stage, cfg.train.max_consecutive_nonfinite)
        self.resources = ExitStack()
        self.metrics: MetricsWriter | None = None
        self.progress: Progress | None = None
        self.schedule = Schedule(total=0)
        self.trainees: dict[str, Checkpointable] = {}
        self.state: LoopState | None = None
        self.evaluate: Callable[[int], dict[str, float]] | None = None
        self.initial_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.finite = True
        self.alarms: AlarmMonitor | None = None

    # -- start ------------------------------------------------------------------------------
    @classmethod
    def start(cls, stage: str, cfg: Any, world: World | None = None, layout: str | None = None) -> "Run":
        """Kernel settings, world set up, output directory claimed and locked (on every worker,
        or the first refusal stops them all), config.yaml written. `world` defaults to the
        configured strategy."""
        cfg.kernels = cfg.kernels.effective()  # what runs is what config.yaml records
        configure_process(cfg.kernels)
        quiet_third_party(cfg.logging.verbose)
        world = world or build_strategy(cfg.strategy, probe_shape(cfg))
        world.setup(cfg.seed)
        run = cls(stage, cfg, world, layout)
        refusal = run._claim() if world.is_main else None
        if world.all_reduce({"refused": float(refusal is not None)}, op="max")["refused"]:
            run.resources.close()
            raise UserError(refusal or f"{stage}: rank 0 refused output_dir {cfg.output_dir}")
        run._record_precision()
        reason = getattr(getattr(cfg, "rollout", None), "engine_reason", None)
        if reason:
            run.say(f"rollout engine: {cfg.rollout.engine} (rollout.engine=auto: {reason})")
        return run

    def _record_precision(self) -> None:
        """What the strategy computes in, said once; config.yaml records it in place of auto
        (as it records the effective kernels)."""
        precision = getattr(self.world, "precision", None)
        if precision is None:  # a world that trains nothing itself (the Ray PPO driver)
            return
        self.say("precision: " + describe_precision(self.cfg.strategy.mixed_precision, precision, self.world.device,
                                                      getattr(self.world, "probe_shape", None)))
        self.cfg.strategy.mixed_precision = precision

    def _claim(self) -> str | None:
        """Lock the directory and check it holds no finished run; why not, or None."""
        created = not self.dir.exists()
        lock = RunLock(self.dir)
        try:
            lock.acquire()
            claim_output_dir(self.cfg)
        except UserError as exc:
            lock.release()
            return str(exc)
        self.resources.callback(self._remove_if_untouched, created)
        self.resources.callback(lock.release)
        return None

    def _remove_if_untouched(self, created: bool) -> None:
        """A run that failed before writing anything (bad data, bad paths) leaves no directory
        behind when it made it."""
        if created and self.dir.is_dir() and all(p.name == LOCK_NAME for p in self.dir.iterdir()):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self.metrics is not None:
            self.metrics.finish()
        self.resources.close()

    def own(self, resource: Any) -> Any:
        """Shut `resource` down (its `shutdown()`) when the run ends, however it ends."""
        if hasattr(resource, "shutdown"):
            self.resources.callback(resource.shutdown)
        return resource

    @property
    def strategy(self) -> Strategy:
        """The world as a training strategy (every world but the Ray PPO driver's is one)."""
        if not isinstance(self.world, Strategy):
            raise TypeError(f"{self.stage}: this process trains nothing itself (world {self.world.name})")
        return self.world

    @property
    def device(self) -> torch.device:
        return self.world.device

    def say(self, message: str) -> None:
        if self.world.is_main:
            print(f"[{self.stage}] {message}", flush=True)

    # -- begin ------------------------------------------------------------------------------
    def begin(self, schedule: Schedule, trainees: dict[str, Checkpointable], models: Sequence[torch.nn.Module] = (),
              evaluate: Callable[[int], dict[str, float]] | None = None, state: LoopState | None = None,
              alarms: AlarmMonitor | None = None) -> int:
        """Resume the trainees (and `state`) from the checkpoint `train.resume` asks for, open
        the metrics, evaluate a fresh run at step 0 and start the progress bar; returns the step
        to start from. `models` are counted for perf/mfu; `alarms` are checked at the end of each
        step on the main worker (a resumed run first replays the metrics it keeps, so an alarm
        that already fired does not fire again)."""
        self.schedule, self.trainees, self.state, self.evaluate = schedule, trainees, state, evaluate
        if self.world.is_main:
            save_config(self.cfg, self.dir / "config.yaml")
        start = 0
        path = self.checkpoints.resolve(self.cfg.train.resume)
        if path is not None:
            saved = self.checkpoints.load(trainees, path)
            start, self.initial_eval = saved["step"], dict(saved.get("initial_eval", {}))
            if state is not None:
                state.load_state_dict(saved["state"])
            self.say(f"resumed from {self.checkpoints.loaded} at step {start}")
        self.metrics = MetricsWriter(self.dir, enabled=self.world.is_main, resume_step=start, logging=self.cfg.logging,
                                     stage=self.stage, config=self.cfg, models=models,
                                     compute_dtype=LOW_PRECISION.get(getattr(self.world, "precision", "no")))
        if start == 0 and evaluate is not None:
            self.initial_eval = evaluate(0)
            self.metrics.log(0, self.initial_eval)
            self.say("step 0: " + _format(self.initial_eval))
        if alarms is not None and self.world.is_main:
            self.alarms = alarms
            alarms.replay(read_metrics(self.dir) if start else [{"step": 0, **self.initial_eval}])
        self.last_eval = dict(self.initial_eval)
        self.progress = Progress(schedule.total, self.stage, enabled=self.world.is_main and self.cfg.logging.progress,
                                 initial=start)
        return start

    # -- each step --------------------------------------------------------------------------
    def check_finite(self, step: int, values: dict[str, float], row: dict[str, float],
                     before_update: bool = False) -> bool:
        """Whether every value is finite on every worker (see NonFiniteGuard); the count of
        skipped steps goes into `row`."""
        self.finite = self.guard.check(step, values, self.world, before_update=before_update)
        row[f"{self.stage}/skipped_nonfinite"] = float(self.guard.skipped)
        return self.finite

    def end_step(self, done: int, row: dict[str, float], progress: dict[str, float] | None = None) -> None:
        """The tail of step `done` (1-based): evaluate, log, checkpoint, and stop here with a
        checkpoint when a stop was asked for on any worker."""
        schedule = self.schedule
        evaluated = self.evaluate is not None and (
            (schedule.eval_every and done % schedule.eval_every == 0) or done == schedule.total)
        if evaluated:
            self.last_eval = self.evaluate(done)
            row.update(self.last_eval)
        alarms = self.alarms.check(done, row) if self.alarms is not None else []
        for alarm in alarms:
            row[alarm.metric] = 1.0
            self.say(alarm.line())
        if done % schedule.log_every == 0 or evaluated or alarms or not self.finite:
            self.metrics.log(done, row)
        self.progress.update(progress)
        more = done < schedule.total
        if self.finite and schedule.save_every and done % schedule.save_every == 0 and more:
            self.save(done)
        if more and STOP.agreed(self.world):  # SIGTERM / Ctrl-C: checkpoint, then stop
            path = self.save(done)
            raise interrupted(self.stage, done, schedule.total, path, STOP.signal_name)

    def log(self, step: int, row: dict[str, float]) -> None:
        self.metrics.log(step, row)

    def log_table(self, name: str, step: int, rows: list[dict]) -> None:
        """A few example rows (prompt, answer, scores) under `name` at `step`."""
        self.metrics.log_table(name, step, rows)

    def save(self, done: int) -> Path:
        state = {"step": done, "initial_eval": self.initial_eval,
                 "state": self.state.state_dict() if self.state is not None else {}}
        return self.checkpoints.save(self.trainees, done, state)

    # -- end ----------------------------------------------------------------------------------
    def export(self, trainee: Exportable, tokenizer: Any, name: str = "model", extra_files: dict | None = None) -> Path:
        """Full weights (LoRA merged) as `output_dir/<name>`, a `save_pretrained` directory."""
        directory = self.dir / name
        trainee.export(directory, tokenizer, extra_files)
        return directory

    def finish(self, summary: dict[str, float], model: torch.nn.Module | None = None,
               nodes: dict | None = None) -> StageResult:
        """Mark the run finished (model/rlhf_config.yaml), close the metrics, release the world."""
        if self.progress is not None:
            self.progress.close()
        if self.world.is_main:
            save_config(self.cfg, self.dir / FINISHED_MARKER)
        self.say("done: " + _format({k: v for k, v in summary.items() if k.startswith("eval/")})
                 + f"; model in {self.dir / 'model'}")
        if self.metrics is not None:
            self.metrics.finish()
        self.world.teardown()
        return StageResult(summary, self.dir / "model", model, nodes)


def _batch_fields(cfg: Any) -> dict[str, int]:
    """The batch sizes a resumed run keeps, whatever its number of workers (checkpoint.py)."""
    fields = {f"train.{k}": getattr(cfg.train, k) for k in ("global_batch_size", "micro_batch_size")}
    ppo = getattr(cfg, "ppo", None)
    if ppo is not None:
        fields.update({f"ppo.{k}": getattr(ppo, k) for k in ("rollout_batch_size", "mini_batch_size")})
    return fields


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
                     for k, v in metrics.items())
