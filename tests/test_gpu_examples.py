"""configs/examples/gpu/: the configs for 1 x 8 and 4 x 8 GPUs of 80 GB. Each must load as its
stage's config, ask for what its name and header say (nodes x GPUs, ZeRO-3 or FSDP2, bf16,
gradient checkpointing), and `rlhf plan` must say it fits on 80 GB GPUs. The models are read
from config.json files written here with the published shapes of Llama-3.1-8B and
Llama-3.2-1B (the hub is unreachable from the tests, and the planner reads only the config)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from rlhf.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "configs" / "examples" / "gpu").glob("*.yaml"))
NAME = re.compile(r"(?P<stage>sft|rm|ppo|grpo)_(?P<model>llama3_\d+b)_(?P<nodes>\d)x(?P<gpus>\d)_(?P<strategy>zero3|fsdp)")
STAGE = {"sft": "sft", "rm": "rm", "ppo": "ppo", "grpo": "ppo"}
PARAMS = {"llama3_8b": (7.5e9, 8.5e9), "llama3_1b": (1.1e9, 1.4e9)}


def _shape(model: str):
    from transformers import LlamaConfig

    if model == "llama3_8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for model in PARAMS:
        out[model] = tmp_path_factory.mktemp(model)
        _shape(model).save_pretrained(out[model])
    return out


def test_the_examples_cover_one_and_four_nodes_of_eight_gpus_under_zero3_and_fsdp2():
    assert EXAMPLES, "configs/examples/gpu/ is empty"
    names = [NAME.match(p.stem) for p in EXAMPLES]
    assert all(names), [p.name for p, m in zip(EXAMPLES, names) if not m]
    cells = {(m["nodes"], m["gpus"], m["strategy"]) for m in names}
    assert {("1", "8", "zero3"), ("1", "8", "fsdp"), ("4", "8", "zero3"), ("4", "8", "fsdp")} <= cells
    assert {m["stage"] for m in names} >= {"sft", "rm", "ppo"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_an_example_asks_for_what_its_name_says_and_plan_says_it_fits_on_80_gb(path, shapes, capsys, monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    m = NAME.match(path.stem)
    raw = yaml.safe_load(path.read_text())
    assert raw["ray"]["enabled"] is True
    assert raw["resources"] == {"num_nodes": int(m["nodes"]), "workers_per_node": int(m["gpus"]), "gpus_per_worker": 1}
    strategy = raw["strategy"]
    assert strategy["mixed_precision"] == "bf16"
    assert (strategy["name"], strategy.get("zero_stage")) == (("deepspeed", 3) if m["strategy"] == "zero3" else ("fsdp", None))
    assert raw["model"]["gradient_checkpointing"] is True
    if "reward_model" in raw:   # the critic starts from it and trains with its settings
        assert raw["reward_model"]["gradient_checkpointing"] is True

    model_dir = shapes[m["model"]]
    overrides = [f"model.path={model_dir}"]
    if "reward_model" in raw:
        overrides.append(f"reward_model.path={model_dir}")
    code = main(["plan", STAGE[m["stage"]], "--config", str(path), "--device", "cuda", "--device-memory-gb", "80",
                 "--json", *overrides])
    out = capsys.readouterr()
    assert code == 0, out.err
    plan = json.loads(out.out)
    assert plan["fits"] and plan["workers"] == int(m["nodes"]) * int(m["gpus"])
    assert plan["precision"].startswith("bf16")
    low, high = PARAMS[m["model"]]
    billions = re.search(r"(\d+\.\d+) B parameters", plan["model"])
    assert billions and low <= float(billions[1]) * 1e9 <= high
