import math

import pytest
import torch

from rlhf.algorithms.losses import (
    entropy_from_logits,
    explained_variance,
    kwise_ranking_loss,
    pairwise_ranking_loss,
    ppo_policy_loss,
    ptx_loss,
    sft_loss,
    token_logprobs,
    value_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def softplus(x: float) -> float:
    # -log sigmoid(d) = softplus(-d) = log(1 + e^-d)
    return math.log1p(math.exp(x))


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- SFT / log-probs


def test_token_logprobs_by_hand_and_temperature():
    logits = f64([[[0.0, LN2, 0.0]]])  # softmax = [1, 2, 1] / 4
    tokens = torch.tensor([[1]])
    assert torch.allclose(token_logprobs(logits, tokens), f64([[math.log(0.5)]]))
    # T = 2: exp(logits / 2) = [1, sqrt 2, 1] -> p = sqrt2 / (2 + sqrt2) = 0.41421356
    assert torch.allclose(token_logprobs(logits, tokens, temperature=2.0), f64([[math.log(0.41421356237)]]))


def test_token_logprobs_bf16_is_upcast_and_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 4, 50, generator=g) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (3, 4), generator=g)
    out = token_logprobs(logits, tokens, temperature=0.7)
    ref = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_sft_loss_shift_and_ignore_index():
    # logits[:, 0] predicts labels[:, 1] = 1 with softmax [1, 2, 1] / 4 -> -log 0.5 = ln 2
    # logits[:, 1] predicts labels[:, 2] = 0 with uniform logits        -> ln 3
    # logits[:, 2] has no next label and must be ignored (it holds garbage)
    logits = f64([[[0.0, LN2, 0.0], [0.0, 0.0, 0.0], [99.0, -99.0, 0.0]]])
    loss, n = sft_loss(logits, torch.tensor([[7, 1, 0]]))
    assert n.item() == 2
    assert math.isclose(loss.item(), (LN2 + LN3) / 2, rel_tol=1e-6)  # 0.89587973
    # masking the second target leaves only ln 2
    loss, n = sft_loss(logits, torch.tensor([[7, 1, -100]]))
    assert n.item() == 1
    assert math.isclose(loss.item(), LN2, rel_tol=1e-6)


def test_sft_loss_all_ignored_is_zero_with_graph():
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    loss, n = sft_loss(logits, torch.full((1, 3), -100))
    assert n.item() == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_ptx_loss_is_sft_loss():
    assert ptx_loss is sft_loss


# ---------------------------------------------------------------- reward model


def test_pairwise_ranking_loss_by_hand():
    # d = r_w - r_l = [1, -1]; -log sigmoid(1) = 0.31326169, -log sigmoid(-1) = 1.31326169
    loss, stats = pairwise_ranking_loss(f64([2.0, 0.5]), f64([1.0, 1.5]))
    assert math.isclose(loss.item(), 0.81326169, rel_tol=1e-7)
    assert stats["accuracy"].item() == 0.5
    assert stats["reward_margin"].item() == 0.0
    # margin 0.5: d - m = [0.5, -1.5] -> (0.47407698 + 1.70141328) / 2 = 1.08774513
    loss, _ = pairwise_ranking_loss(f64([2.0, 0.5]), f64([1.0, 1.5]), margin=0.5)
    assert math.isclose(loss.item(), 1.08774513, rel_tol=1e-7)
    loss_t, _ = pairwise_ranking_loss(f64([2.0, 0.5]), f64([1.0, 1.5]), margin=f64([0.5, 0.5]))
    assert math.isclose(loss_t.item(), loss.item(), rel_tol=1e-12)


def test_pairwise_gradient_pushes_chosen_up():
    chosen = f64([0.0]).requires_grad_()
    rejected = f64([0.0]).requires_grad_()
    pairwise_ranking_loss(chosen, rejected)[0].backward()
    # d/dr_w of -log sigmoid(r_w - r_l) at 0 = -(1 - sigmoid(0)) = -0.5
    assert chosen.grad.item() == -0.5 and rejected.grad.item() == 0.5


