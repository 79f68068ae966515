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
