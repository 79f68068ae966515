"""`iter_full_weights`: what a rollout engine with its own copy of the weights receives: every
weight of the plain model under its HF name, LoRA adapters merged, a tied weight once, one
module at a time."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.config_sections import LoraConfig
from rlhf.models.lora import apply_lora
from rlhf.rollout.weights import iter_full_weights


def tiny(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))


def test_plain_model_sends_its_state_dict_with_a_tied_weight_once():
    model = tiny(tied=True)
    sent = list(iter_full_weights(model))
    names = [name for name, _ in sent]
    assert len(names) == len(set(names))
    # Tied: the head is the embedding, sent once under the embedding's name (vLLM ties it again).
    assert "lm_head.weight" not in names
    state = model.state_dict()
    assert set(names) == set(state) - {"lm_head.weight"}
    for name, tensor in sent:
        assert torch.equal(tensor, state[name]), name
    # Module by module, in the model's order: a decoder layer's weights come together.
    layers = [name.split(".")[2] for name in names if name.startswith("model.layers.")]
    assert layers == sorted(layers)


def test_lora_layers_are_sent_merged_under_the_base_names():
    base = tiny(tied=False)
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at 0 (a no-op adapter): give it a value
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    sent = dict(iter_full_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(sent) == set(merged) == set(base.state_dict())
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, merged[name], rtol=1e-5, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sent[q], base.state_dict()[q])  # the adapter's update is in it
    torch.testing.assert_close(sent["model.layers.0.mlp.up_proj.weight"], base.state_dict()["model.layers.0.mlp.up_proj.weight"])
