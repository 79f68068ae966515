"""Third-party progress bars, info logs, the listed harmless warnings and Ray's own start-up
lines are off in a run unless logging.verbose; our progress lines come at most every 30 s."""

import functools
import logging
import os
import subprocess
import sys
import warnings

import pytest
from huggingface_hub.utils import are_progress_bars_disabled
from transformers.utils import logging as hf_logging

from rlhf.logging import metrics
from rlhf.logging.quiet import HARMLESS_RAY_LOGS, HARMLESS_WARNINGS, quiet_ray, quiet_third_party
from tests.child_runs import child_env

FSDP_VIEW_WARNING = ("FSDP2-wrapped module (FSDPLlamaForCausalLM) returned a view tensor. An in-place op on this view "
                     "(e.g., `x += y`) will silently drop the pre-backward hook")


@pytest.fixture
def restore_library_logging(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("RAY_DISABLE_WORKER_LOG_PREFIX", raising=False)
    yield
    quiet_third_party(verbose=True)
    quiet_ray(verbose=True)


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


def _warns(message: str, module: str) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party(verbose=False)
        warnings.warn_explicit(message, UserWarning, "x.py", 1, module=module)
        quiet_third_party(verbose=True)
        warnings.warn_explicit(message, UserWarning, "x.py", 2, module=module)
    return [w.lineno for w in caught]


def test_only_the_listed_warnings_from_their_module_are_hidden_and_verbose_shows_them(restore_library_logging):
    assert all(entry.why for entry in HARMLESS_WARNINGS)
    assert _warns(FSDP_VIEW_WARNING, "torch.distributed.fsdp._fully_shard._fsdp_state") == [2]
    assert _warns(FSDP_VIEW_WARNING, "rlhf.training.sft") == [1, 2]  # the same text from elsewhere still prints
    assert _warns("FSDP2-wrapped module failed", "torch.distributed.fsdp._fully_shard._fsdp_state") == [1, 2]


def test_ray_start_up_lines_are_hidden_unless_verbose(restore_library_logging, caplog):
    name, (start,) = next(iter(HARMLESS_RAY_LOGS.items()))
    logger = logging.getLogger(name)
    caplog.set_level(logging.INFO)
    assert quiet_ray(verbose=False) == {"logging_level": logging.WARNING}
    assert os.environ["RAY_DISABLE_WORKER_LOG_PREFIX"] == "1"
    logger.warning(start + ". Set RAY_AUTH_MODE=disabled to opt out.")
    logger.warning("Token authentication is disabled for this Ray cluster.")  # not listed: still printed
    assert [r.getMessage()[:40] for r in caplog.records] == ["Token authentication is disabled for thi"]
    assert quiet_ray(verbose=True) == {"logging_level": logging.INFO}
    logger.warning(start + ".")
    assert len(caplog.records) == 2


def test_plain_progress_lines_come_at_most_every_interval_and_at_the_end(monkeypatch, capsys):
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "time", lambda: now[0])
    progress = metrics.Progress(total=100, desc="sft", every=10, interval=30)
    progress.tty, progress.bar = False, None
    for _ in range(100):
        now[0] += 1.0  # one step a second: a line at steps 30, 60, 90 and the last
        progress.update({"loss": 1.0})
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in lines] == ["30/100", "60/100", "90/100", "100/100"]


def _sft(tmp_path, model_dir, data, verbose: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "rlhf", "sft", "strategy.name=fsdp", f"model.path={model_dir}",
               f"data.train.path={data['sft']}", "data.max_length=64", "data.max_prompt_length=32",
               "train.max_steps=2", "train.micro_batch_size=4", "train.global_batch_size=4", "train.eval_every=0",
               f"output_dir={tmp_path / str(verbose)}", f"logging.verbose={str(verbose).lower()}"]
    return subprocess.Popen(command, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_stage_prints_only_its_own_lines_and_verbose_brings_the_libraries_back(tmp_path, tiny_model_dir,
                                                                                 quickstart_data):
    # FSDP2 in one process: it saves weights (the libraries' bar) and warns about its view
    # outputs (a listed harmless warning). The two runs go side by side.
    runs = {verbose: _sft(tmp_path, tiny_model_dir, quickstart_data, verbose) for verbose in (False, True)}
    output = {verbose: run.communicate(timeout=300)[0] for verbose, run in runs.items()}
    for verbose, run in runs.items():
        assert run.returncode == 0, output[verbose][-3000:]
        assert "sft 2/2 " in output[verbose] and "[sft] done:" in output[verbose]  # our progress and summary
    third_party = ("Writing model shards", "returned a view tensor", "UserWarning")
    assert [text for text in ("Loading weights", *third_party) if text in output[False]] == [], output[False]
    assert [text for text in third_party if text not in output[True]] == [], output[True]
