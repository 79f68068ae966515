"""The PPO glue of rlhf/training/ppo.py by hand: experience on the global batch, mini-batch
shares of W workers, losses weighted by the whole mini-batch, the join of worker shares and the
typed non-finite report; and Actor.update itself over worker layouts, with a bigram table as
the "model". Milliseconds each."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rlhf.algorithms.losses import LOSS_AGGREGATIONS, aggregate_loss, clipped_surrogate, loss_denominator, value_loss
from rlhf.algorithms.rewards import RunningMoments
from rlhf.distributed.strategy import World
from rlhf.errors import UserError
from rlhf.roles.update import PolicyLossSettings, actor_loss, critic_loss, mini_batch_shares, ptx_loss
from rlhf.rollout.gather import gather_scored
from rlhf.rollout.types import Experience, NonFinite, Rollout, Scored
from rlhf.training.guards import NonFiniteGuard
from rlhf.training.ppo import RewardNormalizer, make_experience


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def rollout_of(prompts: list[list[int]], responses: list[list[int]], eos: list[bool], pad: int = 0,
               response_width: int | None = None) -> Rollout:
    """A rollout from token lists: prompts left-padded, responses right-padded."""
    prompt_width = max(len(p) for p in prompts)
    width = response_width or max(len(r) for r in responses)
    seqs, attn, mask = [], [], []
    for p, r in zip(prompts, responses):
        left, right = prompt_width - len(p), width - len(r)
        seqs.append([pad] * left + p + r + [pad] * right)
        attn.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
        mask.append([1.0] * len(r) + [0.0] * right)
    return Rollout(t(seqs, torch.long), t(attn, torch.long), prompt_width, t(mask), torch.tensor(eos))


# -- make_experience on a 2-row batch ----------------------------------------------------------
# Row 0: 3 response tokens, no EOS (cut at max_new_tokens). Row 1: 2 tokens ending with EOS, one
# padding column. Padding columns hold finite garbage (5.0, 9.0) that must count nowhere.
#   log-ratio logp - ref:  row 0 [0.25, -0.5, 0.75]   row 1 [0.5, 0.125, (pad)]
#   values V:              row 0 [0.5, 0.25, 1.0]     row 1 [0.5, 0.75, (pad 9.0)]
#   raw scores r:          [2.0, 4.0]
HAND_ROLLOUT = rollout_of([[5, 6], [7]], [[8, 9, 10], [11, 2]], eos=[False, True])
HAND = Scored(HAND_ROLLOUT,
              logprobs=t([[-0.75, -2.5, -0.75], [-0.5, -0.875, 5.0]]),
              ref_logprobs=t([[-1.0, -2.0, -1.5], [-1.0, -1.0, 0.0]]),
              values=t([[0.5, 0.25, 1.0], [0.5, 0.75, 9.0]]),
              scores=t([2.0, 4.0]))
BETA = 0.5


def hand_normalizer(penalty: float | None = 1.0) -> RewardNormalizer:
    # rm_stats mean 1, std 2: (r - 1) / 2 = [0.5, 1.5]
    # missing EOS (row 0): 0.5 - |penalty| = -0.5
    # clip 1: row 1 1.5 -> 1.0                                   => scores [-0.5, 1.0]
    return RewardNormalizer("rm_stats", clip=1.0, missing_eos_penalty=penalty, stats_mean=1.0, stats_std=2.0,
                            running=RunningMoments())


def experience(normalizer=None, kl_in_loss=False, whiten=False, lam=0.5):
    return make_experience(HAND, normalizer or hand_normalizer(), BETA, "k1", kl_in_loss, gamma=1.0, lam=lam,
                           whiten_advantages=whiten)


# β·k1 on every response token: row 0 [0.125, -0.25, 0.375], row 1 [0.25, 0.0625, 0]
# rewards = score on the last response token - β·k1:
#   row 0 [-0.125, 0.25, -0.5 - 0.375 = -0.875]
#   row 1 [-0.25, 1.0 - 0.0625 = 0.9375, 0]
REWARDS = [[-0.125, 0.25, -0.875], [-0.25, 0.9375, 0.0]]
# GAE, γ = 1, λ = 0.5: δ_t = r_t + V_{t+1} - V_t (V after the last response token is 0),
# A_t = δ_t + λ·A_{t+1}:
#   row 0  t2: δ = -0.875 + 0 - 1.0 = -1.875              A2 = -1.875
#          t1: δ = 0.25 + 1.0 - 0.25 = 1.0               A1 = 1.0 + 0.5·(-1.875) = 0.0625
#          t0: δ = -0.125 + 0.25 - 0.5 = -0.375          A0 = -0.375 + 0.5·0.0625 = -0.34375
#   row 1  t1: δ = 0.9375 + 0 - 0.75 = 0.1875             A1 = 0.1875
#          t0: δ = -0.25 + 0.75 - 0.5 = 0.0              A0 = 0 + 0.5·0.1875 = 0.09375
ADVANTAGES = [[-0.34375, 0.0625, -1.875], [0.09375, 0.1875, 0.0]]
# returns = A + V on response tokens, 0 on padding
RETURNS = [[0.15625, 0.3125, -0.875], [0.59375, 0.9375, 0.0]]


def test_make_experience_by_hand():
    exp, metrics = experience()
    torch.testing.assert_close(exp.rewards, t(REWARDS), rtol=0, atol=1e-7)
    torch.testing.assert_close(exp.advantages, t(ADVANTAGES), rtol=0, atol=1e-7)
    torch.testing.assert_close(exp.returns, t(RETURNS), rtol=0, atol=1e-7)
    # raw scores kept as they were; old log-probs and values passed through
    assert exp.scores.tolist() == [2.0, 4.0]
    assert exp.logprobs is HAND.logprobs and exp.values is HAND.values
    # ppo/kl: mean over rows of the summed log-ratio on response tokens:
    #   row 0: 0.25 - 0.5 + 0.75 = 0.5; row 1: 0.5 + 0.125 = 0.625 (the pad's 5.0 - 0.0 not counted)
    #   mean = 0.5625; with k1 the estimator's mean is the same number
    assert metrics["ppo/kl"] == pytest.approx(0.5625, abs=1e-7)
    assert metrics["ppo/kl_estimator_mean"] == pytest.approx(0.5625, abs=1e-7)
    assert metrics["ppo/kl_coef"] == BETA
    assert metrics["ppo/reward_raw"] == pytest.approx(3.0)          # (2 + 4) / 2
    assert metrics["ppo/reward_normalized"] == pytest.approx(0.25)  # (-0.5 + 1.0) / 2
    assert metrics["ppo/response_length"] == pytest.approx(2.5)     # (3 + 2) / 2
    assert metrics["ppo/eos_rate"] == pytest.approx(0.5)
    # masked means over the 5 response tokens:
    #   advantages (-0.34375 + 0.0625 - 1.875 + 0.09375 + 0.1875) / 5 = -1.875 / 5 = -0.375
    #   returns    (0.15625 + 0.3125 - 0.875 + 0.59375 + 0.9375) / 5 = 1.125 / 5 = 0.225
    #   values     (0.5 + 0.25 + 1.0 + 0.5 + 0.75) / 5 = 3.0 / 5 = 0.6
    assert metrics["ppo/advantage_mean"] == pytest.approx(-0.375, abs=1e-7)
    assert metrics["ppo/return_mean"] == pytest.approx(0.225, abs=1e-7)
    assert metrics["ppo/value_mean"] == pytest.approx(0.6, abs=1e-7)


@pytest.mark.parametrize("penalty", [1.0, -1.0])
def test_missing_eos_penalty_is_subtracted_whatever_its_sign(penalty):
    # TRL users write +1.0 (TRL adds it, so theirs would be a bonus); ours subtracts |penalty|.
    # Only row 0 lacks EOS: 0.5 - 1 = -0.5; row 1 (EOS) is untouched and clipped to 1.0.
    normalizer = hand_normalizer(penalty)
    assert normalizer(HAND.scores, HAND_ROLLOUT.eos_found).tolist() == [-0.5, 1.0]
    exp, _ = experience(normalizer)
    torch.testing.assert_close(exp.rewards, t(REWARDS), rtol=0, atol=1e-7)


def test_normalisation_modes_and_the_clip():
    eos = torch.tensor([True, True, False])
    raw = t([3.0, -9.0, 1.0])
    # none, no clip: as they are
    assert RewardNormalizer("none", 0.0, None)(raw, eos).tolist() == [3.0, -9.0, 1.0]
    # none, clip 2, penalty 0.5 on row 2: [3 -> 2, -9 -> -2, 1 - 0.5 = 0.5]
    assert RewardNormalizer("none", 2.0, 0.5)(raw, eos).tolist() == [2.0, -2.0, 0.5]
    # rm_stats (1, 2), clip 3: [(3-1)/2 = 1, (-9-1)/2 = -5 -> -3, (1-1)/2 - 0.5 = -0.5]
    assert RewardNormalizer("rm_stats", 3.0, -0.5, 1.0, 2.0)(raw, eos).tolist() == [1.0, -3.0, -0.5]
    # the penalty is applied before the clip: a clipped row still loses it: rm_stats (0, 1),
    # clip 1: 7 -> 7 - 2 = 5 -> clipped to 1 (not 1 - 2 = -1)
    assert RewardNormalizer("rm_stats", 1.0, 2.0)(t([7.0]), torch.tensor([False])).tolist() == [1.0]


def test_kl_in_loss_leaves_only_the_score_in_the_rewards():
    # With the KL in the loss, the rewards are the scores on the last response token alone:
    #   row 0 [0, 0, -0.5], row 1 [0, 1.0, 0]
    exp, metrics = experience(kl_in_loss=True)
    assert exp.rewards.tolist() == [[0.0, 0.0, -0.5], [0.0, 1.0, 0.0]]
    # GAE (γ=1, λ=0.5):
    #   row 0 t2: δ = -0.5 - 1.0 = -1.5; t1: δ = 0 + 1.0 - 0.25 = 0.75, A1 = 0.75 - 0.75 = 0
    #         t0: δ = 0 + 0.25 - 0.5 = -0.25, A0 = -0.25 + 0 = -0.25
    #   row 1 t1: δ = 1.0 - 0.75 = 0.25; t0: δ = 0.75 - 0.5 = 0.25, A0 = 0.25 + 0.125 = 0.375
    assert exp.advantages.tolist() == [[-0.25, 0.0, -1.5], [0.375, 0.25, 0.0]]
    # the KL is still measured and reported (it drives the adaptive controller)
    assert metrics["ppo/kl"] == pytest.approx(0.5625, abs=1e-7)


def test_whitening_uses_the_response_tokens_only():
    # A on response tokens: [-0.34375, 0.0625, -1.875, 0.09375, 0.1875], mean -0.375
    # deviations: [0.03125, 0.4375, -1.5, 0.46875, 0.5625]
    # unbiased variance: (0.0009765625 + 0.19140625 + 2.25 + 0.2197265625 + 0.31640625) / 4
    #                  = 2.978515625 / 4 = 0.74462890625, std 0.86291883
    # whitened = deviation / std: [0.0362143, 0.5070002, -1.7382863, 0.5432145, 0.6518574]
    exp, metrics = experience(whiten=True)
    expected = [[0.0362143, 0.5070002, -1.7382863], [0.5432145, 0.6518574, 0.0]]
    torch.testing.assert_close(exp.advantages, t(expected), rtol=0, atol=1e-6)
    assert metrics["ppo/advantage_mean"] == pytest.approx(0.0, abs=1e-6)
    # whitening changes the advantages only: returns still A + V of the raw advantages
    torch.testing.assert_close(exp.returns, t(RETURNS), rtol=0, atol=1e-7)


# -- RewardNormalizer with running moments -----------------------------------------------------
def test_running_normalizer_uses_the_moments_of_the_whole_global_batch():
    # Global batch [1, 5, 5, 5] (worker 0 holds samples 0, 2 = [1, 5]; worker 1 holds [5, 5]).
    # Moments of the whole batch: mean 4, m2 = 9 + 1 + 1 + 1 = 12, unbiased var 12/3 = 4, std 2.
    # Normalised: [(1-4)/2, (5-4)/2, ...] = [-1.5, 0.5, 0.5, 0.5]
    normalizer = RewardNormalizer("running", 0.0, None, running=RunningMoments())
    eos = torch.ones(4, dtype=torch.bool)
    assert normalizer(t([1.0, 5.0, 5.0, 5.0]), eos).tolist() == [-1.5, 0.5, 0.5, 0.5]
    assert (normalizer.running.count, normalizer.running.mean, normalizer.running.std) == (4, 4.0, 2.0)
    # (Before the rewrite, worker 1 alone would have seen [5, 5]: mean 5, std 0 -> not these numbers.)
    # Next global batch [8, 8]: every score so far [1, 5, 5, 5, 8, 8]: mean 32/6 = 16/3,
    # m2 = (13/3)^2 + 3·(1/3)^2 + 2·(8/3)^2 = (169 + 3 + 128)/9 = 100/3, var (100/3)/5 = 20/3,
    # std 2.5819889; (8 - 16/3) / std = (8/3) / 2.5819889 = 1.0327956
    out = normalizer(t([8.0, 8.0]), torch.ones(2, dtype=torch.bool))
    assert normalizer.running.count == 6
    assert normalizer.running.mean == pytest.approx(16 / 3)
    assert normalizer.running.std == pytest.approx(math.sqrt(20 / 3))
    torch.testing.assert_close(out, t([1.0327956, 1.0327956]))
    # the clip and the penalty apply after the running normalisation: clip 1, penalty on row 1
    clipped = RewardNormalizer("running", 1.0, 0.25, running=RunningMoments())
    assert clipped(t([1.0, 5.0, 5.0, 5.0]), torch.tensor([True, False, True, True])).tolist() == [-1.0, 0.25, 0.5, 0.5]


def test_running_normalizer_in_make_experience_does_not_depend_on_row_order():
    # make_experience runs on the global batch; its rows come in global order, but the moments
    # (and so each sample's normalised score) are a function of the set of scores alone.
    a = RewardNormalizer("running", 0.0, None, running=RunningMoments())
    b = RewardNormalizer("running", 0.0, None, running=RunningMoments())
    raw, eos = t([1.0, 5.0, 5.0, 5.0]), torch.ones(4, dtype=torch.bool)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(a(raw, eos)[order], b(raw[order], eos[order]))
    assert a.running.state_dict() == pytest.approx(b.running.state_dict())


# -- mini-batch shares -------------------------------------------------------------------------
ORDER = torch.tensor([3, 7, 0, 5, 2, 6, 1, 4])  # one epoch's permutation of a rollout of 8


def shares(micro: int, rank: int, world: int):
    return [([int(i) for i in s.samples], [[int(i) for i in m] for m in s.micro_batches])
            for s in mini_batch_shares([ORDER], 4, micro, rank, world)]


def test_mini_batch_shares_of_one_worker():
    # Mini-batches of 4: [3, 7, 0, 5] then [2, 6, 1, 4]; one worker trains on all of each.
    assert shares(1, 0, 1) == [([3, 7, 0, 5], [[3], [7], [0], [5]]), ([2, 6, 1, 4], [[2], [6], [1], [4]])]
    assert shares(2, 0, 1) == [([3, 7, 0, 5], [[3, 7], [0, 5]]), ([2, 6, 1, 4], [[2, 6], [1, 4]])]


def test_mini_batch_shares_of_two_workers():
    # Worker r takes every 2nd sample of the mini-batch from position r:
    #   [3, 7, 0, 5] -> worker 0 [3, 0], worker 1 [7, 5]; [2, 6, 1, 4] -> [2, 1] and [6, 4]
    assert shares(1, 0, 2) == [([3, 7, 0, 5], [[3], [0]]), ([2, 6, 1, 4], [[2], [1]])]
    assert shares(1, 1, 2) == [([3, 7, 0, 5], [[7], [5]]), ([2, 6, 1, 4], [[6], [4]])]
    assert shares(2, 0, 2) == [([3, 7, 0, 5], [[3, 0]]), ([2, 6, 1, 4], [[2, 1]])]
    assert shares(2, 1, 2) == [([3, 7, 0, 5], [[7, 5]]), ([2, 6, 1, 4], [[6, 4]])]
    for micro in (1, 2):
        for step0, step1 in zip(mini_batch_shares([ORDER], 4, micro, 0, 2), mini_batch_shares([ORDER], 4, micro, 1, 2)):
            # both workers walk the same global mini-batch, and together they cover it exactly once
            assert step0.samples.tolist() == step1.samples.tolist()
            together = torch.cat(step0.micro_batches + step1.micro_batches)
            assert sorted(together.tolist()) == sorted(step0.samples.tolist())


def test_mini_batch_shares_walk_every_epoch_in_order():
    second = torch.tensor([6, 1, 0, 3, 7, 2, 5, 4])
    steps = mini_batch_shares([ORDER, second], 4, 2, 1, 2)
    assert [s.samples.tolist() for s in steps] == [[3, 7, 0, 5], [2, 6, 1, 4], [6, 1, 0, 3], [7, 2, 5, 4]]
    assert [[m.tolist() for m in s.micro_batches] for s in steps] == [[[7, 5]], [[6, 4]], [[1, 3]], [[2, 4]]]


# -- losses split over micro-batches and workers ------------------------------------------------
def mini_batch_experience() -> Experience:
    """A mini-batch of 4 rows with 4, 1, 3 and 2 response tokens (prompts of 2, 1, 3, 2)."""
    rollout = rollout_of([[5, 6], [7], [8, 9, 10], [11, 12]], [[13, 14, 15, 16], [2], [17, 18, 2], [19, 2]],
                         eos=[False, True, True, True])
    g = torch.Generator().manual_seed(0)
    shape = rollout.response_mask.shape
    rand = lambda: torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    old = rand() * 0.3 - 1.0
    return Experience(rollout, logprobs=old, ref_logprobs=old + 0.2 * rand(), values=rand(), rewards=rand(),
                      advantages=rand(), returns=rand(), scores=torch.zeros(4, dtype=torch.float64))


def split_losses(exp: Experience, leaf: torch.Tensor, entropy: torch.Tensor, settings: PolicyLossSettings,
                 kl_coef: float, world: int, micro: int, constant: float):
    """Every worker's micro-batch losses of one mini-batch, summed, as Actor.update computes them:
    the part is selected and trimmed, the current log-probs (here rows of `leaf`) cover its
    kept columns only, and the denominator is the whole mini-batch's."""
    order = torch.tensor([2, 0, 3, 1])
    denominator = loss_denominator(exp.rollout.response_mask[order], settings.aggregation, constant)
    total = 0.0
    for rank in range(world):
        (step,) = mini_batch_shares([order], 4, micro, rank, world)
        for index in step.micro_batches:
            part = exp.select(index).trimmed()
            width = part.rollout.response_mask.shape[1]
            loss, _ = actor_loss(leaf[index][:, :width], entropy[index][:, :width], part, kl_coef, settings,
                                 denominator)
            total = total + loss
    return total


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("world,micro", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_actor_loss_over_all_micro_batches_of_all_workers_is_the_mini_batch_loss(mode, world, micro):
    exp = mini_batch_experience()
    settings = PolicyLossSettings(clip_eps=0.2, entropy_coef=0.01, kl_in_loss=True, kl_estimator="k3",
                                  aggregation=mode)
    g = torch.Generator().manual_seed(1)
    # current log-probs away from the old ones, so that some ratios leave the clip range
    current = exp.logprobs + 0.3 * torch.randn(exp.logprobs.shape, generator=g, dtype=torch.float64)
    entropy0 = torch.rand(exp.logprobs.shape, generator=g, dtype=torch.float64)
    whole_lp, split_lp = current.clone().requires_grad_(), current.clone().requires_grad_()
    whole_h, split_h = entropy0.clone().requires_grad_(), entropy0.clone().requires_grad_()
    # The whole mini-batch at once: its own denominator, every row in one call.
    mask = exp.rollout.response_mask
    whole, _ = actor_loss(whole_lp, whole_h, exp, 0.1, settings, loss_denominator(mask, mode, 4.0))
    split = split_losses(exp, split_lp, split_h, settings, 0.1, world, micro, constant=4.0)
    # the surrogate term alone differs from a plain masked mean for seq_mean modes; the total must
    # still match exactly (up to float64 rounding)
    assert split.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-15)
    whole.backward()
    split.backward()
    torch.testing.assert_close(split_lp.grad, whole_lp.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(split_h.grad, whole_h.grad, rtol=1e-12, atol=1e-15)
    # Sanity: the reference value is the mode's formula over the whole mini-batch
    per_token, _ = clipped_surrogate(current, exp.logprobs, exp.advantages, mask, 0.2)
    log_r = current - exp.ref_logprobs
    k3 = torch.expm1(-log_r) + log_r
    by_mode = lambda x: aggregate_loss(x, mask, mode, loss_denominator(mask, mode, 4.0))  # noqa: E731
    assert whole.item() == pytest.approx((by_mode(per_token) - 0.01 * by_mode(entropy0) + 0.1 * by_mode(k3)).item(),
                                         rel=1e-12)


def test_token_mean_over_micro_batches_is_not_the_mean_of_their_means():
    # The reason for the whole mini-batch's denominator: with per-part denominators a 1-token row
    # (row 1) would weigh as much as the 4-token row 0.
    exp = mini_batch_experience()
    settings = PolicyLossSettings(aggregation="token_mean")
    lp = exp.logprobs + 0.1
    whole, _ = actor_loss(lp, None, exp, 0.0, settings, loss_denominator(exp.rollout.response_mask, "token_mean"))
    parts = []
    for i in range(4):
        part = exp.select(torch.tensor([i])).trimmed()
        width = part.rollout.response_mask.shape[1]
        own = loss_denominator(part.rollout.response_mask, "token_mean")
        parts.append(actor_loss(lp[i : i + 1, :width], None, part, 0.0, settings, own)[0])
    assert abs(sum(p.item() for p in parts) / 4 - whole.item()) > 1e-3


@pytest.mark.parametrize("world,micro", [(1, 1), (1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("clip", [None, 0.2])
def test_critic_loss_over_all_micro_batches_of_all_workers_is_the_token_mean(world, micro, clip):
    exp = mini_batch_experience()
    g = torch.Generator().manual_seed(2)
    current = exp.values + 0.5 * torch.randn(exp.values.shape, generator=g, dtype=torch.float64)
    whole_v, split_v = current.clone().requires_grad_(), current.clone().requires_grad_()
    mask = exp.rollout.response_mask
    # whole: 0.5 · token mean over the mini-batch's 4 + 1 + 3 + 2 = 10 response tokens
    whole, _ = value_loss(whole_v, exp.values, exp.returns, mask, clip)
    tokens = float(mask.sum())
    assert tokens == 10.0
    order = torch.tensor([2, 0, 3, 1])
    split = 0.0
    for rank in range(world):
        (step,) = mini_batch_shares([order], 4, micro, rank, world)
        for index in step.micro_batches:
            part = exp.select(index).trimmed()
            width = part.rollout.response_mask.shape[1]
            loss, _ = critic_loss(split_v[index][:, :width], part, clip, tokens)
            split = split + loss
    assert split.item() == pytest.approx(whole.item(), rel=1e-12)
    whole.backward()
    split.backward()
    torch.testing.assert_close(split_v.grad, whole_v.grad, rtol=1e-12, atol=1e-15)


def test_critic_loss_share_by_hand():
    # One row, 2 response tokens of a mini-batch of 8 tokens, no clip:
    #   0.5 · ((1 - 0)^2 + (3 - 1)^2) / 2 = 0.5 · 5 / 2 = 1.25 per token mean of this part;
    #   its share of the mini-batch's token mean: 1.25 · 2 / 8 = 0.3125
    rollout = rollout_of([[5]], [[6, 2]], eos=[True])
    zeros = torch.zeros(1, 2)
    part = Experience(rollout, zeros, zeros, values=t([[0.0, 0.0]]), rewards=zeros, advantages=zeros,
                      returns=t([[0.0, 1.0]]), scores=torch.zeros(1))
    loss, stats = critic_loss(t([[1.0, 3.0]]), part, None, 8.0)
    assert loss.item() == pytest.approx(0.3125)
    assert stats["value_loss"].item() == pytest.approx(1.25)


# -- the in-loss KL and the entropy bonus by hand -----------------------------------------------
def test_in_loss_k3_and_entropy_bonus_by_hand():
    # One row, 2 tokens, advantages 0 and π = π_old: the surrogate is 0 with gradient 0.
    #   logp = [-1.0, -2.0], ref = [-1.5, -1.0]: log r = [0.5, -1.0]
    #   k3 = e^{-log r} - 1 + log r = [e^-0.5 - 0.5, e - 2] = [0.10653066, 0.71828183]
    #   token mean 0.41240624; β = 0.1 -> +0.041240624
    #   entropy [1.0, 3.0], token mean 2.0; coef 0.01 -> -0.02
    #   loss = 0.041240624 - 0.02 = 0.021240624
    rollout = rollout_of([[5]], [[6, 7]], eos=[False])
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    part = Experience(rollout, old, torch.tensor([[-1.5, -1.0]], dtype=torch.float64), zeros, zeros, zeros, zeros,
                      torch.zeros(1))
    settings = PolicyLossSettings(entropy_coef=0.01, kl_in_loss=True, kl_estimator="k3")
    logp = old.clone().requires_grad_()
    entropy = torch.tensor([[1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    loss, stats = actor_loss(logp, entropy, part, 0.1, settings, denominator=2.0)
    assert loss.item() == pytest.approx(0.021240624, abs=1e-9)
    assert stats["entropy"].item() == pytest.approx(2.0)
    loss.backward()
    # d k3 / d logp = 1 - 1/r = 1 - e^{-log r}: [1 - e^-0.5, 1 - e] = [0.39346934, -1.71828183], times β/T = 0.05:
    # [0.019673467, -0.085914091]. The token where π > π_ref gets a positive gradient (descent lowers
    # its log-prob), the token where π < π_ref a negative one: the penalty pulls π towards π_ref.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.019673467, -0.085914091]], dtype=torch.float64),
                               rtol=0, atol=1e-9)
    # d loss / d entropy = -coef / T = -0.005 on both tokens: descent raises the entropy.
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.005, -0.005]], dtype=torch.float64))
    # without kl_in_loss (or with β = 0) the KL term is gone: loss = -0.02
    no_kl = PolicyLossSettings(entropy_coef=0.01)
    assert actor_loss(old, entropy, part, 0.1, no_kl, 2.0)[0].item() == pytest.approx(-0.02)
    assert actor_loss(old, entropy, part, 0.0, settings, 2.0)[0].item() == pytest.approx(-0.02)


def test_ptx_loss_by_hand():
    # Worker 0: NLL sum 6 over 4 tokens; worker 1: NLL sum 10 over 8 tokens; 12 tokens in all.
    #   shares 0.5·6/12 = 0.25 and 0.5·10/12 = 0.41666667; sum 0.5·16/12 = 0.5 · (mean NLL per token)
    assert ptx_loss(t(6.0), 12.0, 0.5).item() == pytest.approx(0.25)
    assert ptx_loss(t(10.0), 12.0, 0.5).item() == pytest.approx(5 / 12)
    assert (ptx_loss(t(6.0), 12.0, 0.5) + ptx_loss(t(10.0), 12.0, 0.5)).item() == pytest.approx(0.5 * 16 / 12)
    # no pretraining token anywhere: divided by 1, not 0
    assert ptx_loss(t(0.0), 0.0, 0.5).item() == 0.0
    nll = t(6.0).requires_grad_()
    ptx_loss(nll, 12.0, 0.5).backward()
    assert nll.grad.item() == pytest.approx(0.5 / 12)


# -- gather_scored with two workers -------------------------------------------------------------
class Exchange:
    """What a process group does for two workers, for two threads of this process."""

    def __init__(self, size: int):
        self.barrier = threading.Barrier(size, timeout=10)
        self.slots: list = [None] * size
        self.calls: list[str] = []

    def swap(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        seen = list(self.slots)
        self.barrier.wait()
        return seen


class ThreadWorld:
    """Worker `rank` of a world of two: `all_reduce` (max) and `all_gather` as collectives."""

    def __init__(self, rank: int, exchange: Exchange):
        self.rank, self.world_size, self.exchange = rank, 2, exchange

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        assert op == "max"
        parts = self.exchange.swap(self.rank, values)
        return {key: float(max(p[key] for p in parts)) for key in values}

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = self.exchange.swap(self.rank, tensor)
        # a real all_gather needs the same shape and dtype on every worker
        assert all(p.shape == tensor.shape and p.dtype == tensor.dtype for p in parts), [p.shape for p in parts]
        return parts


# Global samples 0..3; worker 0 holds 0 and 2, worker 1 holds 1 and 3. EOS id 2, pad id 0.
#   sample 0: prompt [11, 12, 13]  response [21, 2]          (EOS)
#   sample 1: prompt [14, 15]      response [22, 23, 24, 25] (no EOS: cut at 4 tokens)
#   sample 2: prompt [16]          response [2]              (EOS at once)
#   sample 3: prompt [17, 18]      response [28, 2]          (EOS)
# Worker 0's share is 3 prompt columns wide and 2 response columns; worker 1's 2 and 4.
def worker_shares() -> list[Scored]:
    w0 = rollout_of([[11, 12, 13], [16]], [[21, 2], [2]], eos=[True, True])
    w1 = rollout_of([[14, 15], [17, 18]], [[22, 23, 24, 25], [28, 2]], eos=[False, True])
    w0.logprobs = t([[-0.1, -0.2], [-0.3, 0.0]])
    w1.logprobs = t([[-1.1, -1.2, -1.3, -1.4], [-1.5, -1.6, 0.0, 0.0]])
    s0 = Scored(w0, logprobs=t([[-0.1, -0.2], [-0.3, 0.0]]), ref_logprobs=t([[-0.15, -0.25], [-0.35, 0.0]]),
                values=t([[0.01, 0.02], [0.03, 0.0]]), scores=t([0.5, -1.5]))
    s1 = Scored(w1, logprobs=t([[-1.1, -1.2, -1.3, -1.4], [-1.5, -1.6, 0.0, 0.0]]),
                ref_logprobs=t([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, 0.0, 0.0]]),
                values=t([[0.11, 0.12, 0.13, 0.14], [0.15, 0.16, 0.0, 0.0]]), scores=t([2.5, 1.0]))
    return [s0, s1]


# The global batch: 3 prompt columns (left padding), 4 response columns (right padding), rows in
# sample order.
GLOBAL_SEQUENCES = [[11, 12, 13, 21, 2, 0, 0],
                    [0, 14, 15, 22, 23, 24, 25],
                    [0, 0, 16, 2, 0, 0, 0],
                    [0, 17, 18, 28, 2, 0, 0]]
GLOBAL_ATTENTION = [[1, 1, 1, 1, 1, 0, 0],
                    [0, 1, 1, 1, 1, 1, 1],
                    [0, 0, 1, 1, 0, 0, 0],
                    [0, 1, 1, 1, 1, 0, 0]]
GLOBAL_MASK = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]


def global_scored() -> Scored:
    rollout = Rollout(t(GLOBAL_SEQUENCES, torch.long), t(GLOBAL_ATTENTION, torch.long), 3, t(GLOBAL_MASK),
                      torch.tensor([True, False, True, True]),
                      t([[-0.1, -0.2, 0, 0], [-1.1, -1.2, -1.3, -1.4], [-0.3, 0, 0, 0], [-1.5, -1.6, 0, 0]]))
    return Scored(rollout,
                  logprobs=t([[-0.1, -0.2, 0, 0], [-1.1, -1.2, -1.3, -1.4], [-0.3, 0, 0, 0], [-1.5, -1.6, 0, 0]]),
                  ref_logprobs=t([[-0.15, -0.25, 0, 0], [-1.0, -1.0, -1.0, -1.0], [-0.35, 0, 0, 0],
                                  [-2.0, -2.0, 0, 0]]),
                  values=t([[0.01, 0.02, 0, 0], [0.11, 0.12, 0.13, 0.14], [0.03, 0, 0, 0], [0.15, 0.16, 0, 0]]),
                  scores=t([0.5, 2.5, -1.5, 1.0]))


def assert_same_scored(a: Scored, b: Scored) -> None:
    ra, rb = a.rollout, b.rollout
    assert ra.prompt_length == rb.prompt_length
    for name in ("sequences", "attention_mask", "response_mask", "eos_found", "logprobs"):
        x, y = getattr(ra, name), getattr(rb, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), (name, x, y)
    for name in ("logprobs", "ref_logprobs", "values", "scores"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_gather_scored_joins_two_worker_shares_in_global_order():
    exchange = Exchange(2)
    shares_ = worker_shares()
    with ThreadPoolExecutor(2) as pool:
        joined = list(pool.map(lambda r: gather_scored(shares_[r], ThreadWorld(r, exchange), pad_token_id=0), (0, 1)))
    expected = global_scored()
    # row i of worker r is global row i·2 + r, on both workers alike
    for result in joined:
        assert_same_scored(result, expected)
    assert joined[0].rollout.sequences.dtype == torch.long and joined[0].rollout.eos_found.dtype == torch.bool
    # ... and it is what make_experience needs: the same experience as from the hand-built batch
    args = dict(kl_coef=0.1, kl_estimator="k1", kl_in_loss=False, gamma=1.0, lam=0.95, whiten_advantages=True)
    norm = lambda: RewardNormalizer("running", 5.0, 1.0, running=RunningMoments())  # noqa: E731
    got, got_metrics = make_experience(joined[1], norm(), **args)
    want, want_metrics = make_experience(expected, norm(), **args)
    for name in ("rewards", "advantages", "returns"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got_metrics == want_metrics
    # ppo/kl of the global batch: rows' summed log-ratios 0.05 + 0.05 = 0.1,
    # -0.1 - 0.2 - 0.3 - 0.4 = -1.0, 0.05 and 0.5 + 0.4 = 0.9 -> mean 0.05 / 4 = 0.0125
    assert got_metrics["ppo/kl"] == pytest.approx(0.0125, abs=1e-6)


def test_gather_scored_in_a_world_of_one_returns_the_batch_unchanged():
    scored = global_scored()
    assert gather_scored(scored, World(), pad_token_id=0) is scored


def test_gather_scored_without_sampler_logprobs():
    exchange = Exchange(2)
    shares_ = worker_shares()
    for s in shares_:
        s.rollout.logprobs = None
    with ThreadPoolExecutor(2) as pool:
        joined = list(pool.map(lambda r: gather_scored(shares_[r], ThreadWorld(r, exchange), pad_token_id=0), (0, 1)))
    assert joined[0].rollout.logprobs is None
    assert joined[0].rollout.sequences.tolist() == GLOBAL_SEQUENCES


# -- the typed non-finite report ----------------------------------------------------------------
class FakeStrategy:
    def __init__(self, name: str = "single"):
        self.name, self.world_size = name, 1


def test_scored_names_the_non_finite_tensors():
    assert global_scored().nonfinite() is None
    bad = global_scored()
    bad.scores[1] = float("nan")
    bad.values[2, 0] = float("inf")
    assert bad.nonfinite() == NonFinite(("reward", "values"))
    bad.ref_logprobs[0, 0] = float("-inf")
    assert bad.nonfinite() == NonFinite(("reward", "ref_logprobs", "values"))


def test_guard_skips_counts_and_stops_on_a_non_finite_report(capsys):
    guard = NonFiniteGuard("ppo", limit=2)
    strategy = FakeStrategy()
    report = NonFinite(("reward", "values"))
    assert guard.check(1, report, strategy, before_update=True) is False
    assert (guard.skipped, guard.consecutive) == (1, 1)
    assert "non-finite reward, values; update skipped" in capsys.readouterr().out
    assert guard.check(2, {}, strategy, before_update=True) is True  # a finite step ends the streak
    assert (guard.skipped, guard.consecutive) == (1, 0)
    assert guard.check(3, report, strategy, before_update=True) is False
    with pytest.raises(UserError, match=r"2 steps in a row with non-finite reward, values \(last at step 4"):
        guard.check(4, report, strategy, before_update=True)
    assert guard.skipped == 3


def test_guard_under_deepspeed_skips_a_report_checked_before_the_update():
    guard = NonFiniteGuard("ppo", limit=3)
    report = NonFinite(("logprobs",))
    assert guard.check(1, report, FakeStrategy("deepspeed"), before_update=True) is False
    with pytest.raises(UserError, match="non-finite logprobs at step 2; DeepSpeed has applied"):
        guard.check(2, report, FakeStrategy("deepspeed"))


# -- Actor.update over worker layouts, with a bigram "model" -------------------------------------
class Bigram(torch.nn.Module):
    """logits[t] = table[token t]: a differentiable stand-in with the HF forward signature."""

    def __init__(self, vocab: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:])


class RecordingStrategy:
    """Worker `rank` of `world_size`: backward accumulates, step records the gradient and zeros
    it without moving the weights (so every layout sees the same weights at every step)."""

    name = "single"
    device = torch.device("cpu")

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.grads = rank, world_size, []

    def backward(self, trained, loss):
        loss.backward()

    def step(self, trained) -> float:
        grad = trained.module.table.grad.clone()
        trained.module.table.grad = None
        self.grads.append(grad)
        return float(grad.norm())

    def all_reduce(self, values, op="mean"):
        return dict(values)


ORDERS = [torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2])]  # 2 epochs, one mini-batch of 4 each


