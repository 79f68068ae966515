import math

import pytest
import torch

from rlhf.algorithms.advantages import (
    broadcast_to_tokens,
    discounted_returns,
    group_stats,
    group_view,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    uniform_groups,
)
from rlhf.algorithms.rewards import shape_rewards

NAN = float("nan")


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- group_view


def test_group_view_rows_are_consecutive_samples():
    # sample i belongs to group i // 2
    g = group_view(torch.arange(6.0), 2)
    assert torch.equal(g, torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]))


def test_group_view_rejects_partial_groups_and_bad_shapes():
    with pytest.raises(ValueError, match="multiple of group_size=2"):
        group_view(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_view(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="positive int"):
        group_view(torch.zeros(4), 0)


# ---------------------------------------------------------------- GRPO


def test_grpo_groups_of_two():
    # groups [1, 0] and [0, 1]: mean 0.5, deviations +-0.5,
    # Bessel var = (0.25 + 0.25) / 1 = 0.5, std = sqrt(0.5) = 0.70711
    # A = +-0.5 / 0.70711 = +-0.70711
    a = 0.5 / math.sqrt(0.5)
    out = grpo_advantages(_t([1, 0, 0, 1]), 2, eps=0.0)
    assert torch.allclose(out, _t([a, -a, -a, a]))


def test_grpo_one_group_of_four():
    # group [1, 0, 0, 1]: mean 0.5, Bessel var = (4 * 0.25) / 3 = 1/3, std = 0.57735
    # A = +-0.5 / 0.57735 = +-0.86603
    a = 0.5 / math.sqrt(1 / 3)
    out = grpo_advantages(_t([1, 0, 0, 1]), 4, eps=0.0)
    assert torch.allclose(out, _t([a, -a, -a, a]))


def test_grpo_default_eps_is_added_to_the_std():
    # 0.5 / (0.70711 + 1e-6)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    out = grpo_advantages(_t([1, 0]), 2)
    assert torch.allclose(out, _t([a, -a]), rtol=1e-12, atol=0)


def test_grpo_uniform_group_is_exactly_zero_not_nan():
    # groups [3, 1, 2] (mean 2, Bessel var (1 + 1 + 0)/2 = 1, A = [1, -1, 0]) and [5, 5, 5]
    # (0 / 0 with eps = 0 unless handled)
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0, 5.0])
    for eps in (0.0, 1e-6):
        out = grpo_advantages(scores, 3, eps=eps)
        assert not torch.isnan(out).any()
        assert torch.allclose(out[:3], torch.tensor([1.0, -1.0, 0.0]), atol=1e-5)
        assert torch.equal(out[3:], torch.zeros(3))


def test_grpo_uniform_group_rounding_noise_is_not_amplified():
    # float32, seven copies of 0.1: the mean is one ulp off, r - mean = -7.45e-9 on each,
    # the std of equal deviations is 0, and -7.45e-9 / (0 + 1e-6) = -0.00745 if computed
    # naively. The group is uniform: its advantage is exactly 0.
    scores = torch.full((7,), 0.1)
    assert (scores - scores.mean()).abs().max() > 0  # the noise this test is about
    assert torch.equal(grpo_advantages(scores, 7), torch.zeros(7))
    assert torch.equal(grpo_advantages(scores, 7, scale=False), torch.zeros(7))
    assert torch.equal(rloo_advantages(scores, 7), torch.zeros(7))


def test_grpo_group_of_one_is_zero():
    # torch.std of one element is nan; the advantage is 0
    out = grpo_advantages(torch.tensor([0.7, -2.0]), 1)
    assert torch.equal(out, torch.zeros(2))


def test_dr_grpo_only_centres():
    # Liu et al. 2025: r - mean, no division.
    # [3, 1, 2] - 2 = [1, -1, 0]; [4, 0, 0, ...] in groups of 3: [4, 0, 2] - 2 = [2, -2, 0]
    out = grpo_advantages(_t([3, 1, 2, 4, 0, 2]), 3, scale=False)
    assert torch.allclose(out, _t([1, -1, 0, 2, -2, 0]))
    # with scale: the second group has Bessel std sqrt((4 + 4 + 0) / 2) = 2 -> [1, -1, 0]
    out = grpo_advantages(_t([3, 1, 2, 4, 0, 2]), 3, eps=0.0)
    assert torch.allclose(out, _t([1, -1, 0, 1, -1, 0]))


