import math

import pytest
import torch

from rlhf.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate

# log r = logp - ref = [0.5, -1.0, 0.0]
LOGP = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)


def test_k1_is_log_ratio():
    assert torch.allclose(kl_estimate(LOGP, REF, "k1"), torch.tensor([[0.5, -1.0, 0.0]], dtype=torch.float64))


def test_k2_is_half_squared_log_ratio():
    # 0.5 * 0.25, 0.5 * 1, 0
    assert torch.allclose(kl_estimate(LOGP, REF, "k2"), torch.tensor([[0.125, 0.5, 0.0]], dtype=torch.float64))


def test_k3_by_hand():
    # exp(ref - logp) - 1 - (ref - logp):
    #   ref - logp = -0.5: e^-0.5 - 1 + 0.5 = 0.60653066 - 0.5 = 0.10653066
    #   ref - logp =  1.0: e^1 - 1 - 1     = 0.71828183
    #   ref - logp =  0.0: 0
    expected = torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(kl_estimate(LOGP, REF, "k3"), expected)
    assert math.isclose(expected[0, 0].item(), 0.10653066, rel_tol=1e-6)


def test_k1_and_k3_are_unbiased_k2_is_not():
    # Exact expectation over a 3-token vocabulary instead of sampling:
    # sum_x p(x) k(x) must equal KL(p || q) = sum_x p log(p / q) for k1 and k3.
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    kl = (p * (p / q).log()).sum()
    for name in ("k1", "k3"):
        est = (p * kl_estimate(p.log(), q.log(), name)).sum()
        assert torch.allclose(est, kl), name
    k2 = (p * kl_estimate(p.log(), q.log(), "k2")).sum()
    assert not torch.allclose(k2, kl)


def test_unknown_estimator_lists_valid_ones():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(LOGP, REF, "k4")


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_in_range():
    # error = 7/6 - 1 = 0.1666..; beta = 0.1 * (1 + 0.1666.. * 256 / 10000) = 0.1 * 1.00426667
    ctl = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10000)
    ctl.update(current_kl=7.0, n_steps=256)
    assert math.isclose(ctl.value, 0.1 * (1 + (1 / 6) * 256 / 10000), rel_tol=1e-12)
    assert math.isclose(ctl.value, 0.100426667, rel_tol=1e-8)


def test_adaptive_controller_clipped_both_ways():
    # KL 12 -> error 1.0 clipped to 0.2: beta = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    up = AdaptiveKLController(0.1, 6.0, 10000)
    up.update(12.0, 256)
    assert math.isclose(up.value, 0.100512, rel_tol=1e-12)
    # KL 0 -> error -1.0 clipped to -0.2: beta = 0.1 * (1 - 0.00512) = 0.099488
    down = AdaptiveKLController(0.1, 6.0, 10000)
    down.update(0.0, 256)
    assert math.isclose(down.value, 0.099488, rel_tol=1e-12)


def test_adaptive_controller_compounds_and_round_trips():
    ctl = AdaptiveKLController(0.2, 1.0, 100)
    ctl.update(1.1, 10)  # error 0.1: 0.2 * 1.01  = 0.202
    ctl.update(2.0, 10)  # clipped 0.2: 0.202 * 1.02 = 0.20604
    assert math.isclose(ctl.value, 0.20604, rel_tol=1e-12)
    state = ctl.state_dict()
    assert all(type(v) is float for v in state.values())
    restored = AdaptiveKLController(0.2, 1.0, 100)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    restored.update(1.1, 10)
    ctl.update(1.1, 10)
    assert restored.value == ctl.value


def test_adaptive_controller_rejects_bad_config():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 100)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 1.0, 0)


def test_gradient_of_each_estimator_as_a_loss():
    # A categorical policy pi = softmax(theta) over 4 tokens and a fixed reference. Used as a
    # loss on tokens y ~ pi, an estimator contributes E_{y~pi}[grad_theta k(y)], computed
    # exactly here as sum_y pi(y) * grad_theta k(y) with pi(y) a constant weight:
    #   k1: grad log pi(y)                 -> sum_y grad pi(y) = grad 1 = 0
    #   k2: log r(y) grad log pi(y)        -> grad KL(pi || ref)
    #   k3: (1 - ref/pi)(y) grad log pi(y) -> -sum_y ref(y) grad log pi(y) = grad KL(ref || pi)
    theta = torch.tensor([0.3, -1.2, 0.8, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)

    def expected_grad(name):
        logp = torch.log_softmax(theta, -1)
        weights = logp.detach().exp()
        (grad,) = torch.autograd.grad((weights * kl_estimate(logp, ref.log(), name)).sum(), theta)
        return grad

    def grad_of(divergence):
        (grad,) = torch.autograd.grad(divergence(torch.log_softmax(theta, -1)), theta)
        return grad

    forward_kl = grad_of(lambda logp: (logp.exp() * (logp - ref.log())).sum())  # KL(pi || ref)
    reverse_kl = grad_of(lambda logp: (ref * (ref.log() - logp)).sum())  # KL(ref || pi)
    assert torch.allclose(expected_grad("k1"), torch.zeros(4, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(expected_grad("k2"), forward_kl, rtol=1e-12, atol=1e-15)
    assert torch.allclose(expected_grad("k3"), reverse_kl, rtol=1e-12, atol=1e-15)
    # the two KL gradients differ here, so the k2 / k3 checks tell them apart
    assert not torch.allclose(forward_kl, reverse_kl, atol=1e-3)
    # with softmax logits, grad_theta KL(ref || pi) = pi - ref (the cross-entropy gradient)
    assert torch.allclose(reverse_kl, torch.softmax(theta.detach(), -1) - ref, atol=1e-15)
