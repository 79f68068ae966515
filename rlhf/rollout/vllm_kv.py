"""The KV cache a vLLM engine on the CPU gets when rollout.vllm.kv_cache_gib is unset: what its
calls can hold at once, not a share of the host's memory.

On a GPU the cache is the device memory `gpu_memory_utilization` leaves, taken once and put to
sleep between rollouts. On the CPU vLLM's sleep does nothing, so the engine frees its cache after
each rollout and allocates it again before the next (rlhf/rollout/vllm_sampler.py); a cache
sized as 30% of 24 GiB host memory cost ~1.5 s of page faults per PPO iteration of the tiny
benchmark model, against 0.06 s of generation (BENCHMARKS.md, "vLLM as the rollout engine").
The cache holds `sequences` answers of max_model_len tokens each (vLLM never schedules more at
once than a call brings: rollout.batch_size), in whole blocks, with a quarter more for the
block tables' rounding."""

from __future__ import annotations

import math
from typing import Any

import torch

BLOCK_TOKENS = 16
"""vLLM's KV block size on the CPU backend (tokens)."""
MIN_BYTES = 64 << 20


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Keys and values of one token over every layer, for a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def rollout_kv_bytes(sequences: int, max_model_len: int, bytes_per_token: int) -> int:
    """Bytes of KV cache for `sequences` answers of `max_model_len` tokens at once."""
    tokens = sequences * math.ceil(max_model_len / BLOCK_TOKENS) * BLOCK_TOKENS
    return max(int(1.25 * tokens * bytes_per_token), MIN_BYTES)


def rollout_kv_cache_gib(config: Any, dtype: torch.dtype, sequences: int, max_model_len: int) -> float:
    """`rollout_kv_bytes` in GiB for a transformers config and the engine's dtype."""
    return rollout_kv_bytes(sequences, max_model_len, kv_bytes_per_token(config, dtype)) / 2**30