# Four answers with scores s = [3, 1, 0, 2], labelled ranking 0 > 1 > 2 > 3.
# The C(4,2) = 6 pairs (better, worse) and d = s_better - s_worse:
#   (0,1) 2   (0,2) 3   (0,3) 1   (1,2) 1   (1,3) -1   (2,3) -2
# loss = [sp(-2) + sp(-3) + sp(-1) + sp(-1) + sp(1) + sp(2)] / 6
#      = [0.12692801 + 0.04858735 + 2 * 0.31326169 + 1.31326169 + 2.12692801] / 6 = 0.70703807
SCORES4 = [3.0, 1.0, 0.0, 2.0]
PAIRS4 = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_kwise_k4_by_hand_equals_mean_of_pairwise():
    scores = f64(SCORES4)
    loss, stats = kwise_ranking_loss(scores, torch.tensor(PAIRS4), torch.zeros(6, dtype=torch.long), 1)
    assert math.isclose(loss.item(), 0.70703807, rel_tol=1e-7)
    idx = torch.tensor(PAIRS4)
    pair_loss, _ = pairwise_ranking_loss(scores[idx[:, 0]], scores[idx[:, 1]])
    assert math.isclose(loss.item(), pair_loss.item(), rel_tol=1e-12)
    assert math.isclose(stats["accuracy"].item(), 4 / 6, rel_tol=1e-12)
    # margins d: (2 + 3 + 1 + 1 - 1 - 2) / 6 = 4/6
    assert math.isclose(stats["reward_margin"].item(), 4 / 6, rel_tol=1e-12)
    assert stats["num_pairs"].item() == 6


def test_kwise_k4_with_tie_has_fewer_pairs():
    # Ranking 0 > {1 = 2} > 3: the tied pair (1,2) is not a comparison -> 5 pairs
    # loss = [sp(-2) + sp(-3) + sp(-1) + sp(1) + sp(2)] / 5
    #      = [0.12692801 + 0.04858735 + 0.31326169 + 1.31326169 + 2.12692801] / 5 = 0.78579335
    pairs = [p for p in PAIRS4 if p != (1, 2)]
    loss, stats = kwise_ranking_loss(f64(SCORES4), torch.tensor(pairs), torch.zeros(5, dtype=torch.long), 1)
    assert math.isclose(loss.item(), 0.78579335, rel_tol=1e-7)
    assert math.isclose(stats["accuracy"].item(), 3 / 5, rel_tol=1e-12)


