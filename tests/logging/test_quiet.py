"""Third-party progress bars and info logs are off in a run unless logging.verbose."""

import functools
import os

import pytest
from huggingface_hub.utils import are_progress_bars_disabled
from transformers.utils import logging as hf_logging

from rlhf.logging.quiet import quiet_third_party


@pytest.fixture
def restore_library_logging(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    yield
    quiet_third_party(verbose=True)


def test_quiet_turns_the_libraries_bars_and_info_off_and_verbose_back_on(restore_library_logging):
    quiet_third_party(verbose=False)
    assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    assert hf_logging.get_verbosity() == hf_logging.ERROR
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    quiet_third_party(verbose=True)
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    assert hf_logging.get_verbosity() == hf_logging.WARNING


def test_a_vllm_level_the_user_set_is_kept(restore_library_logging, monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    quiet_third_party(verbose=False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_the_gguf_conversion_bar_goes_unless_verbose(restore_library_logging):
    """transformers' GGUF conversion draws a tqdm bar of its own, outside its progress switch."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    quiet_third_party(verbose=False)
    assert gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors").disable
    quiet_third_party(verbose=False)  # twice is still one wrapper
    assert not isinstance(gguf_utils.tqdm.func, functools.partial)
    quiet_third_party(verbose=True)
    with open(os.devnull, "w") as devnull:
        assert not gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors", file=devnull).disable
