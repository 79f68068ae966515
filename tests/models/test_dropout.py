"""disable_dropout: no randomness left in train mode, including dropouts that are plain
float attributes read in forward (Llama's attention_dropout goes to SDPA's dropout_p)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf.models.loading import disable_dropout

IDS = torch.tensor([[3, 14, 15, 9, 2, 6, 5, 35], [8, 9, 7, 9, 3, 2, 3, 8]])


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.5, pad_token_id=0, bos_token_id=None,
        eos_token_id=1,
    ))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5, summary_first_dropout=0.5,
    ))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_train_mode_is_deterministic_after_disable_dropout(build):
    torch.manual_seed(0)
    model = build().train()
    assert not torch.equal(logits(model), logits(model))  # dropout on: two forwards differ
    disable_dropout(model)
    assert model.training
    first, second = logits(model), logits(model)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, logits(model.eval()), rtol=0, atol=1e-6)


def test_llama_float_attributes_and_config_fields_are_zeroed():
    model = tiny_llama()
    # Llama has no nn.Dropout in its attention: the rate is a float attribute
    assert model.model.layers[0].self_attn.attention_dropout == 0.5
    disable_dropout(model)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    assert model.config.attention_dropout == 0.0


def test_gpt2_config_fields_are_zeroed():
    model = tiny_gpt2()
    disable_dropout(model)
    cfg = model.config
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop, cfg.summary_first_dropout) == (0.0, 0.0, 0.0, 0.0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    # unrelated numeric fields stay as they were
    assert cfg.layer_norm_epsilon == 1e-5 and cfg.n_embd == 32


def test_plain_modules_and_other_dropout_kinds():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout1d(0.3)  # a _DropoutNd that is not an nn.Dropout
            self.alpha = torch.nn.AlphaDropout(0.3)
            self.hidden_dropout = 0.2  # read in forward with F.dropout
            self.use_dropout = True  # a flag, not a rate: left alone
            self.dropout_layers = 3  # an int count: left alone

    block = Block()
    disable_dropout(block)
    assert block.drop.p == 0.0 and block.alpha.p == 0.0 and block.hidden_dropout == 0.0
    assert block.use_dropout is True and block.dropout_layers == 3