def test_kwise_k4_with_per_pair_margins():
    # margins m = [1, 0, 0, 0, 0, 1] shift (0,1) to d - m = 1 and (2,3) to -3:
    # loss = [sp(-1) + sp(-3) + sp(-1) + sp(-1) + sp(1) + sp(3)] / 6
    #      = [3 * 0.31326169 + 0.04858735 + 1.31326169 + 3.04858735] / 6 = 0.89170358
    margins = f64([1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    loss, _ = kwise_ranking_loss(f64(SCORES4), torch.tensor(PAIRS4), torch.zeros(6, dtype=torch.long), 1, margins)
    expected = (3 * softplus(-1) + softplus(-3) + softplus(1) + softplus(3)) / 6
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    assert math.isclose(expected, 0.89170358, rel_tol=1e-7)


def test_kwise_prompts_with_different_k_weigh_equally():
    # Prompt 0: K = 2, answers 4 > 5 with scores [0, 0] -> one pair, loss ln 2 = 0.69314718
    # Prompt 1: the K = 4 example above, 6 pairs, loss 0.70703807
    # Equal weight: (0.69314718 + 0.70703807) / 2 = 0.70009263,
    # not the pair mean (0.69314718 + 6 * 0.70703807) / 7 = 0.70505366
    scores = f64(SCORES4 + [0.0, 0.0])
    pairs = torch.tensor(PAIRS4 + [(4, 5)])
    groups = torch.tensor([1] * 6 + [0])
    loss, stats = kwise_ranking_loss(scores, pairs, groups, num_groups=2)
    assert math.isclose(loss.item(), 0.70009263, rel_tol=1e-7)
    assert stats["num_pairs"].item() == 7


def test_kwise_k2_matches_pairwise_and_empty_group_is_skipped():
    # Three prompts, the middle one fully tied (no pairs): mean over prompts 0 and 2.
    chosen, rejected = f64([2.0, 0.5]), f64([1.0, 1.5])
    scores = torch.stack([chosen[0], rejected[0], chosen[1], rejected[1]])
    loss, _ = kwise_ranking_loss(scores, torch.tensor([(0, 1), (2, 3)]), torch.tensor([0, 2]), 3, margin=0.5)
    expected, _ = pairwise_ranking_loss(chosen, rejected, margin=0.5)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-12)


def test_kwise_center_coef_adds_mean_square_score():
    # mean(s^2) = (9 + 1 + 0 + 4) / 4 = 3.5; 0.01 * 3.5 = 0.035 on top of 0.70703807
    loss, _ = kwise_ranking_loss(
        f64(SCORES4), torch.tensor(PAIRS4), torch.zeros(6, dtype=torch.long), 1, center_coef=0.01
    )
    assert math.isclose(loss.item(), 0.70703807 + 0.035, rel_tol=1e-7)


def test_kwise_scores_each_answer_once_gradient_accumulates():
    scores = f64(SCORES4).requires_grad_()
    loss, _ = kwise_ranking_loss(scores, torch.tensor(PAIRS4), torch.zeros(6, dtype=torch.long), 1)
    loss.backward()
    # answer 0 is "better" in 3 pairs with d = 2, 3, 1: grad = -(1/6) sum sigmoid(-d)
    expected = -sum(1 / (1 + math.exp(d)) for d in (2, 3, 1)) / 6
    assert math.isclose(scores.grad[0].item(), expected, rel_tol=1e-12)
    # differences only: the gradient sums to zero without centring
    assert abs(scores.grad.sum().item()) < 1e-12


# ---------------------------------------------------------------- PPO policy

ONE = torch.ones(1, 1)


def _policy(ratio: float, adv: float, **kw):
    logp = f64([[math.log(ratio)]]).requires_grad_()
    loss, stats = ppo_policy_loss(logp, f64([[0.0]]), f64([[adv]]), ONE, **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


def test_ppo_positive_advantage_beyond_upper_edge_is_clipped():
    # A = 2, ratio 1.5 > 1.2: max(-2 * 1.5, -2 * 1.2) = max(-3, -2.4) = -2.4, clipped term wins
    loss, grad, stats = _policy(1.5, 2.0)
    assert math.isclose(loss, -2.4, rel_tol=1e-12)
    assert grad == 0.0
    assert stats["clip_frac"].item() == 1.0
    # approx_kl is k3 of KL(old || new): (r - 1) - log r = 0.5 - 0.40546511 = 0.09453489
    assert math.isclose(stats["approx_kl"].item(), 0.5 - math.log(1.5), rel_tol=1e-9)
    assert math.isclose(stats["ratio_mean"].item(), 1.5, rel_tol=1e-9)


def test_ppo_positive_advantage_below_lower_edge_is_not_clipped():
    # A = 2, ratio 0.5 < 0.8: max(-1.0, -1.6) = -1.0, unclipped term wins (pessimistic)
    # d/dlogp of -A * exp(logp - old) = -A * ratio = -1.0
    loss, grad, stats = _policy(0.5, 2.0)
    assert math.isclose(loss, -1.0, rel_tol=1e-12)
    assert math.isclose(grad, -1.0, rel_tol=1e-12)
    assert stats["clip_frac"].item() == 0.0


def test_ppo_negative_advantage_below_lower_edge_is_clipped():
    # A = -1, ratio 0.5: max(0.5, 0.8) = 0.8, clipped term wins, no gradient
    loss, grad, stats = _policy(0.5, -1.0)
    assert math.isclose(loss, 0.8, rel_tol=1e-12)
    assert grad == 0.0
    assert stats["clip_frac"].item() == 1.0


def test_ppo_negative_advantage_above_upper_edge_is_not_clipped():
    # A = -1, ratio 1.5: max(1.5, 1.2) = 1.5, unclipped, gradient -A * ratio = 1.5
    loss, grad, stats = _policy(1.5, -1.0)
    assert math.isclose(loss, 1.5, rel_tol=1e-12)
    assert math.isclose(grad, 1.5, rel_tol=1e-12)
    assert stats["clip_frac"].item() == 0.0


def test_ppo_at_the_clip_edge_both_terms_agree():
    # ratio exactly 1 + eps (up to rounding): both terms equal -A * 1.2 = -2.4 for A = 2
    # and -A * 0.8 = 0.8 at ratio 0.8 for A = -1
    assert math.isclose(_policy(1.2, 2.0)[0], -2.4, rel_tol=1e-9)
    assert math.isclose(_policy(0.8, -1.0)[0], 0.8, rel_tol=1e-9)


def test_ppo_inside_clip_range_is_plain_surrogate():
    # ratio 1.1, A = 3: loss -3.3, gradient -A * ratio = -3.3
    loss, grad, stats = _policy(1.1, 3.0)
    assert math.isclose(loss, -3.3, rel_tol=1e-12)
    assert math.isclose(grad, -3.3, rel_tol=1e-12)
    assert stats["clip_frac"].item() == 0.0


def test_ppo_dual_clip_caps_negative_advantage_loss():
    # A = -1, ratio 5, c = 3: standard loss max(5, 1.2) = 5, dual clip min(5, 3 * 1) = 3
    loss, grad, stats = _policy(5.0, -1.0, dual_clip=3.0)
    assert math.isclose(loss, 3.0, rel_tol=1e-12)
    assert grad == 0.0
    assert stats["dual_clip_frac"].item() == 1.0
    # positive advantages are untouched by the dual clip: A = 2, ratio 5 -> -2.4
    assert math.isclose(_policy(5.0, 2.0, dual_clip=3.0)[0], -2.4, rel_tol=1e-12)


def test_ppo_masked_mean_over_tokens_ignores_padding():
    # Row 0: tokens (ratio 1.5, A 2) -> -2.4 and (ratio 1, A 1) -> -1; row 1: (ratio 0.5, A -1) -> 0.8
    # Padding slots hold -inf log-probs and nan advantages.
    # token mean = (-2.4 - 1 + 0.8) / 3 = -0.86666667; clip_frac = 2 / 3
    ninf, nan = float("-inf"), float("nan")
    logp = f64([[math.log(1.5), 0.0, ninf], [math.log(0.5), ninf, ninf]]).requires_grad_()
    old = f64([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    adv = f64([[2.0, 1.0, nan], [-1.0, nan, nan]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask)
    assert math.isclose(loss.item(), -2.6 / 3, rel_tol=1e-12)
    assert math.isclose(stats["clip_frac"].item(), 2 / 3, rel_tol=1e-12)
    loss.backward()
    # only the unclipped token (ratio 1, A 1) gets gradient: -A * ratio / 3
    assert torch.allclose(logp.grad, f64([[0.0, -1 / 3, 0.0], [0.0, 0.0, 0.0]]))
    assert all(not v.requires_grad for v in stats.values())


# ---------------------------------------------------------------- value function


def _value(v: float, old: float, ret: float, clip_eps=0.2):
    values = f64([[v]]).requires_grad_()
    loss, stats = value_loss(values, f64([[old]]), f64([[ret]]), ONE, clip_eps=clip_eps)
    loss.backward()
    return loss.item(), values.grad.item(), stats["clip_frac"].item()


def test_value_loss_clipped_branch_active():
    # V = 1, V_old = 0.5, R = 2: V_clip = 0.5 + 0.2 = 0.7
    # (V - R)^2 = 1, (V_clip - R)^2 = 1.69 -> 0.5 * 1.69 = 0.845, no gradient
    assert _value(1.0, 0.5, 2.0) == pytest.approx((0.845, 0.0, 1.0))


def test_value_loss_unclipped_branch_active():
    # V = 1, V_old = 0.5, R = 0: (V - R)^2 = 1 > (0.7 - 0)^2 = 0.49 -> 0.5, grad V - R = 1
    assert _value(1.0, 0.5, 0.0) == pytest.approx((0.5, 1.0, 0.0))


def test_value_loss_inside_clip_range_and_disabled():
    # V = 0.6 within 0.5 +- 0.2: 0.5 * (0.6 - 2)^2 = 0.98, grad -1.4
    assert _value(0.6, 0.5, 2.0) == pytest.approx((0.98, -1.4, 0.0))
    # clip disabled: 0.5 * (1 - 2)^2 = 0.5, grad -1
    assert _value(1.0, 0.5, 2.0, clip_eps=None) == pytest.approx((0.5, -1.0, 0.0))


def test_value_loss_masked_mean():
    # kept tokens: 0.5 * (1 - 2)^2 = 0.5 and 0.5 * (0 - 2)^2 = 2 -> mean 1.25
    values = f64([[1.0, 0.0, 50.0]])
    loss, _ = value_loss(values, values, f64([[2.0, 2.0, -50.0]]), torch.tensor([[1, 1, 0]]), clip_eps=None)
    assert math.isclose(loss.item(), 1.25, rel_tol=1e-12)


# ---------------------------------------------------------------- diagnostics


def test_entropy_from_logits_by_hand():
    # uniform over 4 -> ln 4 = 1.38629436
    # softmax [1, 3] / 4 -> -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.56233514
    # -inf entries (top-k masked) contribute 0: [0, 0, -inf, -inf] -> ln 2
    logits = f64([[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, float("-inf"), float("-inf")], [0.0, 0.0, float("-inf"), float("-inf")]]])
    ent = entropy_from_logits(logits)
    assert torch.allclose(ent, f64([[math.log(4.0), 0.56233514, LN2]]))


def test_explained_variance_by_hand():
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    returns = f64([[1.0, 2.0, 3.0, 4.0, 100.0]])
    # perfect critic -> 1; constant prediction -> Var[R - c] = Var[R] -> 0
    assert explained_variance(returns, returns, mask).item() == 1.0
    assert abs(explained_variance(f64([[2.5] * 5]), returns, mask).item()) < 1e-12
    # V = [1, 2, 3, 3]: R - V = [0, 0, 0, 1], Var = 0.1875; Var[R] = 1.25 -> 1 - 0.15 = 0.85
    values = f64([[1.0, 2.0, 3.0, 3.0, -7.0]])
    assert math.isclose(explained_variance(values, returns, mask).item(), 0.85, rel_tol=1e-12)
    # constant returns: undefined
    assert math.isnan(explained_variance(values, f64([[1.0] * 5]), mask).item())
