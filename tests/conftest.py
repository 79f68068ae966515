"""Shared fixtures: a tiny model on disk, the quickstart data, the shared real datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def pytest_collection_modifyitems(config, items):
    # Slow end-to-end tests run last, so a time-boxed run still covers every fast test.
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


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
