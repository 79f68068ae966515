"""The reward sources of a PPO step: reward functions and the reward service work on their own
thread while the step's forwards run, and their results and errors come back at `result()`."""

import time

import pytest
import torch

from rlhf.config import RewardConfig
from rlhf.data.prompt_dataset import PromptBatch
from rlhf.errors import UserError
from rlhf.roles.rewards import RewardSources
from rlhf.roles.team import score
from rlhf.rollout.types import Rollout


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


class _SlowReference:
    """Log-probs after half a second: a forward's worth of time."""

    def logprobs(self, rollout):
        time.sleep(0.5)
        return torch.zeros(rollout.response_mask.shape)


def _rollout(lengths):
    response_mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in lengths])
    sequences = torch.ones((len(lengths), 6), dtype=torch.long)
    attention_mask = torch.cat([torch.ones((len(lengths), 2)), response_mask], dim=1).long()
    return Rollout(sequences=sequences, attention_mask=attention_mask, prompt_length=2, response_mask=response_mask,
                   eos_found=torch.ones(len(lengths), dtype=torch.bool), logprobs=torch.zeros(response_mask.shape))


def test_reward_functions_run_while_the_forwards_do():
    sources = RewardSources(RewardConfig(functions=["rewardfns_for_tests:slow_length"], function_workers=2), None,
                            _Tokenizer())
    try:
        rollout = _rollout([3, 1])
        prompts = PromptBatch([[1, 1], [1, 1]], ["p", "q"], [{}, {}])
        sources(rollout, prompts.texts, prompts.fields)  # the workers started and warm
        started = time.monotonic()
        scored = score(rollout, None, _SlowReference(), None, sources, prompts, reuse_logprobs=True)
        seconds = time.monotonic() - started
        assert scored.scores.tolist() == [3.0, 1.0]
        # Half a second of reward and half a second of forward, side by side.
        assert seconds < 0.9, seconds
    finally:
        sources.shutdown()


def test_an_error_on_the_reward_thread_is_raised_at_result():
    sources = RewardSources(RewardConfig(functions=["rewardfns_for_tests:length"]), None, _Tokenizer())
    try:
        pending = sources.start(_rollout([2]), ["p"], [{"prompt": "clashes with the function's own argument"}])
        with pytest.raises(UserError, match="clashes"):
            pending.result()
        # The sources still work afterwards.
        assert sources(_rollout([2]), ["p"], [{}])[0].tolist() == [2.0]
    finally:
        sources.shutdown()
