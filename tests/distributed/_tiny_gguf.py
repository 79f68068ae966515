"""A tiny Llama GGUF file for the sharded-load tests, written with the gguf package: random
weights, the matrices as Q8_0 blocks (dequantised on load, as SmolLM2's Q4_1 ones are), the
norms as F32; no tokenizer (the tests load models only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 64, 2, 4, 2, 128, 256


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    kv_width = HIDDEN // HEADS * KV_HEADS
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)

    def matrix(name: str, rows: int, cols: int) -> None:
        values = rng.normal(0.0, 0.05, (rows, cols)).astype(np.float32)
        writer.add_tensor(name, quantize(values, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + rng.normal(0.0, 0.1, HIDDEN)).astype(np.float32))

    matrix("token_embd.weight", VOCAB, HIDDEN)
    for layer in range(LAYERS):
        block = f"blk.{layer}."
        norm(block + "attn_norm.weight")
        matrix(block + "attn_q.weight", HIDDEN, HIDDEN)
        matrix(block + "attn_k.weight", kv_width, HIDDEN)
        matrix(block + "attn_v.weight", kv_width, HIDDEN)
        matrix(block + "attn_output.weight", HIDDEN, HIDDEN)
        norm(block + "ffn_norm.weight")
        matrix(block + "ffn_gate.weight", INTERMEDIATE, HIDDEN)
        matrix(block + "ffn_up.weight", INTERMEDIATE, HIDDEN)
        matrix(block + "ffn_down.weight", HIDDEN, INTERMEDIATE)
    norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
