"""Padding-free PPO forwards (ppo.padding_free): a micro-batch's [left-padded prompt,
right-padded response] rows laid back to back, each attending to itself only, give the padded
forward's log-probs, entropies, values and gradients, and skip the padding's compute."""

from __future__ import annotations

import pytest
import torch

from rlhf.models.segments import pack_padding_free, takes_segments
from rlhf.roles import forward
from rlhf.roles.forward import padding_free_rows, policy_logprobs, response_scores, response_values
from rlhf.rollout.types import Rollout

PROMPT, RESPONSE = 16, 7


@pytest.fixture
def padded_rollout(rollout_of):
    def build(vocab: int, rows: int = 5, seed: int = 0) -> Rollout:
        """`rows` different prompts of 2..16 tokens (left padding, id 0) and answers of 1..7
        tokens (right padding); row 1 fills both regions."""
        generator = torch.Generator().manual_seed(seed)
        sequences = torch.randint(3, vocab, (rows, PROMPT + RESPONSE), generator=generator)
        mask = torch.ones_like(sequences)
        for row in range(rows):
            if row == 1:
                continue
            prompt = int(torch.randint(2, PROMPT + 1, (1,), generator=generator))
            answer = int(torch.randint(1, RESPONSE + 1, (1,), generator=generator))
            mask[row, : PROMPT - prompt] = 0
            mask[row, PROMPT + answer :] = 0
        return rollout_of(sequences, mask, PROMPT)
    return build


def test_packing_keeps_every_real_token_and_points_at_each_response_token_predictor(padded_rollout):
    rollout = padded_rollout(vocab=50)
    rows = pack_padding_free(rollout.sequences, rollout.attention_mask, rollout.prompt_length,
                             rollout.response_mask)
    mask = rollout.attention_mask.bool()
    assert rows.input_ids.shape == (1, int(mask.sum()))
    assert rows.lengths == mask.sum(-1).tolist()
    # Positions restart at 0 for every example.
    starts = torch.tensor([0, *rows.lengths]).cumsum(0)[:-1]
    assert rows.position_ids[0, starts].tolist() == [0] * len(rows.lengths)
    # The token after each predictor is the response token it predicts.
    targets = rollout.responses.flatten()[rows.response_slots]
    assert torch.equal(rows.input_ids[0, rows.predictors + 1], targets)
    assert rows.predictors.numel() == int(rollout.response_mask.sum())
    per_token = torch.arange(1.0, rows.predictors.numel() + 1)
    unpacked = rows.unpack(per_token)
    assert unpacked.shape == rollout.response_mask.shape
    assert torch.equal(unpacked[rollout.response_mask.bool()], per_token)
    assert float(unpacked[~rollout.response_mask.bool()].abs().sum()) == 0.0


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal up to float rounding of sums taken in another order: relative to the tensor's scale."""
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= 1e-5 * scale + 1e-7, name


