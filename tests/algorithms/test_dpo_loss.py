"""DPO / IPO losses against hand-computed numbers (values, gradient signs, label smoothing)."""

import math

import pytest
import torch

from rlhf.algorithms import dpo_loss, per_prompt_mean


def _pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    policy_chosen = torch.tensor(policy_chosen, dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor(policy_rejected, dtype=torch.float64, requires_grad=True)
    return policy_chosen, policy_rejected, torch.tensor(ref_chosen, dtype=torch.float64), torch.tensor(
        ref_rejected, dtype=torch.float64)


def test_sigmoid_loss_rewards_and_gradient_by_hand():
    # h = (-10 - -11) - (-12 - -11) = 1 - (-1) = 2; beta h = 0.2
    # loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.818730753) = 0.598138869
    # d loss / d log pi(chosen) = -beta sigmoid(-0.2) = -0.1 * 0.450166003 = -0.0450166003
    pc, pr, rc, rr = _pairs([-10.0], [-12.0], [-11.0], [-11.0])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.598138869, abs=1e-9)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.0450166003, abs=1e-9)  # descent raises the chosen log-prob
    assert pr.grad.item() == pytest.approx(+0.0450166003, abs=1e-9)  # and lowers the rejected one
    # implicit rewards beta (log pi - log ref): 0.1 * 1 and 0.1 * -1
    assert stats["reward_chosen"].item() == pytest.approx(0.1)
    assert stats["reward_rejected"].item() == pytest.approx(-0.1)
    assert stats["margin"].item() == pytest.approx(0.2)
    assert stats["accuracy"].item() == 1.0
    assert not any(s.requires_grad for s in stats.values())


def test_policy_equal_to_the_reference_gives_log_2_and_no_accuracy():
    pc, pr, rc, rr = _pairs([-3.0, -7.0], [-5.0, -1.0], [-3.0, -7.0], [-5.0, -1.0])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.tolist() == pytest.approx([math.log(2)] * 2)
    assert stats["accuracy"].tolist() == [0.0, 0.0]  # a tie is not a correct ranking
    assert stats["margin"].tolist() == [0.0, 0.0]


def test_label_smoothing_is_conservative_dpo():
    # eps = 0.1: loss = 0.9 * (-log sigmoid(0.2)) + 0.1 * (-log sigmoid(-0.2))
    #                 = 0.9 * 0.598138869 + 0.1 * 0.798138869 = 0.618138869
    # gradient on log pi(chosen): beta * (-(1 - eps) sigmoid(-0.2) + eps sigmoid(0.2))
    #                           = 0.1 * (-0.9 * 0.450166003 + 0.1 * 0.549833997) = -0.0350166003
    pc, pr, rc, rr = _pairs([-10.0], [-12.0], [-11.0], [-11.0])
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.618138869, abs=1e-9)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.0350166003, abs=1e-9)
    # The gradient vanishes where sigmoid(beta h) = 1 - eps (beta h = log 9) and turns back beyond it.
    for h, sign in ((10 * math.log(9), 0), (30.0, 1)):
        pc, pr, rc, rr = _pairs([h], [0.0], [0.0], [0.0])
        dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)[0].sum().backward()
        if sign == 0:
            assert pc.grad.item() == pytest.approx(0.0, abs=1e-12)
        else:
            assert pc.grad.item() > 0  # a margin beyond what eps-noisy labels support is pulled back
    # Plain DPO keeps pushing there.
    pc, pr, rc, rr = _pairs([30.0], [0.0], [0.0], [0.0])
    dpo_loss(pc, pr, rc, rr, beta=0.1)[0].sum().backward()
    assert pc.grad.item() < 0


def test_ipo_is_a_squared_distance_to_half_over_beta():
    # beta = 0.1: target h = 1 / (2 beta) = 5.
    # h = 2: loss (2 - 5)^2 = 9, d/d log pi(chosen) = 2 (2 - 5) = -6 (raise the chosen answer)
    # h = 7: loss (7 - 5)^2 = 4, gradient +4 (the margin is pulled back to 5)
    pc, pr, rc, rr = _pairs([-10.0, -5.0], [-12.0, -12.0], [-11.0, -11.0], [-11.0, -11.0])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert loss.tolist() == pytest.approx([9.0, 4.0])
    loss.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-6.0, 4.0])
    assert pr.grad.tolist() == pytest.approx([6.0, -4.0])
    assert stats["margin"].tolist() == pytest.approx([0.2, 0.7])


def test_refusals():
    pc, pr, rc, rr = _pairs([-1.0], [-2.0], [-1.0], [-2.0])
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="must match"):
        dpo_loss(pc, torch.zeros(2), rc, rr, beta=0.1)


def test_per_prompt_mean_weighs_every_prompt_once():
    # Prompt 0 has three pairs (1, 2, 3): mean 2; prompt 1 none; prompt 2 one pair: 10.
    means, has_pairs = per_prompt_mean(torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([0, 0, 0, 2]), 3)
    assert means.tolist() == [2.0, 0.0, 10.0]
    assert has_pairs.tolist() == [True, False, True]
    # The loss over prompts: (2 + 10) / 2 = 6, not the pair mean (1 + 2 + 3 + 10) / 4 = 4.
    assert (means[has_pairs].sum() / has_pairs.sum()).item() == 6.0
