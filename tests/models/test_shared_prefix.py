"""Answers sharing one prompt row score exactly as in rows of their own."""

import pytest
import torch
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, Qwen2Config)

from rlhf.config import RewardLossConfig
from rlhf.config_sections import ModelConfig
from rlhf.data.rank_dataset import RankBatches, RankExample, collate_rank, collate_rank_shared, encode_rank
from rlhf.data.records import Message, RankRecord
from rlhf.models.reward import load_scalar_model
from rlhf.models.shared_prefix import attention_window, shared_prefix_attention_mask, shared_prefix_unsupported
from rlhf.training.reward import rank_loss, rank_scores


def test_mask_lets_each_answer_see_the_prompt_and_itself_only():
    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # answer 2 skips answer 1
        [1, 1, 0, 0, 0, 1],  # padding: the prompt and itself, never an empty row
    ], dtype=torch.bool)
    mask = shared_prefix_attention_mask(segments, "sdpa", torch.float32)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)
    additive = shared_prefix_attention_mask(segments, "eager", torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive[0, 0] == 0, expected)
    assert (additive[0, 0][~expected] == torch.finfo(torch.bfloat16).min).all()


def test_shared_row_layout_positions_and_score_index():
    # Prompt [5, 6], answers [7, 8, 2] and [9, 2]; a second prompt [4] with answers [3] and [].
    first = RankExample([[5, 6, 7, 8, 2], [5, 6, 9, 2]], [(0, 1)], None, prompt_length=2)
    second = RankExample([[4, 3], [4]], [(1, 0)], 0.5, prompt_length=1)
    batch = collate_rank_shared([first, second], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 2, 9, 2], [4, 3, 0, 0, 0, 0, 0]]
    assert batch.segment_ids.tolist() == [[0, 0, 1, 1, 1, 2, 2], [0, 1, -1, -1, -1, -1, -1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 0, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1] * 7, [1, 1, 0, 0, 0, 0, 0]]
    # Last tokens: 4 and 6 in row 0; row 1's answer [3] at 1, its empty answer at the prompt's end (0).
    assert batch.score_index.tolist() == [4, 6, 7 + 1, 7 + 0]
    assert batch.pair_index.tolist() == [[0, 1], [3, 2]] and batch.pair_group.tolist() == [0, 1]
    assert batch.pair_margin.tolist() == [0.0, 0.5] and batch.num_prompts == 2
    assert first.shared_length() == 7 and second.shared_length() == 2


def _records() -> list[RankRecord]:
    return [
        RankRecord([Message("user", "List 2 cats and say why.")], ["cat, lion", "cat", "dog, dog, and a much longer tail"],
                   [3.0, 2.0, 1.0]),
        RankRecord([Message("user", "Owls?")], ["owl", "two owls and an eagle", "none"], [1.0, 3.0, 2.0]),
    ]


def _scores_both_ways(model, tok, max_length=64):
    examples = [encode_rank(tok, r, max_length, 32) for r in _records()]
    separate = collate_rank(examples, tok.pad_token_id)
    shared = collate_rank_shared(examples, tok.pad_token_id)
    assert shared.input_ids.shape[0] == 2 and separate.input_ids.shape[0] == 6
    # The shared layout forwards fewer positions: the prompt once per prompt, not once per answer.
    assert int(shared.attention_mask.sum()) < int(separate.attention_mask.sum())
    return rank_scores(model, separate), rank_scores(model, shared), separate, shared


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_shared_scores_and_gradients_equal_one_row_per_answer(tiny_model_dir, implementation):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_scalar_model(ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), seed=0)
    model.config._attn_implementation = implementation
    separate_scores, shared_scores, separate, shared = _scores_both_ways(model, tok)
    torch.testing.assert_close(shared_scores, separate_scores, rtol=1e-5, atol=1e-5)
    assert separate_scores.std() > 1e-3  # the answers do score differently

    grads = []
    for batch in (separate, shared):
        model.zero_grad()
        rank_loss(model, batch, RewardLossConfig())[0].backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("config", [
    GPT2Config(vocab_size=600, n_positions=128, n_embd=32, n_layer=2, n_head=4),  # learned absolute positions
    Qwen2Config(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128),  # grouped KV heads, q/k/v biases
], ids=["gpt2", "qwen2"])
def test_shared_scores_match_for_other_architectures(tiny_model_dir, config):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        separate_scores, shared_scores, _, _ = _scores_both_ways(model, tok)
    torch.testing.assert_close(shared_scores, separate_scores, rtol=1e-5, atol=1e-5)


