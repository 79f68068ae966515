import math

import pytest
import torch

from rlhf.algorithms.losses import LOSS_AGGREGATIONS, aggregate_loss, clipped_surrogate, loss_denominator

NAN = float("nan")


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


# Two rows: row 0 has 3 response tokens with losses 1, 2, 3; row 1 has 1 token with loss 4
# (its other slots are padding and may hold anything, nan included).
# T = 4 tokens, G = 2 sequences, C = 4 (e.g. max_new_tokens).
PER_TOKEN = [[1.0, 2.0, 3.0], [4.0, 10.0, NAN]]
MASK = [[1, 1, 1], [1, 0, 0]]
C = 4.0

# mode -> (denominator, loss, d loss / d per_token at the response tokens)
#   token_mean:              (1 + 2 + 3 + 4) / T = 10 / 4 = 2.5;          grad 1/4 everywhere
#   seq_mean_token_mean:     (6 / 3 + 4 / 1) / G = (2 + 4) / 2 = 3;       grad row 0: 1/(3*2) = 1/6, row 1: 1/(1*2) = 1/2
#   seq_mean_token_sum_norm: (1 + 2 + 3 + 4) / (G * C) = 10 / 8 = 1.25;   grad 1/8 everywhere
BY_HAND = {
    "token_mean": (4.0, 2.5, [[1 / 4, 1 / 4, 1 / 4], [1 / 4, 0.0, 0.0]]),
    "seq_mean_token_mean": (2.0, 3.0, [[1 / 6, 1 / 6, 1 / 6], [1 / 2, 0.0, 0.0]]),
    "seq_mean_token_sum_norm": (8.0, 1.25, [[1 / 8, 1 / 8, 1 / 8], [1 / 8, 0.0, 0.0]]),
}


def test_modes_are_the_three_of_dr_grpo():
    assert LOSS_AGGREGATIONS == ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
    assert set(BY_HAND) == set(LOSS_AGGREGATIONS)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_each_mode_by_hand(mode):
    denominator, expected, grad = BY_HAND[mode]
    mask = torch.tensor(MASK)
    assert loss_denominator(mask, mode, constant=C) == denominator
    per_token = f64(PER_TOKEN).requires_grad_()
    loss = aggregate_loss(per_token, mask, mode, denominator)
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    loss.backward()
    assert torch.allclose(per_token.grad, f64(grad))  # finite: the nan slot gets 0


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_micro_batches_with_the_whole_denominator_sum_to_the_whole_loss(mode):
    # Micro-batch A = row 0, micro-batch B = row 1 trimmed to its one response token (as a
    # worker would hold it). Each uses the whole mini-batch's denominator:
    #   token_mean:              6/4 + 4/4       = 2.5
    #   seq_mean_token_mean:     (6/3)/2 + (4/1)/2 = 1 + 2 = 3
    #   seq_mean_token_sum_norm: 6/8 + 4/8       = 1.25
    denominator, expected, grad = BY_HAND[mode]
    a = f64([PER_TOKEN[0]]).requires_grad_()
    b = f64([[PER_TOKEN[1][0]]]).requires_grad_()
    loss_a = aggregate_loss(a, torch.tensor([MASK[0]]), mode, denominator)
    loss_b = aggregate_loss(b, torch.tensor([[1]]), mode, denominator)
    assert math.isclose((loss_a + loss_b).item(), expected, rel_tol=1e-12)
    (loss_a + loss_b).backward()
    assert torch.allclose(a.grad, f64([grad[0]])) and torch.allclose(b.grad, f64([[grad[1][0]]]))
    # and the parts' own denominators add up to the whole one (workers all-reduce a sum)
    parts = loss_denominator(torch.tensor([MASK[0]]), mode, C) + loss_denominator(torch.tensor([[1]]), mode, C)
    assert parts == denominator


def test_per_micro_batch_means_would_not_be_the_token_mean():
    # The reason for the shared denominator: averaging each micro-batch's own token mean gives
    # (6/3 + 4/1) / 2 = 3, which weighs row 1's single token three times as much as a token
    # of row 0, instead of the token mean 2.5.
    own = [aggregate_loss(f64([PER_TOKEN[0]]), torch.tensor([MASK[0]]), "token_mean", 3.0),
           aggregate_loss(f64([[4.0]]), torch.tensor([[1]]), "token_mean", 1.0)]
    assert math.isclose(sum(x.item() for x in own) / 2, 3.0, rel_tol=1e-12)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_split_property_end_to_end_with_the_clipped_surrogate(mode):
    # Random 5-row batch with ragged response lengths, split into micro-batches of 2, 2 and 1
    # rows, each trimmed to its own longest response: summed losses and gradients must equal
    # the whole batch's.
    g = torch.Generator().manual_seed(0)
    lengths = [3, 6, 1, 5, 2]
    mask = (torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]).to(torch.float64)
    logp = (-torch.rand(5, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + torch.randn(5, 6, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(5, 6, generator=g, dtype=torch.float64)
    denominator = loss_denominator(mask, mode, constant=6.0)

    whole_per_token, _ = clipped_surrogate(logp, old, adv, mask)
    whole = aggregate_loss(whole_per_token, mask, mode, denominator)
    (whole_grad,) = torch.autograd.grad(whole, logp)

    total = 0.0
    for rows in (slice(0, 2), slice(2, 4), slice(4, 5)):
        width = int(mask[rows].sum(-1).max())
        part_mask = mask[rows, :width]
        per_token, _ = clipped_surrogate(logp[rows, :width], old[rows, :width], adv[rows, :width], part_mask)
        total = total + aggregate_loss(per_token, part_mask, mode, denominator)
    (split_grad,) = torch.autograd.grad(total, logp)
    assert torch.allclose(total, whole, rtol=1e-12, atol=0)
    assert torch.allclose(split_grad, whole_grad, rtol=1e-12, atol=1e-15)
    assert whole_grad.abs().sum() > 0


def test_denominator_edge_cases_and_errors():
    mask = torch.tensor(MASK)
    # the constant is required for Dr. GRPO's mode, and ignored by the others
    for bad in (None, 0.0, -1.0):
        with pytest.raises(ValueError, match="seq_mean_token_sum_norm needs a constant"):
            loss_denominator(mask, "seq_mean_token_sum_norm", constant=bad)
    assert loss_denominator(mask, "token_mean", constant=99.0) == 4.0
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"):
        loss_denominator(mask, "seq_sum")
    with pytest.raises(ValueError, match="valid modes"):
        aggregate_loss(f64(PER_TOKEN), mask, "sum", 1.0)
    with pytest.raises(ValueError, match="denominator must be > 0"):
        aggregate_loss(f64(PER_TOKEN), mask, "token_mean", 0.0)
    # a float mask counts the same as a bool one
    assert loss_denominator(mask.double(), "token_mean") == 4.0
    # a batch without response tokens: denominator 1 and loss 0, not nan
    empty = torch.zeros(2, 3)
    assert loss_denominator(empty, "token_mean") == 1.0
    for mode in LOSS_AGGREGATIONS:
        assert aggregate_loss(f64(PER_TOKEN), empty, mode, 1.0).item() == 0.0
