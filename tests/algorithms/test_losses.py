import math

import pytest
import torch

from rlhf.algorithms.losses import (
    aggregate_loss,
    clipped_surrogate,
    entropy_from_logits,
    explained_variance,
    kwise_ranking_loss,
    lm_nll,
    loss_denominator,
    token_logprobs,
    value_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def softplus(x: float) -> float:
    # -log sigmoid(d) = softplus(-d) = log(1 + e^-d)
    return math.log1p(math.exp(x))


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, **kw):
    """The token-mean policy loss as the actor computes it over a whole mini-batch."""
    per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, **kw)
    return aggregate_loss(per_token, mask, "token_mean", loss_denominator(mask, "token_mean")), stats


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


def test_lm_nll_sums_over_kept_targets_without_shift():
    # row 0 predicts target 1 with softmax [1, 2, 1] / 4 -> -log 0.5 = ln 2 = 0.69314718
    # row 1 predicts target 0 with uniform logits        -> ln 3 = 1.09861229
    # row 2 holds garbage and its target is ignored
    # sum = ln 2 + ln 3 = ln 6 = 1.79175947 (a sum: the caller divides by the global count)
    logits = f64([[0.0, LN2, 0.0], [0.0, 0.0, 0.0], [99.0, -99.0, 0.0]])
    nll, n = lm_nll(logits, torch.tensor([1, 0, -100]))
    assert n.dtype == torch.long and n.item() == 2
    assert math.isclose(nll.item(), 1.79175947, rel_tol=1e-8)
    # no shift inside: row i is scored against targets[i], so ignoring the second
    # target leaves ln 2 alone; a custom ignore_index works the same way
    nll, n = lm_nll(logits, torch.tensor([1, -100, -100]))
    assert n.item() == 1 and math.isclose(nll.item(), LN2, rel_tol=1e-12)
    nll, n = lm_nll(logits, torch.tensor([1, 7, 7]), ignore_index=7)
    assert n.item() == 1 and math.isclose(nll.item(), LN2, rel_tol=1e-12)


def test_lm_nll_gradient_is_softmax_minus_one_hot():
    # d/dz of -log softmax(z)[y] = softmax(z) - onehot(y): [1, 2, 1] / 4 - [0, 1, 0]
    logits = f64([[0.0, LN2, 0.0]]).requires_grad_()
    lm_nll(logits, torch.tensor([1]))[0].backward()
    assert torch.allclose(logits.grad, f64([[0.25, -0.5, 0.25]]))


def test_lm_nll_all_ignored_is_zero_with_graph():
    logits = torch.zeros(3, 4, requires_grad=True)
    nll, n = lm_nll(logits, torch.full((3,), -100))
    assert n.item() == 0 and nll.item() == 0.0
    nll.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # and an empty selection of positions
    empty = torch.zeros(0, 4, requires_grad=True)
    nll, n = lm_nll(empty, torch.zeros(0, dtype=torch.long))
    assert n.item() == 0 and nll.item() == 0.0


