"""Reward model: head init, where the score is read, and a faithful export."""

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.config_sections import ModelConfig
from rlhf.data.rank_dataset import collate_rank, encode_rank
from rlhf.data.records import Message, RankRecord
from rlhf.models.export import export_pretrained
from rlhf.models.reward import last_token_index, load_scalar_model, sequence_scores, token_values


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    return load_scalar_model(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), seed=0).eval()


def test_new_head_is_initialised_with_std_one_over_sqrt_d_plus_one(tiny_model_dir):
    model = load_scalar_model(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), seed=3)
    weight = model.score.weight
    d = weight.shape[-1]
    # 32 weights: the sample std is within ~40% of the target.
    assert weight.std().item() == pytest.approx(1 / math.sqrt(d + 1), rel=0.4)
    again = load_scalar_model(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), seed=3)
    assert torch.equal(weight, again.score.weight)


def test_last_token_index_for_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_score_is_the_value_at_the_last_real_token_whatever_the_padding(reward_model, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    long = tok("List 3 fruits in lowercase. apple, pear", add_special_tokens=False)["input_ids"]
    short = long[:5]
    pad = tok.pad_token_id
    right = torch.tensor([short + [pad] * (len(long) - 5), long])
    left = torch.tensor([[pad] * (len(long) - 5) + short, long])
    right_mask = (torch.arange(len(long)) < torch.tensor([[5], [len(long)]])).long()
    left_mask = right_mask.flip(-1) * torch.tensor([[1], [0]]) + right_mask * torch.tensor([[0], [1]])
    with torch.no_grad():
        s_right = sequence_scores(reward_model, right, right_mask)
        s_left = sequence_scores(reward_model, left, left_mask)
        alone = sequence_scores(reward_model, torch.tensor([short]), torch.ones(1, 5, dtype=torch.long))
        per_token = token_values(reward_model, right, right_mask)
    torch.testing.assert_close(s_right, s_left, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_right[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_token[0, 4], s_right[0])
    torch.testing.assert_close(per_token[1, -1], s_right[1])


def test_k_answers_give_k_sequences_and_their_untied_pairs(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = RankRecord([Message("user", "List 2 cats.")], ["cat, cat", "cat", "lion, tiger", "dog"], [1.0, 0.5, 2.0, 0.5])
    example = encode_rank(tok, record, max_length=64, max_prompt_length=32)
    assert len(example.sequences) == 4
    assert sorted(example.pairs) == sorted([(0, 1), (2, 0), (0, 3), (2, 1), (2, 3)])  # (1, 3) tie: no pair
    batch = collate_rank([example, example], tok.pad_token_id)
    assert batch.input_ids.shape[0] == 8 and batch.pair_index.shape == (10, 2)
    assert batch.pair_index[5:].tolist() == [[a + 4, b + 4] for a, b in example.pairs]
    assert batch.pair_group.tolist() == [0] * 5 + [1] * 5
    assert all(seq[-1] == tok.eos_token_id for seq in example.sequences)


def test_export_reloads_with_auto_sequence_classification(reward_model, tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reward_model.config.pad_token_id = tok.pad_token_id
    export_pretrained(reward_model, tok, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ours = load_scalar_model(ModelConfig(path=str(tmp_path / "rm")), torch.device("cpu"), seed=99).eval()
    ids = tok(["List 2 cats. cat, lion", "Name 3 owls."], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = sequence_scores(reward_model, ids["input_ids"], ids["attention_mask"])
        # Our loader keeps the trained head (no re-initialisation with the new seed).
        torch.testing.assert_close(sequence_scores(ours, ids["input_ids"], ids["attention_mask"]), expected)
        # Plain transformers reads the same score (pad differs from EOS in this tokenizer).
        torch.testing.assert_close(plain(**ids).logits.squeeze(-1), expected, rtol=1e-5, atol=1e-5)
