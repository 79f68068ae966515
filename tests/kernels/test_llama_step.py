"""`LlamaDecodeStep` gives the logits of the model's own forward, for the prompt and step after
step, with left padding, grouped-query attention, biases and rows leaving the batch; models it
cannot run keep their forward."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from rlhf.rollout.decode import DecodeEngine
from rlhf.rollout.engine import SamplingParams, left_pad
from rlhf.kernels import onednn, skinny
from rlhf.kernels.llama_step import LlamaDecodeStep
from rlhf.models.autocast import use_autocast


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=500.0, **overrides)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("bias,dtype,packed", [(False, torch.float32, False), (True, torch.float32, False),
                                               (True, torch.float32, True), (False, torch.bfloat16, False),
                                               (True, "autocast", False)])
def test_step_logits_equal_the_models_forward_as_rows_leave(bias, dtype, packed, monkeypatch):
    """"autocast": fp32 weights computing in bf16 (mixed precision, rlhf/models/autocast.py);
    the step casts its weights once and runs in bf16, the model's forward under autocast.
    `packed`: every weight in oneDNN's blocked layout, as SmolLM2-sized ones are on a CPU."""
    if packed:
        if not onednn._packing_for("auto"):
            pytest.skip("this torch build has no oneDNN linear")
        monkeypatch.setattr(skinny, "PACKED_MIN_WEIGHT", 256)  # the tiny model's weights are all above it
        monkeypatch.setattr(onednn, "decode_packing_enabled", lambda: True)
    model = tiny_llama(attention_bias=bias, mlp_bias=bias)
    if bias:  # biases start at zero: give them values so a dropped bias shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(param, std=0.5)
    compute = torch.bfloat16 if dtype == "autocast" else None
    if compute is not None:
        use_autocast(model, compute)
    else:
        model = model.to(dtype)
    assert LlamaDecodeStep.supports(model)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids, mask = left_pad(prompts, pad_token_id=0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    theirs = DynamicCache(config=model.config)
    # bf16: a few units in the last place; under autocast the model's residual stream stays
    # fp32 while the step's is bf16.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}.get(dtype, 4e-2)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=theirs,
                         use_cache=True).logits[:, -1]
    step = LlamaDecodeStep(model, compute)
    products = [step.head, step.layers[0].qkv, step.layers[0].gate_up, step.layers[0].out.keywords.get("product", step.layers[0].out)]
    assert all((p.func is onednn.packed_linear) == packed for p in products)
    torch.testing.assert_close(step.prefill(ids, mask, max_new_tokens=6), expected, rtol=tolerance, atol=tolerance)
    attention, next_position = mask, positions[:, -1] + 1
    generator = torch.Generator().manual_seed(0)
    for index in range(6):
        if index == 3:  # the middle row finished: both sides drop it
            kept = torch.tensor([0, 2])
            theirs.batch_select_indices(kept)
            step.keep(kept)
            attention, next_position = attention[kept], next_position[kept]
        tokens = torch.randint(1, 97, (attention.shape[0],), generator=generator)
        attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
        with torch.no_grad():
            expected = model(input_ids=tokens.unsqueeze(-1), attention_mask=attention,
                             position_ids=next_position.unsqueeze(-1), past_key_values=theirs,
                             use_cache=True).logits[:, -1]
        got = step(tokens, next_position)
        assert got.dtype == (compute or dtype)
        torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
        next_position = next_position + 1


def test_engine_decodes_through_the_step_and_other_models_through_their_forward(monkeypatch):
    calls = []
    original = LlamaDecodeStep.__call__

    def counted(self, tokens, positions):
        calls.append(tokens.shape[0])
        return original(self, tokens, positions)

    monkeypatch.setattr(LlamaDecodeStep, "__call__", counted)
    model = tiny_llama()
    prompts = [[5, 6, 7], [8, 9]]
    params = SamplingParams(max_new_tokens=5)
    DecodeEngine(model, eos_token_id=1, pad_token_id=0).generate(prompts, params)
    assert calls, "a plain Llama decodes through LlamaDecodeStep"

    calls.clear()
    hooked = tiny_llama()
    hooked.model.layers[0].mlp.up_proj.register_forward_hook(lambda module, args, out: out)
    assert not LlamaDecodeStep.supports(hooked)
    DecodeEngine(hooked, eos_token_id=1, pad_token_id=0).generate(prompts, params)
    assert calls == []