def test_grpo_upcasts_and_carries_no_gradient():
    scores = torch.tensor([1.0, 0.0], dtype=torch.bfloat16, requires_grad=True)
    out = grpo_advantages(scores, 2)
    assert out.dtype == torch.float32 and not out.requires_grad
    # integer rewards (e.g. 0/1 correctness) work too
    assert grpo_advantages(torch.tensor([1, 0, 0, 1]), 2).dtype == torch.float32


# ---------------------------------------------------------------- RLOO


def test_rloo_leave_one_out_by_hand():
    # group [3, 1, 2]: r_i - mean of the other two
    #   3 - (1 + 2)/2 = 1.5,  1 - (3 + 2)/2 = -1.5,  2 - (3 + 1)/2 = 0
    # = n/(n-1) * (r - mean) = 1.5 * [1, -1, 0]
    # group [1, 0, 0] (mean 1/3): 1 - 0 = 1, 0 - (1 + 0)/2 = -0.5, -0.5
    # = 1.5 * [2/3, -1/3, -1/3]
    out = rloo_advantages(_t([3, 1, 2, 1, 0, 0]), 3)
    assert torch.allclose(out, _t([1.5, -1.5, 0, 1, -0.5, -0.5]))


def test_rloo_equals_scaled_dr_grpo():
    # [1, 0, 0, 1], n = 4: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3 = 4/3 * (+-0.5)
    out = rloo_advantages(_t([1, 0, 0, 1]), 4)
    assert torch.allclose(out, _t([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, generator=g, dtype=torch.float64)
    for n in (2, 3, 4, 6):
        dr_grpo = grpo_advantages(scores, n, scale=False)
        assert torch.allclose(rloo_advantages(scores, n), n / (n - 1) * dr_grpo)


def test_rloo_uniform_group_is_zero_and_needs_two_samples():
    assert torch.equal(rloo_advantages(torch.tensor([0.1, 0.1, 0.1]), 3), torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="multiple"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


# ---------------------------------------------------------------- broadcast


def test_broadcast_to_tokens_fills_response_only():
    # row 0 has 2 response tokens, row 1 has 1; padding slots get 0
    adv = _t([0.5, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(broadcast_to_tokens(adv, mask), _t([[0.5, 0.5, 0], [-1, 0, 0]]))
    assert torch.equal(broadcast_to_tokens(adv, mask.bool()), broadcast_to_tokens(adv, mask.float()))


def test_broadcast_to_tokens_shape_mismatch_raises():
    with pytest.raises(ValueError):
        broadcast_to_tokens(torch.zeros(3), torch.ones(2, 4))
    with pytest.raises(ValueError):
        broadcast_to_tokens(torch.zeros(2, 1), torch.ones(2, 4))


# ---------------------------------------------------------------- discounted returns

# Ragged batch: row 0 has 3 response tokens, row 1 has 1; off-mask slots hold
# junk (99, nan) that must not leak in.
REWARDS = _t([[0.5, -0.1, 1.0, 99.0], [2.0, NAN, 99.0, 99.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_discounted_returns_gamma_one():
    # row 0: G_2 = 1.0, G_1 = -0.1 + 1.0 = 0.9, G_0 = 0.5 + 0.9 = 1.4; row 1: G_0 = 2.0
    out = discounted_returns(REWARDS, MASK)
    assert torch.allclose(out, _t([[1.4, 0.9, 1.0, 0], [2.0, 0, 0, 0]]))


def test_discounted_returns_gamma_half():
    # row 0: G_2 = 1.0, G_1 = -0.1 + 0.5 * 1.0 = 0.4, G_0 = 0.5 + 0.5 * 0.4 = 0.7; row 1: 2.0
    out = discounted_returns(REWARDS, MASK, gamma=0.5)
    assert torch.allclose(out, _t([[0.7, 0.4, 1.0, 0], [2.0, 0, 0, 0]]))


def test_discounted_returns_of_shaped_rewards():
    # shape_rewards: score 1.0 on the last response token, -0.1 * kl on each one.
    # kl = [0.2, 0.4, 0.6] -> rewards [-0.02, -0.04, 1.0 - 0.06 = 0.94]
    # G (gamma 1) = [0.88, 0.90, 0.94]
    rewards = shape_rewards(_t([1.0]), _t([[0.2, 0.4, 0.6, 0.0]]), torch.tensor([[1, 1, 1, 0]]), 0.1)
    out = discounted_returns(rewards, torch.tensor([[1, 1, 1, 0]]))
    assert torch.allclose(out, _t([[0.88, 0.90, 0.94, 0.0]]))


def test_discounted_returns_upcasts_and_checks_shapes():
    out = discounted_returns(torch.ones(1, 2, dtype=torch.bfloat16), torch.ones(1, 2))
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([[2.0, 1.0]]))
    with pytest.raises(ValueError):
        discounted_returns(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError):
        discounted_returns(torch.zeros(3), torch.ones(3))


# ---------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_whitens_over_the_batch_ignoring_padding():
    # row 0: rewards [1, 1, 1] -> G = [3, 2, 1]; row 1: reward [2] -> G = [2].
    # Padding holds 100 (and its return would be 0) -- neither may count.
    # Kept returns 3, 2, 1, 2: mean 2, deviations 1, 0, -1, 0,
    # Bessel var = 2 / 3, std = 0.81650 -> A = +-1 / 0.81650 = +-1.22474.
    # (Whitening row 0 alone would give +-1: the statistics are the batch's.)
    rewards = _t([[1, 1, 1, 100], [2, 100, 100, 100]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    a = 1 / math.sqrt(2 / 3)
    out = reinforce_pp_advantages(rewards, mask)
    assert torch.allclose(out, _t([[a, 0, -a, 0], [0, 0, 0, 0]]))


def test_reinforce_pp_gamma_is_passed_through():
    # gamma 0.5: G = [1 + 0.5 * 1.5, 1 + 0.5 * 1, 1] = [1.75, 1.5, 1], and [2]
    # mean (1.75 + 1.5 + 1 + 2) / 4 = 1.5625; deviations 0.1875, -0.0625, -0.5625, 0.4375
    # squares sum 0.03515625 + 0.00390625 + 0.31640625 + 0.19140625 = 0.546875
    # Bessel var 0.546875 / 3 = 0.18229, std 0.42696
    rewards = _t([[1, 1, 1, 100], [2, 100, 100, 100]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    s = math.sqrt(0.546875 / 3)
    want = _t([[0.1875 / s, -0.0625 / s, -0.5625 / s, 0], [0.4375 / s, 0, 0, 0]])
    assert torch.allclose(reinforce_pp_advantages(rewards, mask, gamma=0.5), want)


# ---------------------------------------------------------------- uniform groups and stats


def test_uniform_groups_exact_and_with_tolerance():
    # groups [1, 1], [1, 1.05], [0, 1]; spreads 0, 0.05, 1
    scores = _t([1, 1, 1, 1.05, 0, 1])
    assert torch.equal(uniform_groups(scores, 2), torch.tensor([True, False, False]))
    assert torch.equal(uniform_groups(scores, 2, atol=0.1), torch.tensor([True, True, False]))
    with pytest.raises(ValueError):
        uniform_groups(scores, 4)


def test_uniform_groups_are_the_zero_advantage_groups():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.2])
    uniform = uniform_groups(scores, 2).repeat_interleave(2)
    assert torch.equal(uniform, torch.tensor([True, True, False, False, True, True, False, False]))
    for adv in (grpo_advantages(scores, 2), rloo_advantages(scores, 2)):
        assert torch.equal(adv[uniform], torch.zeros(4))
        assert (adv[~uniform] != 0).all()


def test_group_stats_by_hand():
    # groups [1, 0], [0, 1], [1, 1]: Bessel stds sqrt(0.5), sqrt(0.5), 0
    # mean = 2 * 0.70711 / 3 = 0.47140; one uniform group of three -> 1/3
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], requires_grad=True)
    stats = group_stats(scores, 2)
    assert set(stats) == {"group_reward_std_mean", "uniform_group_share"}
    assert torch.allclose(stats["group_reward_std_mean"], torch.tensor(2 * math.sqrt(0.5) / 3))
    assert torch.allclose(stats["uniform_group_share"], torch.tensor(1 / 3))
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_group_stats_of_groups_of_one_and_empty_batch_are_finite():
    # a group of one has std 0 and is uniform
    stats = group_stats(torch.tensor([0.3, 0.9]), 1)
    assert stats["group_reward_std_mean"] == 0 and stats["uniform_group_share"] == 1
    stats = group_stats(torch.zeros(0), 4)
    assert all(v == 0 for v in stats.values())


def test_package_exports():
    import rlhf.algorithms as alg

    for name in (
        "group_view",
        "grpo_advantages",
        "rloo_advantages",
        "broadcast_to_tokens",
        "discounted_returns",
        "reinforce_pp_advantages",
        "uniform_groups",
        "group_stats",
    ):
        assert name in alg.__all__ and callable(getattr(alg, name))
