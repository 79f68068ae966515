"""Third-party output a run does not need: the progress bars transformers and huggingface_hub
draw while reading and writing weights ("Loading weights", "Converting and de-quantizing GGUF
tensors", "Writing model shards"), their info-level messages, vLLM's per-request INFO lines,
the Python warnings listed in HARMLESS_WARNINGS, and Ray's own start-up lines and worker
prefixes (`quiet_ray`). A stage prints its own lines (rlhf/logging/metrics.py's Progress, the
summary, alarms, errors); `logging.verbose` brings the rest back. Warnings that are not listed
here still print."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class HarmlessWarning:
    """One Python warning a run hides unless verbose: its category, the start of its message
    (a regular expression, as `warnings.filterwarnings` takes it), the module that warns, and
    why it is harmless here."""

    category: type[Warning]
    message: str
    module: str
    why: str


HARMLESS_WARNINGS: tuple[HarmlessWarning, ...] = (
    HarmlessWarning(
        UserWarning, r"FSDP2-wrapped module \(\w+\) returned a view tensor", r"torch\.distributed\.fsdp",
        why="FSDP2 warns whenever a wrapped model's output is a view, in case a caller changes it in place; no "
            "stage does (losses and log-probs are computed out of place), and tests/distributed shows FSDP2 "
            "runs give the single process's losses and gradients"),
)

# Ray's Python log records that say nothing a run needs, by logger name: the start of each message.
HARMLESS_RAY_LOGS: dict[str, tuple[str, ...]] = {
    # Token authentication on is what a private local Ray should have (rlhf/ray/session.py); the
    # line only says how to turn it off.
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray cluster",),
}


def quiet_third_party(verbose: bool) -> None:
    """Silence (or, `verbose`, restore) the libraries' progress bars, info logs and the listed
    harmless warnings in this process. vLLM reads its level when it is imported, so the
    environment variable is set here, before any engine is built; a level the user set is kept."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    _harmless_warnings(hidden=not verbose)
    if verbose:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()
        enable_progress_bars()
        _gguf_conversion_bar(show=True)
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    disable_progress_bars()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    _gguf_conversion_bar(show=False)


def _gguf_conversion_bar(show: bool) -> None:
    """transformers converts GGUF tensors under a bare tqdm bar that its progress switch does not
    reach (and tqdm reads its TQDM_* defaults once, at import), so the module's `tqdm` is swapped
    for one that starts disabled."""
    from functools import partial

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # another transformers: nothing to silence
        return
    original = bar.func if isinstance(bar, partial) else bar
    gguf_utils.tqdm = original if show else partial(original, disable=True)


def _harmless_warnings(hidden: bool) -> None:
    """Our filters in front of the process's others; verbose puts a "default" one for the same
    warning in front of that (the first matching filter decides), through the public API only."""
    for entry in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore" if hidden else "default", entry.message, entry.category, entry.module)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_ray(verbose: bool) -> dict:
    """`ray.init` keyword arguments for a driver that prints the run's lines only: Ray's info
    lines ("Started a local Ray instance") and the records of HARMLESS_RAY_LOGS off, and the
    workers' lines without Ray's "(StageWorker pid=...)" prefix (our lines name their stage;
    verbose keeps the prefix, which tells workers apart). Called before Ray is imported: Ray
    reads the prefix setting then; a process that imported it already keeps its prefixes.
    Ray's warnings and errors, a dead worker's included, still print."""
    for name, starts in HARMLESS_RAY_LOGS.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropMessages)]:
            logger.removeFilter(old)
        if not verbose:
            logger.addFilter(_DropMessages(starts))
    if verbose:
        return {"logging_level": logging.INFO}
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    return {"logging_level": logging.WARNING}
