"""Reward placement and shaping, by hand."""

import pytest
import torch

from rlhf.algorithms.rewards import (
    RunningMoments,
    last_response_index,
    normalize_scores,
    place_scores,
    shape_rewards,
)
from rlhf.rollout.engine import finish_rollout, left_pad


def test_score_lands_on_eos_or_last_token_never_on_padding():
    # Two left-padded prompts; EOS id 2, pad id 0.
    prompt_ids, prompt_mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    responses = torch.tensor([[9, 2, 4, 4],    # EOS at 1 -> tokens after it become padding
                              [9, 9, 9, 9]])   # no EOS: cut at max_new_tokens, last token is 3
    rollout = finish_rollout(prompt_ids, prompt_mask, responses, eos_token_id=2, pad_token_id=0)
    assert rollout.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert rollout.responses.tolist() == [[9, 2, 0, 0], [9, 9, 9, 9]]
    assert rollout.eos_found.tolist() == [True, False]
    assert rollout.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert last_response_index(rollout.response_mask).tolist() == [1, 3]
    placed = place_scores(torch.tensor([0.5, -1.0]), rollout.response_mask)
    assert placed.tolist() == [[0, 0.5, 0, 0], [0, 0, 0, -1.0]]


def test_shaped_rewards_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.1, -0.2, 0.3, 9.0]])  # the 9.0 sits on padding and must not count
    rewards = shape_rewards(torch.tensor([2.0]), kl, mask, kl_coef=0.5)
    # -0.5*0.1, -0.5*(-0.2), -0.5*0.3 + 2.0, 0
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 1.85, 0.0]]))


def test_normalize_and_clip():
    out = normalize_scores(torch.tensor([3.0, -9.0, 1.0]), mean=1.0, std=2.0, clip=3.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -3.0, 0.0]))  # -5 clipped to -3


def test_running_moments_equal_the_batch_statistics_and_round_trip():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0, 11.0])
    moments = RunningMoments()
    moments.update(values[:2])
    moments.update(values[2:])
    assert moments.mean == pytest.approx(5.0)
    assert moments.std == pytest.approx(values.std().item())
    again = RunningMoments()
    again.load_state_dict(moments.state_dict())
    assert (again.mean, again.std, again.count) == (moments.mean, moments.std, 5)
