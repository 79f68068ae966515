import math

import pytest
import torch

from rlhf.algorithms.gae import compute_gae

# 3-step toy episode, gamma = 0.9, lambda = 0.8 (gamma * lambda = 0.72).
# rewards r = [0.1, -0.2, 1.0], values V = [0.5, 0.4, 0.3], V after the end = 0.
#   delta_2 = 1.0  + 0.9 * 0   - 0.3 =  0.7
#   delta_1 = -0.2 + 0.9 * 0.3 - 0.4 = -0.33
#   delta_0 = 0.1  + 0.9 * 0.4 - 0.5 = -0.04
#   A_2 = 0.7
#   A_1 = -0.33 + 0.72 * 0.7   = 0.174
#   A_0 = -0.04 + 0.72 * 0.174 = 0.08528
#   R = A + V = [0.58528, 0.574, 1.0]
REWARDS = [0.1, -0.2, 1.0]
VALUES = [0.5, 0.4, 0.3]
ADV = [0.08528, 0.174, 0.7]
RET = [0.58528, 0.574, 1.0]


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_three_step_by_hand():
    adv, ret = compute_gae(_t([REWARDS]), _t([VALUES]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, _t([ADV]))
    assert torch.allclose(ret, _t([RET]))


def test_gae_lambda_one_is_monte_carlo_return():
    # lambda = 1: R_0 = 0.1 + 0.9 * (-0.2) + 0.81 * 1.0 = 0.73, R_1 = -0.2 + 0.9 = 0.7, R_2 = 1.0
    _, ret = compute_gae(_t([REWARDS]), _t([VALUES]), torch.ones(1, 3), gamma=0.9, lam=1.0)
    assert torch.allclose(ret, _t([[0.73, 0.7, 1.0]]))


def test_gae_lambda_zero_is_td_error():
    adv, _ = compute_gae(_t([REWARDS]), _t([VALUES]), torch.ones(1, 3), gamma=0.9, lam=0.0)
    assert torch.allclose(adv, _t([[-0.04, -0.33, 0.7]]))


def test_gae_left_prompt_and_right_padding_equal_unpadded():
    # Row 0: 2 prompt slots, the 3-step episode, 2 padding slots.
    # Row 1: no prompt, a 2-step episode (r = [0, 2], V = [1, 1]), 5 padding slots:
    #   delta_1 = 2 - 1 = 1, A_1 = 1; delta_0 = 0 + 0.9 * 1 - 1 = -0.1, A_0 = -0.1 + 0.72 = 0.62
    # Off-mask slots hold large rewards/values (and a nan) that must not matter,
    # in particular V at the first padding slot is not used as a bootstrap.
    g = 99.0
    rewards = _t([[g, g, *REWARDS, g, g], [0.0, 2.0, g, g, g, g, g]])
    values = _t([[g, g, *VALUES, g, float("nan")], [1.0, 1.0, g, g, g, g, g]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, _t([[0, 0, *ADV, 0, 0], [0.62, 1.0, 0, 0, 0, 0, 0]]))
    assert torch.allclose(ret, _t([[0, 0, *RET, 0, 0], [1.62, 2.0, 0, 0, 0, 0, 0]]))


def test_gae_interior_gap_is_skipped():
    # Mask [1, 0, 1, 1]: the off-mask slot is removed, so the result on the
    # kept slots equals the 3-step toy.
    rewards = _t([[REWARDS[0], 5.0, REWARDS[1], REWARDS[2]]])
    values = _t([[VALUES[0], 5.0, VALUES[1], VALUES[2]]])
    adv, _ = compute_gae(rewards, values, torch.tensor([[1, 0, 1, 1]]), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, _t([[ADV[0], 0.0, ADV[1], ADV[2]]]))


def test_gae_defaults_gamma_one():
    # gamma = 1, lambda = 0.95, r = [0, 1], V = [0.5, 0.5]:
    #   delta_1 = 1 - 0.5 = 0.5, A_1 = 0.5
    #   delta_0 = 0 + 0.5 - 0.5 = 0, A_0 = 0 + 0.95 * 0.5 = 0.475
    adv, _ = compute_gae(_t([[0.0, 1.0]]), _t([[0.5, 0.5]]), torch.ones(1, 2))
    assert torch.allclose(adv, _t([[0.475, 0.5]]))


def test_gae_outputs_carry_no_gradient_and_upcast_bf16():
    values = torch.tensor([[0.5, 0.25]], dtype=torch.bfloat16, requires_grad=True)
    adv, ret = compute_gae(torch.zeros(1, 2, dtype=torch.bfloat16), values, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad
    assert adv.dtype == torch.float32
    # A_1 = -0.25; A_0 = 0.25 - 0.5 + 0.95 * (-0.25) = -0.4875
    assert math.isclose(adv[0, 0].item(), -0.4875, rel_tol=1e-6)


def test_gae_shape_mismatch_raises():
    with pytest.raises(ValueError):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