def logprobs_and_grads(model, rollout: Rollout, padding_free: bool):
    model.zero_grad()
    logprobs, entropy = policy_logprobs(model, rollout, temperature=0.7, with_entropy=True, entropy_grad=True,
                                        padding_free=padding_free)
    mask = rollout.response_mask
    weights = torch.linspace(-1.0, 1.0, mask.numel()).view_as(mask)  # per-token coefficients, as PPO's loss has
    ((logprobs * mask * weights).sum() + (entropy * mask).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach() * mask, entropy.detach() * mask, grads


def test_padding_free_log_probs_entropy_and_gradients_equal_the_padded_forward(lm, monkeypatch, padded_rollout):
    rollout = padded_rollout(lm.config.vocab_size)
    calls = []
    real = forward.padding_free_logits
    monkeypatch.setattr(forward, "padding_free_logits", lambda *a: calls.append(1) or real(*a))
    free = logprobs_and_grads(lm, rollout, padding_free=True)
    assert calls, "the padding-free forward did not run"
    padded = logprobs_and_grads(lm, rollout, padding_free=False)
    assert len(calls) == 1
    torch.testing.assert_close(free[0], padded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(free[1], padded[1], rtol=1e-5, atol=1e-5)
    assert free[2].keys() == padded[2].keys() and len(padded[2]) > 0
    for name, grad in padded[2].items():
        assert_close_to_scale(free[2][name], grad, name)
    # The model's own attention is back as it was: generation and padded forwards use it.
    assert lm.config._attn_implementation == "sdpa"


def test_padding_free_values_and_gradients_equal_the_padded_forward(scalar, padded_rollout):
    rollout = padded_rollout(scalar.config.vocab_size, seed=1)
    mask = rollout.response_mask
    results = []
    for padding_free in (True, False):
        scalar.zero_grad()
        values = response_values(scalar, rollout, padding_free)
        (values * mask).pow(2).sum().backward()
        results.append((values.detach() * mask, {n: p.grad.clone() for n, p in scalar.named_parameters()
                                                 if p.grad is not None}))
    (free, free_grads), (padded, padded_grads) = results
    torch.testing.assert_close(free, padded, rtol=1e-5, atol=1e-5)
    assert free_grads.keys() == padded_grads.keys() and len(padded_grads) > 0
    for name, grad in padded_grads.items():
        assert_close_to_scale(free_grads[name], grad, name)


def test_padding_free_reward_scores_equal_the_padded_forward(scalar, padded_rollout):
    rollout = padded_rollout(scalar.config.vocab_size, rows=6, seed=2)
    with torch.no_grad():
        free, padded = response_scores(scalar, rollout, True), response_scores(scalar, rollout, False)
    assert free.shape == (6,)
    torch.testing.assert_close(free, padded, rtol=1e-5, atol=1e-5)
    assert float(padded.std()) > 0  # the rows' scores differ: each was read at its own last token


def test_padding_free_only_where_it_pays_and_the_attention_takes_it(lm, monkeypatch, padded_rollout):
    rollout = padded_rollout(lm.config.vocab_size)
    assert padding_free_rows(lm, rollout, enabled=True) is not None
    assert padding_free_rows(lm, rollout, enabled=False) is None
    full = rollout.select(torch.tensor([1]))  # one row: nothing to gain
    assert padding_free_rows(lm, full, enabled=True) is None
    unpadded = rollout.select(torch.tensor([1, 1]))  # no padding
    assert padding_free_rows(lm, unpadded, enabled=True) is None
    monkeypatch.setattr(lm.config, "_attn_implementation", "eager")  # no lengths read: the padded rows
    assert not takes_segments(lm.config)
    assert padding_free_rows(lm, rollout, enabled=True) is None


def test_a_padding_free_forward_builds_no_mask_over_the_packed_row(lm, rollout_of):
    """transformers would build the packed row's (tokens x tokens) block-diagonal mask, which
    the examples' lengths make useless (1 GiB at 32k tokens); the switched attention builds
    none, so the largest tensor of the forward stays far below tokens² bytes."""
    from rlhf.logging.perf import LargestTensor

    prompt, response = 500, 4
    generator = torch.Generator().manual_seed(3)
    sequences = torch.randint(3, lm.config.vocab_size, (3, prompt + response), generator=generator)
    mask = torch.ones_like(sequences)
    mask[1, :50] = 0
    mask[2, :100] = 0
    mask[2, prompt + 2 :] = 0
    rollout = rollout_of(sequences, mask, prompt)
    tokens = int(mask.sum())
    assert padding_free_rows(lm, rollout, enabled=True) is not None
    with torch.no_grad(), LargestTensor() as largest:
        free, _ = policy_logprobs(lm, rollout, 1.0, padding_free=True)
    assert largest.bytes < tokens * tokens // 2  # the mask: tokens² bytes
    with torch.no_grad():
        padded, _ = policy_logprobs(lm, rollout, 1.0, padding_free=False)
    response_mask = rollout.response_mask
    torch.testing.assert_close(free * response_mask, padded * response_mask, rtol=1e-5, atol=1e-5)


def test_checkpointed_layers_recompute_with_the_forwards_attention(tiny_model_dir, padded_rollout):
    """With gradient checkpointing, backward re-runs each layer's forward after the padding-free
    call has switched the attention back: it must attend per example as the forward did, or the
    packed row's examples would see each other and the gradients be silently wrong."""
    from rlhf.config_sections import ModelConfig
    from rlhf.models.loading import load_causal_lm

    checkpointed = load_causal_lm(ModelConfig(path=str(tiny_model_dir), gradient_checkpointing=True),
                                  torch.device("cpu"))
    checkpointed.train()  # transformers checkpoints only in training mode; the tiny model has no dropout
    assert checkpointed.is_gradient_checkpointing
    rollout = padded_rollout(checkpointed.config.vocab_size, seed=4)
    free = logprobs_and_grads(checkpointed, rollout, padding_free=True)
    padded = logprobs_and_grads(checkpointed, rollout, padding_free=False)
    torch.testing.assert_close(free[0], padded[0], rtol=1e-5, atol=1e-5)
    for name, grad in padded[2].items():
        assert_close_to_scale(free[2][name], grad, name)
