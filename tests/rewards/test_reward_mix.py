"""mix_rewards by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.rewards.mix import mix_rewards


def test_the_weighted_sum_with_missing_weights_at_one():
    sources = {"model": torch.tensor([1.0, -2.0]), "http": torch.tensor([0.5, 0.5]), "m:f": torch.tensor([1.0, 0.0])}
    mixed = mix_rewards(sources, {"model": 2.0, "m:f": -1.0, "absent": 5.0})
    # sample 0: 2·1 + 1·0.5 - 1·1 = 1.5; sample 1: 2·(-2) + 1·0.5 - 1·0 = -3.5
    assert mixed.dtype == torch.float32 and mixed.tolist() == [1.5, -3.5]
    assert mix_rewards(sources, {}).tolist() == [2.5, -1.5]  # all weights 1


def test_nan_propagates_to_its_sample_only():
    mixed = mix_rewards({"model": torch.tensor([1.0, 2.0]), "m:f": torch.tensor([math.nan, 1.0])}, {"m:f": 0.5})
    assert mixed[0].isnan() and mixed[1] == 2.5  # 2 + 0.5·1


def test_a_source_of_weight_zero_is_left_out_nan_included():
    mixed = mix_rewards({"model": torch.tensor([1.0, 2.0]), "m:f": torch.tensor([math.nan, 7.0])}, {"m:f": 0.0})
    assert mixed.tolist() == [1.0, 2.0]


def test_mismatched_shapes_and_no_source_are_refused():
    with pytest.raises(ValueError, match="'http' has shape"):
        mix_rewards({"model": torch.zeros(2), "http": torch.zeros(3)}, {})
    with pytest.raises(ValueError, match="no reward source"):
        mix_rewards({}, {})
