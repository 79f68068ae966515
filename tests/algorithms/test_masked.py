import math

import torch

from rlhf.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten

# Row 0 keeps 1, 2; row 1 keeps 4. Masked-out slots hold inf/nan on purpose:
# padding can contain anything and must not leak into the statistics.
X = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_ignores_padding():
    # 1 + 2 + 4 = 7
    assert masked_sum(X, MASK).item() == 7.0
    # per row: [1 + 2, 4]
    assert torch.equal(masked_sum(X, MASK, dim=1), torch.tensor([3.0, 4.0]))


def test_masked_mean_global_and_per_row():
    # (1 + 2 + 4) / 3 = 7/3, not a mean over the 6 slots
    assert math.isclose(masked_mean(X, MASK).item(), 7.0 / 3.0, rel_tol=1e-6)
    # row means: (1 + 2) / 2 = 1.5 and 4 / 1 = 4
    assert torch.allclose(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 4.0]))
    # over the batch dim: column 0 -> (1 + 4)/2, column 1 -> 2/1, column 2 -> empty -> 0
    assert torch.allclose(masked_mean(X, MASK.bool(), dim=0), torch.tensor([2.5, 2.0, 0.0]))


def test_masked_mean_float_and_bool_masks_agree():
    assert torch.equal(masked_mean(X, MASK.float()), masked_mean(X, MASK.bool()))


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    out = masked_mean(X, torch.zeros_like(MASK))
    assert out.item() == 0.0


def test_masked_mean_gradient_only_on_kept_positions():
    x = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    masked_mean(x, torch.tensor([[1, 0, 1]])).backward()
    # d/dx of (x0 + x2) / 2
    assert torch.equal(x.grad, torch.tensor([[0.5, 0.0, 0.5]]))


def test_masked_var_hand_values():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, -7.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # kept: 1, 3, 5; mean 3; squared deviations 4, 0, 4 -> sum 8
    # unbiased 8 / 2 = 4; biased 8 / 3
    assert math.isclose(masked_var(x, mask).item(), 4.0, rel_tol=1e-6)
    assert math.isclose(masked_var(x, mask, unbiased=False).item(), 8.0 / 3.0, rel_tol=1e-6)


def test_masked_var_single_element_is_zero():
    x = torch.tensor([[2.0, 9.0]])
    assert masked_var(x, torch.tensor([[1, 0]])).item() == 0.0


def test_masked_whiten_uses_masked_stats_and_zeros_padding():
    # Left prompt slot and right padding slot hold large values that would
    # change mean and variance if they were counted.
    x = torch.tensor([[50.0, 1.0, 3.0, 5.0, -80.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    # kept 1, 3, 5: mean 3, unbiased var 4, std 2 -> (x - 3) / 2 = -1, 0, 1
    out = masked_whiten(x, mask, eps=0.0)
    assert torch.allclose(out, torch.tensor([[0.0, -1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False keeps the mean: -1 + 3, 0 + 3, 1 + 3
    out = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    assert torch.allclose(out, torch.tensor([[0.0, 2.0, 3.0, 4.0, 0.0]]))


def test_masked_whiten_result_has_zero_mean_unit_variance_on_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g) * 5 + 3
    mask = torch.ones(4, 7)
    mask[:, :2] = 0  # prompt
    mask[1, 5:] = 0  # padding
    out = masked_whiten(x, mask)
    assert abs(masked_mean(out, mask).item()) < 1e-5
    assert abs(masked_var(out, mask).item() - 1.0) < 1e-4
    assert torch.all(out[mask == 0] == 0)


def test_masked_whiten_constant_input_is_finite():
    # var = 0: eps keeps the division finite, and the centred values are 0
    out = masked_whiten(torch.full((1, 3), 2.0), torch.ones(1, 3))
    assert torch.equal(out, torch.zeros(1, 3))