def actor_update(world: int, micro: int, mode: str = "token_mean"):
    """Actor.update of every worker of `world` on the same experience: the per-step gradients
    summed over workers, and the metrics averaged over workers (as LocalRoles.update does)."""
    from rlhf.distributed.strategy import TrainedModel
    from rlhf.roles.forward import policy_logprobs
    from rlhf.roles.roles import Actor

    exp = mini_batch_experience()
    module = Bigram()
    with torch.no_grad():
        current = policy_logprobs(module, exp.rollout, 1.0)[0]
    g = torch.Generator().manual_seed(3)
    exp.logprobs = current + 0.1 * torch.randn(current.shape, generator=g, dtype=torch.float64)
    exp.ref_logprobs = current + 0.1 * torch.randn(current.shape, generator=g, dtype=torch.float64)
    settings = PolicyLossSettings(entropy_coef=0.01, kl_in_loss=True, kl_estimator="k2", aggregation=mode)
    grads, metrics = None, []
    for rank in range(world):
        strategy = RecordingStrategy(rank, world)
        actor = Actor(TrainedModel(module, None, None, strategy=strategy), None, 1.0, settings, mini_batch_size=4,
                      micro_batch_size=micro, aggregation_constant=4.0)
        metrics.append(actor.update(exp, ORDERS, kl_coef=0.1, step_offset=0))
        grads = strategy.grads if grads is None else [a + b for a, b in zip(grads, strategy.grads)]
    return grads, {k: sum(m[k] for m in metrics) / world for k in metrics[0]}


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_actor_update_gives_the_same_gradients_on_any_worker_layout(mode):
    # Reference: one worker, the whole mini-batch of 4 in one micro-batch.
    whole, _ = actor_update(1, 4, mode)
    assert len(whole) == 2 and all(float(g.abs().sum()) > 0 for g in whole)
    for world, micro in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        grads, _ = actor_update(world, micro, mode)
        for got, want in zip(grads, whole):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_logged_policy_loss_does_not_depend_on_the_worker_layout():
    _, whole = actor_update(1, 4)
    _, one = actor_update(1, 2)   # micro-batches [2, 0] and [3, 1]: 3 + 4 and 2 + 1 tokens
    _, two = actor_update(2, 2)   # worker 0 [2, 3], worker 1 [0, 1]: 3 + 2 and 4 + 1 tokens
    # Token-weighted over micro-batches and workers (the entropy is a float32 statistic).
    for key, rel in (("ppo/policy_loss", 1e-9), ("ppo/approx_kl", 1e-9), ("ppo/entropy", 1e-6)):
        assert one[key] == pytest.approx(whole[key], rel=rel), key
        assert two[key] == pytest.approx(whole[key], rel=rel), key


def test_update_samples_drop_uniform_groups_and_fill_the_last_mini_batch():
    from rlhf.training.ppo import update_samples

    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])  # groups of 2: uniform, mixed, uniform
    assert update_samples(scores, 2, drop_uniform=False, mini_batch_size=2).tolist() == [0, 1, 2, 3, 4, 5]
    assert update_samples(scores, 2, drop_uniform=True, mini_batch_size=2).tolist() == [2, 3]
    # A mini-batch of 4 needs two more samples: the first dropped ones, in batch order.
    assert update_samples(scores, 2, drop_uniform=True, mini_batch_size=4).tolist() == [0, 1, 2, 3]
    assert update_samples(torch.zeros(4), 2, drop_uniform=True, mini_batch_size=2).tolist() == []
    assert update_samples(scores, 1, drop_uniform=True, mini_batch_size=2).tolist() == [0, 1, 2, 3, 4, 5]
