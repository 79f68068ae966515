"""What the TRL peer scripts share: the spec, seeding, step timing and the result line.

Each peer script is run as `python trl_X.py '<json spec>'` in a peer venv (benchmarks/common.py:run_peer)
and must print one JSON object as its last stdout line. TRL and transformers print logs to stdout
(`PrinterCallback`, `accelerator.print`), so `result_stdout` points file descriptor 1 at stderr for the
whole run and hands back the real stdout for the result alone.

Import this module before transformers: it turns off Hub telemetry and network look-ups, which
huggingface_hub reads when it is first imported.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402


def result_stdout() -> TextIO:
    """Send everything written to stdout from now on to stderr; return a handle on the real stdout."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real


def load_spec() -> dict[str, Any]:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} '<json spec>'")
    return json.loads(sys.argv[1])


def setup(spec: dict[str, Any]) -> None:
    """Threads, seeds (python, numpy, torch) and quiet progress bars."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    transformers.set_seed(int(spec["seed"]))
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_warning()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def common_args(spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """TrainingArguments shared by all peers: CPU training in fp32, or with bf16 autocast over fp32
    weights where the spec says `"bf16": true` (the benchmark's --precision bf16), constant LR,
    no eval/save/reporting.

    TRL 1.x turns bf16 and gradient checkpointing on by default; both are set explicitly here.
    Logging every step keeps the per-step loss; `Trainer` logs after `on_step_end`, outside `StepTimer`'s window.
    """
    return {
        "output_dir": output_dir,
        "seed": int(spec["seed"]),
        "learning_rate": float(spec["lr"]),
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "gradient_accumulation_steps": 1,
        "bf16": bool(spec.get("bf16", False)),
        "fp16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1,
        "logging_nan_inf_filter": False,  # else a non-finite step loss is logged as the running mean
        "disable_tqdm": True,
    }


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (`on_step_begin` -> `on_step_end`) and the loss logged for it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self._started = 0.0

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._started = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self._started)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def emit(out: TextIO, result: dict[str, Any]) -> None:
    """Print the result as the last stdout line; then fail if a logged loss is not finite."""
    print(json.dumps(result), file=out, flush=True)
    losses = [x for key, values in result.items() if key.endswith("losses") for x in values]
    bad = [x for x in losses if not math.isfinite(x)]
    if bad:
        raise SystemExit(f"non-finite losses: {bad}")
