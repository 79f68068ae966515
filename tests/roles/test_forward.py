"""Rollout forwards: answers that share a prompt (a group) go through the model in one row
behind one copy of it, and give the log-probs and gradients of the plain forward."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf.roles import forward
from rlhf.roles.forward import policy_logprobs, shared_prompt_rows
from rlhf.rollout.types import Rollout

PROMPT, RESPONSE = 24, 6


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def group_rollout(vocab: int) -> Rollout:
    """8 rows: one prompt with 3 answers (rows 0, 3, 5), one with 2 (1, 2), one alone (4) and a
    shorter, left-padded prompt with 2 answers (6, 7) whose padding ids differ; answers of
    different lengths."""
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(3, vocab, (8, PROMPT + RESPONSE), generator=generator)
    mask = torch.ones_like(sequences)
    for row in (3, 5):
        sequences[row, :PROMPT] = sequences[0, :PROMPT]
    sequences[2, :PROMPT] = sequences[1, :PROMPT]
    sequences[7, :PROMPT] = sequences[6, :PROMPT]
    mask[6:, :4] = 0
    sequences[6, :4], sequences[7, :4] = 0, 1
    mask[0, PROMPT + 5 :] = 0
    mask[3, PROMPT + 2 :] = 0
    mask[7, PROMPT + 1 :] = 0
    return Rollout(sequences=sequences, attention_mask=mask, prompt_length=PROMPT,
                   response_mask=mask[:, PROMPT:].float(), eos_found=torch.ones(8, dtype=torch.bool))


def logprobs_and_grads(model, rollout, packed: bool, monkeypatch):
    monkeypatch.setattr(forward, "PACKED_COST_LIMIT", 10.0 if packed else -1.0)
    assert (shared_prompt_rows(model, rollout) is not None) == packed
    model.zero_grad()
    logprobs, entropy = policy_logprobs(model, rollout, temperature=0.7, with_entropy=True, entropy_grad=True)
    mask = rollout.response_mask
    ((logprobs * mask).sum() + (entropy * mask).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach() * mask, entropy.detach() * mask, grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # block by block, and the dense masked product
def test_packed_group_forward_gives_the_plain_log_probs_entropy_and_gradients(model, monkeypatch, attention):
    monkeypatch.setattr(model.config, "_attn_implementation", attention)
    rollout = group_rollout(model.config.vocab_size)
    packed = logprobs_and_grads(model, rollout, True, monkeypatch)
    plain = logprobs_and_grads(model, rollout, False, monkeypatch)
    torch.testing.assert_close(packed[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], plain[1], rtol=1e-5, atol=1e-5)
    assert packed[2].keys() == plain[2].keys() and len(plain[2]) > 0
    for name, grad in plain[2].items():
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_checkpointed_layers_recompute_the_shared_prompt_rows_as_the_forward_did(tiny_model_dir, monkeypatch):
    """Backward re-runs a checkpointed layer after `shared_prompt_attention` has switched the
    attention back; the recomputation must still attend block by block."""
    from rlhf.config_sections import ModelConfig
    from rlhf.models.loading import load_causal_lm

    checkpointed = load_causal_lm(ModelConfig(path=str(tiny_model_dir), gradient_checkpointing=True),
                                  torch.device("cpu"))
    checkpointed.train()  # transformers checkpoints only in training mode; the tiny model has no dropout
    rollout = group_rollout(checkpointed.config.vocab_size)
    packed = logprobs_and_grads(checkpointed, rollout, True, monkeypatch)
    plain = logprobs_and_grads(checkpointed, rollout, False, monkeypatch)
    torch.testing.assert_close(packed[0], plain[0], rtol=1e-5, atol=1e-5)
    for name, grad in plain[2].items():
        torch.testing.assert_close(packed[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_packing_is_chosen_only_where_it_pays_and_the_model_takes_the_mask(model, tiny_model_dir):
    rollout = group_rollout(model.config.vocab_size)
    # Four prompts for eight rows, prompts longer than the answers: packed.
    assert shared_prompt_rows(model, rollout) is not None
    # No prompt shared: nothing to pack.
    distinct = rollout.select(torch.tensor([0, 1, 4, 6]))
    assert shared_prompt_rows(model, distinct) is None
    # Uneven groups and long answers: the empty slots cost more than the prompts saved.
    long_answers = rollout.padded(PROMPT, 400, pad_token_id=0)
    assert shared_prompt_rows(model, long_answers) is None
    # A full group, long prompt and long answers: block attention computes only the (answer,
    # prompt + answer) blocks, so packing pays; the dense product over the whole row does not.
    full_groups = rollout.select(torch.tensor([0, 3, 5])).padded(200, 400, pad_token_id=0)
    assert shared_prompt_rows(model, full_groups) is not None
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert shared_prompt_rows(eager, full_groups) is None
    # Flash attention takes no ready 4-D mask.
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config._attn_implementation = "flash_attention_2"
    flash = torch.nn.Module()
    flash.config = config
    assert shared_prompt_rows(flash, rollout) is None


def test_block_attention_equals_the_dense_masked_product():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf.models.shared_prefix import (PromptBlocks, SharedPromptRows, shared_prefix_attention_mask,
                                           shared_prompt_sdpa)

    torch.manual_seed(0)
    prompt, slots, width = 5, 3, 4
    # Row 0: a left-padded prompt, answers of 4, 2 and 0 tokens; row 1: a full prompt, full answers.
    segments = torch.tensor([[-1, -1, 0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1, -1, -1, -1, -1],
                             [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]])
    mask = shared_prefix_attention_mask(segments, "sdpa", torch.float32)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True  # 4 query heads over 2 key/value heads
    length = prompt + slots * width
    query = torch.randn(2, 4, length, 8, requires_grad=True)
    key, value = torch.randn(2, 2, length, 8, requires_grad=True), torch.randn(2, 2, length, 8, requires_grad=True)
    dense, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    rows = SharedPromptRows(input_ids=torch.zeros_like(segments), segment_ids=segments, position_ids=segments,
                            logits_positions=torch.arange(slots * width), row_slots=torch.arange(2 * slots), slots=slots,
                            prompt_length=prompt, response_length=width)
    blocks, _ = shared_prompt_sdpa(module, query, key, value, None, scaling=0.3, shared_prompt=PromptBlocks.of(rows))
    assert blocks.shape == dense.shape == (2, length, 4, 8)
    torch.testing.assert_close(blocks, dense, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(dense)
    dense_grads = torch.autograd.grad((dense * weights).sum(), (query, key, value))
    block_grads = torch.autograd.grad((blocks * weights).sum(), (query, key, value))
    for got, expected in zip(block_grads, dense_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
