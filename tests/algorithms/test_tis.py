"""Truncated importance sampling and the sampler/trainer log-prob gap, by hand."""

import math

import pytest
import torch

from rlhf.algorithms.tis import logprob_gap, truncated_is_weights
from rlhf.roles.update import PolicyLossSettings, actor_loss
from rlhf.rollout.types import Experience, Rollout

LOG = math.log
# Row 0: π_old / π_vLLM = 0.5/0.25 = 2, 0.2/0.4 = 0.5, and a masked 9 (-> 0).
# Row 1: 0.9/0.1 = 9 (over the cap of 3: truncated to 3), 0.3/0.3 = 1, masked.
OLD = torch.tensor([[LOG(0.5), LOG(0.2), LOG(0.9)], [LOG(0.9), LOG(0.3), LOG(0.5)]], dtype=torch.float64)
SAMPLER = torch.tensor([[LOG(0.25), LOG(0.4), LOG(0.1)], [LOG(0.1), LOG(0.3), LOG(0.5)]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)


def test_weights_are_the_probability_ratio_capped_and_masked():
    weights, stats = truncated_is_weights(OLD.clone().requires_grad_(), SAMPLER, MASK, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 0.0], [3.0, 1.0, 0.0]], dtype=torch.float64))
    assert not weights.requires_grad  # a constant of the loss
    assert float(stats["tis_weight"]) == pytest.approx((2 + 0.5 + 3 + 1) / 4)
    assert float(stats["tis_truncated_frac"]) == pytest.approx(1 / 4)


def test_a_huge_ratio_off_the_mask_is_zero_not_nan():
    old = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    sampler = torch.tensor([[0.0, -1000.0]], dtype=torch.float64)  # exp(1000) would be inf
    weights, _ = truncated_is_weights(old, sampler, torch.tensor([[1.0, 0.0]], dtype=torch.float64), cap=2.0)
    assert weights.tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(old, sampler, torch.ones_like(old), cap=0.5)


def test_logprob_gap_is_the_masked_mean_absolute_difference():
    # |log .5 - log .25| = ln 2, |log .2 - log .4| = ln 2, |log .9 - log .1| = ln 9, |0| = 0
    assert float(logprob_gap(OLD, SAMPLER, MASK)) == pytest.approx((LOG(2) + LOG(2) + LOG(9) + 0) / 4)


def test_actor_loss_weights_each_tokens_surrogate():
    # Current = old log-probs: ratio 1, the surrogate of every token is -A = -1; TIS makes it -w,
    # so the token mean is -(2 + 0.5 + 3 + 1) / 4 = -1.625 instead of -1.
    rollout = Rollout(torch.zeros((2, 4), dtype=torch.long), torch.ones((2, 4), dtype=torch.long), 1, MASK,
                      torch.zeros(2, dtype=torch.bool), logprobs=SAMPLER)
    zeros = torch.zeros_like(OLD)
    part = Experience(rollout, OLD, OLD, zeros, zeros, torch.ones_like(OLD), zeros, torch.zeros(2))
    plain, _ = actor_loss(OLD, None, part, 0.0, PolicyLossSettings(), denominator=4.0)
    corrected, stats = actor_loss(OLD, None, part, 0.0, PolicyLossSettings(tis_cap=3.0), denominator=4.0)
    assert float(plain) == pytest.approx(-1.0)
    assert float(corrected) == pytest.approx(-1.625)
    assert float(stats["tis_weight"]) == pytest.approx(1.625)