def test_lm_nll_bf16_logits_are_upcast():
    # logits [10, 0] with target 1: log(1 + e^10) = 10.00004540; [0, 0] with target 0: ln 2
    # sum = 10.69319258. Both logits rows are exact in bf16; a bf16 log-softmax would round
    # to a multiple of 1/16 near 10 (e.g. 10.0 and 10.6875), the float32 one keeps 1e-6.
    logits = torch.tensor([[10.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    nll, n = lm_nll(logits, torch.tensor([1, 0]))
    assert nll.dtype == torch.float32 and n.item() == 2
    assert math.isclose(nll.item(), 10.69319258, rel_tol=1e-6)
    nll.backward()
    assert logits.grad.dtype == torch.bfloat16
    # float32 logits stay float32, float64 stay float64
    assert lm_nll(logits.detach().float(), torch.tensor([1, 0]))[0].dtype == torch.float32
    assert lm_nll(logits.detach().double(), torch.tensor([1, 0]))[0].dtype == torch.float64


def test_lm_nll_rejects_unflattened_logits():
    # (batch, seq, vocab) logits are the caller's to align and flatten
    with pytest.raises(ValueError, match="must be"):
        lm_nll(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long))


# ---------------------------------------------------------------- reward model


# K = 2: one (chosen, rejected) pair per prompt is the Bradley-Terry pairwise loss
# -log sigmoid(r_w - r_l - m) averaged over prompts. Chosen [2, 0.5], rejected [1, 1.5]:
# answers scored [2, 1, 0.5, 1.5], pairs (0, 1) and (2, 3), one per prompt.
K2_SCORES = [2.0, 1.0, 0.5, 1.5]
K2_PAIRS = [(0, 1), (2, 3)]


def _k2(margin=None, scores=None):
    scores = f64(K2_SCORES) if scores is None else scores
    return kwise_ranking_loss(scores, torch.tensor(K2_PAIRS), torch.tensor([0, 1]), 2, margin)


def test_kwise_k2_is_the_pairwise_formula_by_hand():
    # d = r_w - r_l = [1, -1]; -log sigmoid(1) = sp(-1) = 0.31326169, -log sigmoid(-1) = sp(1) = 1.31326169
    # mean = 0.81326169
    loss, stats = _k2()
    assert math.isclose(loss.item(), (softplus(-1) + softplus(1)) / 2, rel_tol=1e-12)
    assert math.isclose(loss.item(), 0.81326169, rel_tol=1e-7)
    assert stats["accuracy"].item() == 0.5
    assert stats["reward_margin"].item() == 0.0
    assert stats["num_pairs"].item() == 2


def test_kwise_k2_margin_float_and_per_pair():
    # margin 0.5: d - m = [0.5, -1.5] -> (sp(-0.5) + sp(1.5)) / 2 = (0.47407698 + 1.70141328) / 2 = 1.08774513
    loss, _ = _k2(margin=0.5)
    assert math.isclose(loss.item(), (softplus(-0.5) + softplus(1.5)) / 2, rel_tol=1e-12)
    assert math.isclose(loss.item(), 1.08774513, rel_tol=1e-7)
    loss_t, _ = _k2(margin=f64([0.5, 0.5]))
    assert math.isclose(loss_t.item(), loss.item(), rel_tol=1e-12)
    # the margin only shifts the loss: the statistics are of the raw differences
    _, stats = _k2(margin=0.5)
    assert stats["accuracy"].item() == 0.5 and stats["reward_margin"].item() == 0.0


def test_kwise_k2_gradient_pushes_chosen_up():
    # one pair, both scores 0: d/dr_w of -log sigmoid(r_w - r_l) at 0 = -(1 - sigmoid(0)) = -0.5
    scores = f64([0.0, 0.0]).requires_grad_()
    loss, _ = kwise_ranking_loss(scores, torch.tensor([(0, 1)]), torch.tensor([0]), 1)
    loss.backward()
    assert scores.grad.tolist() == [-0.5, 0.5]


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
    # the mean over the 6 pairs of -log sigmoid(d) = softplus(-d)
    pair_mean = sum(softplus(-(SCORES4[w] - SCORES4[l])) for w, l in PAIRS4) / 6
    assert math.isclose(loss.item(), pair_mean, rel_tol=1e-12)
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


def test_kwise_k2_pairs_and_empty_group_is_skipped():
    # Three prompts, the middle one fully tied (no pairs): mean over prompts 0 and 2 only.
    # The K = 2 pairs above with margin 0.5: (sp(-0.5) + sp(1.5)) / 2 = 1.08774513, not / 3.
    loss, _ = kwise_ranking_loss(f64(K2_SCORES), torch.tensor(K2_PAIRS), torch.tensor([0, 2]), 3, margin=0.5)
    assert math.isclose(loss.item(), (softplus(-0.5) + softplus(1.5)) / 2, rel_tol=1e-12)
    assert math.isclose(loss.item(), 1.08774513, rel_tol=1e-7)


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


def test_clipped_surrogate_is_per_token_and_zero_off_mask():
    # The same batch as above, unreduced: [[-2.4, -1, 0], [0.8, 0, 0]], 0 where the mask is 0
    # although the log-probs there are -inf and the advantages nan.
    ninf, nan = float("-inf"), float("nan")
    logp = f64([[math.log(1.5), 0.0, ninf], [math.log(0.5), ninf, ninf]]).requires_grad_()
    old = f64([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    adv = f64([[2.0, 1.0, nan], [-1.0, nan, nan]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    per_token, stats = clipped_surrogate(logp, old, adv, mask)
    assert torch.allclose(per_token, f64([[-2.4, -1.0, 0.0], [0.8, 0.0, 0.0]]))
    # stats are masked means over the 3 response tokens: 2 of them clipped; ratios 1.5, 1, 0.5
    assert math.isclose(stats["clip_frac"].item(), 2 / 3, rel_tol=1e-12)
    assert math.isclose(stats["ratio_mean"].item(), 1.0, rel_tol=1e-12)
    # approx_kl: [(0.5 - ln 1.5) + 0 + (-0.5 - ln 0.5)] / 3 = (0.09453489 + 0.19314718) / 3 = 0.09589402
    assert math.isclose(stats["approx_kl"].item(), (0.5 - math.log(1.5) - 0.5 + LN2) / 3, rel_tol=1e-9)
    assert "dual_clip_frac" not in stats
    # summing it backpropagates finite numbers: only the unclipped token moves, -A * ratio = -1
    per_token.sum().backward()
    assert torch.allclose(logp.grad, f64([[0.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))
    # the token-mean aggregation of it, with the same stats
    loss, same = ppo_policy_loss(logp.detach(), old, adv, mask)
    assert math.isclose(loss.item(), (-2.4 - 1.0 + 0.8) / 3, rel_tol=1e-12)
    assert same.keys() == stats.keys() and all(torch.equal(same[k], stats[k]) for k in stats)


def test_clipped_surrogate_dual_clip_per_token():
    # A = [-1, -1, 2], ratio = [5, 1.1, 5], c = 3:
    #   token 0: max(5, 1.2) = 5, capped at -c * A = 3 -> 3 (dual clip active)
    #   token 1: max(1.1, 1.1) = 1.1 < 3 -> 1.1
    #   token 2: A > 0, untouched: max(-10, -2.4) = -2.4
    logp = f64([[math.log(5.0), math.log(1.1), math.log(5.0)]])
    per_token, stats = clipped_surrogate(logp, f64([[0.0, 0.0, 0.0]]), f64([[-1.0, -1.0, 2.0]]),
                                         torch.ones(1, 3), dual_clip=3.0)
    assert torch.allclose(per_token, f64([[3.0, 1.1, -2.4]]))
    assert math.isclose(stats["dual_clip_frac"].item(), 1 / 3, rel_tol=1e-12)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        clipped_surrogate(logp, logp, logp, torch.ones(1, 3), dual_clip=1.0)


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
