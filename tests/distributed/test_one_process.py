"""A sharded engine also runs as one plain process (no launcher): a world of one with its own
process group on a free port, which later runs in the same process (the next stage of a
pipeline) reuse, whatever the engine."""

import pytest
import torch

from rlhf.config import SFTConfig, load_config
from rlhf.logging.metrics import read_metrics
from stages import sft


def _run(tmp_path, data, model, name, *strategy):
    out = tmp_path / name
    cfg = load_config(SFTConfig, [], [
        f"data.train.path={data}", f"model.path={model}", f"output_dir={out}", "logging.progress=false",
        "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3", "train.eval_every=0",
        "train.max_steps=2", "data.max_length=128", "data.max_prompt_length=64", *strategy])
    sft.main(cfg)
    return [row["sft/loss"] for row in read_metrics(out) if "sft/loss" in row]


@pytest.mark.slow
def test_sharded_engines_one_after_another_in_one_process_match_single(
    tmp_path, quickstart_data, tiny_model_dir, monkeypatch
):
    # One thread: another test run may hold the other core, and two threads on a shared core
    # run many times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = (tmp_path, quickstart_data["sft"], tiny_model_dir)
        single = _run(*args, "single")
        zero3 = _run(*args, "zero3", "strategy.name=deepspeed", "strategy.zero_stage=3")
        zero2 = _run(*args, "zero2", "strategy.name=deepspeed", "strategy.zero_stage=2")
        fsdp = _run(*args, "fsdp", "strategy.name=fsdp")
    finally:
        torch.set_num_threads(threads)
    for losses in (zero3, zero2, fsdp):
        assert len(losses) == 2
        assert max(abs(a - b) / a for a, b in zip(single, losses)) < 1e-4
