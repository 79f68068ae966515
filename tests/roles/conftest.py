"""What the role tests share: the tiny model as a causal LM and as a scalar-head model, and
rollouts built from token ids and an attention mask."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.config_sections import ModelConfig
from rlhf.models.reward import load_scalar_model
from rlhf.rollout.types import Rollout


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def scalar(tiny_model_dir):
    return load_scalar_model(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), seed=0).eval()


def _rollout_of(sequences: torch.Tensor, mask: torch.Tensor, prompt_length: int) -> Rollout:
    """A rollout of these rows: pad id 0 wherever `mask` is 0, every answer ended by EOS."""
    sequences = sequences.masked_fill(mask == 0, 0)
    return Rollout(sequences=sequences, attention_mask=mask, prompt_length=prompt_length,
                   response_mask=mask[:, prompt_length:].float(),
                   eos_found=torch.ones(sequences.shape[0], dtype=torch.bool))


@pytest.fixture
def rollout_of():
    """`rollout_of(sequences, mask, prompt_length)` -> Rollout (see `_rollout_of`)."""
    return _rollout_of