def test_sliding_window_models_keep_rows_within_the_window(tiny_model_dir):
    assert attention_window(AutoConfig.for_model("llama")) is None
    assert attention_window(AutoConfig.for_model("qwen2")) is None  # use_sliding_window is off by default
    assert attention_window(AutoConfig.for_model("mistral", sliding_window=64)) == 64
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [encode_rank(tok, r, 64, 32) for r in _records()]
    longest = max(e.shared_length() for e in examples)
    fits = RankBatches(examples, 2, tok.pad_token_id, seed=0, shuffle=False, share_prompt=True,
                       max_shared_length=longest)
    assert fits.batch(0, 0).shares_prompts
    too_long = RankBatches(examples, 2, tok.pad_token_id, seed=0, shuffle=False, share_prompt=True,
                           max_shared_length=longest - 1)
    assert not too_long.batch(0, 0).shares_prompts and too_long.batch(0, 0).input_ids.shape[0] == 6


def test_attention_without_a_4d_mask_is_reported_unsupported():
    config = AutoConfig.for_model("llama")
    config._attn_implementation = "sdpa"
    assert shared_prefix_unsupported(config) is None
    config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in shared_prefix_unsupported(config)


def test_rows_sharing_a_prompt_pack_behind_one_copy_of_it():
    from rlhf.models.shared_prefix import pack_shared_prompts

    # Prompt width 3, responses 2 wide. Rows 0 and 2 share [5, 6, 7]; row 1 has the left-padded
    # prompt [8, 9] (padding id 0) with a one-token answer, row 3 the same prompt padded with 1.
    sequences = torch.tensor([[5, 6, 7, 10, 11], [0, 8, 9, 12, 0], [5, 6, 7, 13, 14], [1, 8, 9, 15, 16]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    rows = pack_shared_prompts(sequences, mask, prompt_length=3)
    assert rows.slots == 2 and rows.input_ids.shape == (2, 3 + 2 * 2)
    # One packed row per prompt; each original row's answer in its own slot.
    by_prompt = {tuple(r[:3].tolist()): r for r in rows.input_ids}
    shared = by_prompt[(5, 6, 7)]
    assert shared.tolist() == [5, 6, 7, 10, 11, 13, 14]
    padded = next(r for key, r in by_prompt.items() if key != (5, 6, 7))
    assert padded[1:].tolist() == [8, 9, 12, 0, 15, 16]
    index = {tuple(r[:3].tolist()): i for i, r in enumerate(rows.input_ids)}
    first, second = index[(5, 6, 7)], 1 - index[(5, 6, 7)]
    assert rows.row_slots.tolist() == [first * 2, second * 2, first * 2 + 1, second * 2 + 1]
    assert rows.segment_ids[first].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert rows.segment_ids[second].tolist() == [-1, 0, 0, 1, -1, 2, 2]
    # Each answer's positions continue from its prompt's real tokens.
    assert rows.position_ids[first].tolist() == [0, 1, 2, 3, 4, 3, 4]
    assert rows.position_ids[second].tolist() == [0, 0, 1, 2, 3, 2, 3]
    # The outputs predicting slot 1's tokens sit at the prompt's end and slot 1's first column;
    # slot 2's at the prompt's end and slot 2's first column.
    assert rows.logits_positions.tolist() == [2, 3, 2, 5]
    assert rows.answers.tolist() == [[10, 11], [13, 14], [12, 0], [15, 16]] if first == 0 else \
        [[12, 0], [15, 16], [10, 11], [13, 14]]
    outputs = torch.arange(2 * 4).view(2, 4)  # (packed rows, logits positions)
    assert rows.unpack(rows.per_slot(outputs)).tolist() == [outputs[first, :2].tolist(), outputs[second, :2].tolist(),
                                             outputs[first, 2:].tolist(), outputs[second, 2:].tolist()]
    assert pack_shared_prompts(sequences[:2], mask[:2], prompt_length=3) is None
