"""Held-out evaluation scores the distribution it sampled from: with `eval.temperature` set,
the policy's and the reference's log-probs behind eval/kl are taken at that temperature, not
at the rollout temperature."""

from __future__ import annotations

import torch

from rlhf.data.prompt_dataset import PromptBatch
from rlhf.roles.evaluate import evaluate_policy
from rlhf.rollout.engine import SamplingParams, finish_rollout


class _Role:
    """Answers with fixed log-probs, recording the temperature each call asked for."""

    def __init__(self, logprob: float, rollout=None):
        self.logprob, self.rollout, self.temperatures = logprob, rollout, []

    def generate(self, prompts, params, seed=None):
        return self.rollout

    def logprobs(self, rollout, temperature=None):
        self.temperatures.append(temperature)
        return torch.full(rollout.response_mask.shape, self.logprob)

    def scores(self, rollout):
        return torch.zeros(len(rollout.sequences))

    def __call__(self, rollout, prompts, fields):  # as RewardSources: (mixed, sources)
        return self.scores(rollout), {}


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_eval_kl_is_taken_at_the_eval_temperature():
    # Two prompts, responses of 2 and 3 tokens (EOS = 9).
    rollout = finish_rollout(torch.tensor([[1, 2], [3, 4]]), torch.ones(2, 2, dtype=torch.long),
                             torch.tensor([[5, 9, 0], [6, 7, 9]]), eos_token_id=9, pad_token_id=0)
    actor, reference = _Role(-1.0, rollout), _Role(-1.5)
    params = SamplingParams(max_new_tokens=3, temperature=0.5)
    prompts = PromptBatch([[1, 2], [3, 4]], ["a", "b"], [{}, {}])
    metrics, rows = evaluate_policy(actor, reference, _Role(0.0), _Tokenizer(), prompts, params, gold_reward=None,
                                    seed=0)
    assert actor.temperatures == [0.5] and reference.temperatures == [0.5]
    # KL per answer = sum over its tokens of (-1.0 - -1.5) = 0.5 x length: (1.0 + 1.5) / 2.
    assert metrics["eval/kl"] == 1.25 and [r["kl"] for r in rows] == [1.0, 1.5]
    assert metrics["eval/response_length"] == 2.5
