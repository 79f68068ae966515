"""`rlhf eval`'s reward-model judge scores an answer as PPO's reward model scored the rollout:
at EOS where the policy ended the answer, at the last token where it was cut at max_new_tokens."""

import pytest
import torch

from rlhf.config_sections import DataSourceConfig, KernelsConfig, ModelConfig
from rlhf.data.builders import load_records
from rlhf.data.prompt_dataset import encode_prompt
from rlhf.data.template import answer_ids
from rlhf.evaluation.judges import RewardModelJudge
from rlhf.models.loading import load_tokenizer
from rlhf.models.reward import sequence_scores


def test_a_cut_answer_is_scored_without_eos_as_ppo_scores_it(tiny_model_dir, quickstart_data):
    device = torch.device("cpu")
    judge = RewardModelJudge(str(tiny_model_dir), device, max_length=96, max_prompt_length=64, batch_size=4,
                             kernels=KernelsConfig())
    tokenizer = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    records, _ = load_records("prompt", DataSourceConfig(path=quickstart_data["prompts_eval"]), "raise")
    records = records[:3]
    answers = ["apple pear", "two apples", "pear"]

    # What the rollout holds: the prompt as PPO encodes it, then the answer's tokens, with or
    # without the EOS that closes it; the reward model reads the last token.
    @torch.no_grad()
    def rollout_score(record, answer, closed: bool) -> float:
        ids = answer_ids(tokenizer, record.prompt, answer)
        assert ids[-1] == tokenizer.eos_token_id
        sequence = encode_prompt(tokenizer, record, 64) + (ids if closed else ids[:-1])
        tensor = torch.tensor([sequence])
        return float(sequence_scores(judge.model, tensor, torch.ones_like(tensor)))

    finished = [True, False, False]
    scores = judge(records, answers, finished)
    expected = [rollout_score(r, a, done) for r, a, done in zip(records, answers, finished)]
    assert scores == pytest.approx(expected, abs=1e-4)
    # The EOS matters to the score (else this test could not tell the two encodings apart), and
    # without flags every answer is read as finished.
    closed = judge(records, answers)
    assert closed[0] == pytest.approx(scores[0], abs=1e-4)
    assert closed[1:] == pytest.approx([rollout_score(r, a, True) for r, a in zip(records[1:], answers[1:])], abs=1e-4)
    assert all(abs(c - s) > 1e-3 for c, s in zip(closed[1:], scores[1:]))
