"""Padding-free rows: the loss and every gradient equal the padded batch's, attention runs once
per example without a mask, and models it cannot serve fall back to an exact mask."""

import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config)

from rlhf.data.sft_dataset import IGNORE_INDEX, SFTBatches, SFTExample, collate_padded, collate_padding_free
from rlhf.models import segments
from rlhf.models.segments import SEGMENT_SDPA, takes_segments
from rlhf.kernels.lm_loss import lm_forward_nll

LLAMA_GQA = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _examples(vocab: int) -> list[SFTExample]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for prompt, answer in ((5, 7), (9, 3), (2, 11), (4, 1)):
        ids = torch.randint(0, vocab, (prompt + answer,), generator=generator).tolist()
        examples.append(SFTExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def _loss_and_grads(model, batch):
    model.zero_grad()
    nll, n = lm_forward_nll(model, batch)
    nll.backward()
    return nll.detach(), n, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_padding_free_row_layout():
    examples = _examples(50)
    row = collate_padding_free(examples)
    padded = collate_padded(examples, pad_token_id=0)
    lengths = [len(e.input_ids) for e in examples]
    assert row.input_ids.shape == (1, sum(lengths)) and row.attention_mask is None
    assert row.segment_lengths == lengths and row.real_tokens == padded.real_tokens == sum(lengths)
    assert row.position_ids[0].tolist() == [p for n in lengths for p in range(n)]
    assert row.num_target_tokens == padded.num_target_tokens
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert all(row.labels[0, s] == IGNORE_INDEX for s in starts)


@pytest.mark.parametrize("config,implementation", [
    (LLAMA_GQA, "segments"),  # rlhf_segment_sdpa, grouped KV heads
    (LLAMA_GQA, "eager"),     # transformers' block-diagonal mask
    (Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128), "segments"),  # q/k/v biases
    (GPT2Config(vocab_size=97, n_positions=128, n_embd=32, n_layer=2, n_head=4), "segments"),  # learned positions
    (MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, sliding_window=8), "window"),  # window < example
], ids=["llama", "llama-eager", "qwen2", "gpt2", "mistral-window"])
def test_padding_free_loss_and_gradients_equal_padded(config, implementation):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager" if implementation == "eager" else "sdpa")
    model.eval()  # GPT-2's dropout off; gradients still flow
    assert takes_segments(model.config) == (implementation == "segments")  # a sliding window stays in sdpa's mask
    examples = _examples(config.vocab_size)
    padded_nll, padded_n, padded_grads = _loss_and_grads(model, collate_padded(examples, pad_token_id=0))
    free_nll, free_n, free_grads = _loss_and_grads(model, collate_padding_free(examples))
    assert free_n == padded_n == 7 + 3 + 11 + 1
    torch.testing.assert_close(free_nll, padded_nll, rtol=1e-5, atol=1e-5)
    assert free_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(free_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_attention_runs_once_per_example(monkeypatch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LLAMA_GQA, attn_implementation="sdpa")
    calls = []
    plain = torch.nn.functional.scaled_dot_product_attention

    def counting(query, key, value, **kwargs):
        calls.append((query.shape[2], key.shape[2], kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return plain(query, key, value, **kwargs)

    monkeypatch.setattr(segments.F, "scaled_dot_product_attention", counting)
    examples = _examples(LLAMA_GQA.vocab_size)
    lm_forward_nll(model, collate_padding_free(examples))
    lengths = [len(e.input_ids) for e in examples]
    # Two layers, each one causal call per example, with no mask.
    assert calls == [(n, n, True, True) for _ in range(2) for n in lengths]
    assert model.config._attn_implementation == "sdpa"  # switched for the call only


def test_a_padding_free_call_leaves_the_models_attention_and_exports_as_they_were(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LLAMA_GQA, attn_implementation="sdpa").eval()
    ids = torch.randint(0, LLAMA_GQA.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        lm_forward_nll(model, collate_padding_free(_examples(LLAMA_GQA.vocab_size)))
        assert model.config._attn_implementation == "sdpa"
        after = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert generated.shape == (2, 12)
    model.save_pretrained(tmp_path)
    assert SEGMENT_SDPA not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    eager = AutoModelForCausalLM.from_config(LLAMA_GQA, attn_implementation="eager")
    assert not takes_segments(eager.config)


def test_a_padding_free_sft_forward_builds_no_mask_over_the_row():
    """transformers would build the row's (tokens x tokens) block-diagonal mask from the
    restarting positions; the switched attention builds none."""
    from rlhf.logging.perf import LargestTensor

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LLAMA_GQA, attn_implementation="sdpa").eval()
    generator = torch.Generator().manual_seed(1)
    examples = []
    for prompt, answer in ((300, 40), (200, 60), (250, 30)):
        ids = torch.randint(0, LLAMA_GQA.vocab_size, (prompt + answer,), generator=generator).tolist()
        examples.append(SFTExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    row = collate_padding_free(examples)
    tokens = row.input_ids.shape[1]
    with torch.no_grad(), LargestTensor() as largest:
        lm_forward_nll(model, row)
    assert largest.bytes < tokens * tokens // 2  # the mask: tokens² bytes


def test_padding_free_batches_hold_the_padded_batches_examples():
    examples = [SFTExample(list(range(1, n + 1)), list(range(1, n + 1))) for n in (5, 9, 3, 7, 4, 6, 8)]
    padded = SFTBatches(examples, 3, 0, packing=False, max_length=64, seed=2)
    free = SFTBatches(examples, 3, 0, packing=False, max_length=64, seed=2, padding_free=True)
    assert len(free) == len(padded) == 3
    for index in range(3):
        p, f = padded.batch(1, index), free.batch(1, index)
        assert f.input_ids.shape[0] == 1 and f.real_tokens == p.real_tokens
        assert f.input_ids[0].tolist() == [t for row, m in zip(p.input_ids, p.attention_mask) for t in row[m.bool()].tolist()]
    packed = SFTBatches(examples, 2, 0, packing=True, max_length=16, seed=2, padding_free=True)
    rows = [packed.batch(0, i) for i in range(len(packed))]
    assert all(r.input_ids.shape[0] == 1 and r.attention_mask is None for r in rows)
    assert sorted(n for r in rows for n in r.segment_lengths) == sorted(len(e.input_ids) for e in examples)


def test_checkpointed_sft_rows_recompute_per_example(tmp_path):
    """The SFT model is switched to per-example attention for the padding-free call only; with
    gradient checkpointing its layers' recomputation in backward must attend the same way."""
    from rlhf.config_sections import ModelConfig
    from rlhf.models.loading import load_causal_lm

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LLAMA_GQA, attn_implementation="sdpa").save_pretrained(tmp_path)
    model = load_causal_lm(ModelConfig(path=str(tmp_path), gradient_checkpointing=True), torch.device("cpu"))
    model.train()  # transformers checkpoints only in training mode; this config has no dropout
    assert model.is_gradient_checkpointing and takes_segments(model.config)
    examples = _examples(LLAMA_GQA.vocab_size)
    padded_nll, _, padded_grads = _loss_and_grads(model, collate_padded(examples, pad_token_id=0))
    free_nll, _, free_grads = _loss_and_grads(model, collate_padding_free(examples))
    torch.testing.assert_close(free_nll, padded_nll, rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(free_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
