"""Third-party output a run does not need: the progress bars transformers and huggingface_hub
draw while reading and writing weights ("Loading weights", "Converting and de-quantizing GGUF
tensors", "Writing model shards"), their info-level messages, and vLLM's per-request INFO lines.
A stage prints one progress line of its own; `logging.verbose` brings the rest back."""

from __future__ import annotations

import os


def quiet_third_party(verbose: bool) -> None:
    """Silence (or, `verbose`, restore) the libraries' progress bars and info logs in this
    process. vLLM reads its level when it is imported, so the environment variable is set here,
    before any engine is built; a level the user set is kept."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()
        enable_progress_bars()
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    disable_progress_bars()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
