"""The CPU engine's KV cache is sized to the rollout's answers, not to the host's memory."""

from types import SimpleNamespace

import torch

from rlhf.rollout.vllm_kv import MIN_BYTES, kv_bytes_per_token, rollout_kv_bytes, rollout_kv_cache_gib

SMOLLM2 = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)


def test_bytes_per_token_count_keys_and_values_of_every_layer_and_kv_head():
    # 2 (K and V) x 30 layers x 3 KV heads x head size 64 x 4 bytes
    assert kv_bytes_per_token(SMOLLM2, torch.float32) == 2 * 30 * 3 * 64 * 4
    assert kv_bytes_per_token(SimpleNamespace(**vars(SMOLLM2), head_dim=32), torch.bfloat16) == 2 * 30 * 3 * 32 * 2
    no_gqa = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    assert kv_bytes_per_token(no_gqa, torch.float32) == 2 * 2 * 4 * 16 * 4


def test_the_cache_holds_the_answers_in_whole_blocks_with_a_quarter_more():
    # 64 answers of 88 tokens -> 6 blocks of 16 = 96 tokens each
    assert rollout_kv_bytes(64, 88, 100_000) == int(1.25 * 64 * 96 * 100_000)
    assert rollout_kv_bytes(1, 16, 1) == MIN_BYTES  # a floor for tiny models
    gib = rollout_kv_cache_gib(SMOLLM2, torch.float32, 32, 84)
    assert 0.15 < gib < 0.2  # SmolLM2, 32 answers of 84 tokens: ~170 MiB, not 30% of the host (7 GiB here)
