"""Export from gathered weights: tied names share one tensor again, LoRA is merged into a
plain copy and the live (sharded) model keeps its adapters."""

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config_sections import LoraConfig
from rlhf.distributed.gather import export_gathered
from rlhf.models.lora import apply_lora


def _inputs(tokenizer):
    return tokenizer(["List 3 fruits in uppercase.", "Name 2 birds."], return_tensors="pt", padding=True)


def test_gathered_copies_of_tied_weights_are_saved_once(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # A gather returns a separate copy per name, also for lm_head.weight = embed_tokens.weight.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = export_gathered(model, state, tokenizer, tmp_path / "plain")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_inputs(tokenizer)).logits, model(**_inputs(tokenizer)).logits,
                                   rtol=0, atol=0)


def test_lora_is_merged_from_the_gathered_state(tmp_path, tiny_model_dir):
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, alpha=8)).eval()
    with torch.no_grad():  # LoRA B starts at zero: give the adapters an effect to merge
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = export_gathered(model, state, tokenizer, tmp_path / "merged")

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        expected = model(**_inputs(tokenizer)).logits
        torch.testing.assert_close(reloaded(**_inputs(tokenizer)).logits, expected, rtol=0, atol=1e-5)
    assert any("lora_B" in n for n, _ in model.named_parameters()), "the live model must keep its adapters"
