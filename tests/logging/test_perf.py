"""perf/mfu bookkeeping: 2·N FLOPs per forward token, 6·N per training token, N without an
untied input embedding; device peaks by name."""

from __future__ import annotations

import pytest
import torch

from rlhf.logging import perf


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def test_n_leaves_out_an_untied_input_embedding_only():
    untied, tied = tiny_llama(False), tiny_llama(True)
    all_untied = sum(p.numel() for p in untied.parameters())
    assert perf.matmul_parameters(untied) == all_untied - 50 * 16
    assert perf.matmul_parameters(tied) == sum(p.numel() for p in tied.parameters())  # the head is the table


def test_flops_are_2n_per_forward_token_and_6n_per_training_token():
    model = tiny_llama(False)
    n = perf.matmul_parameters(model)
    meter = perf.PerfMeter([model], peak_flops=1.0)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        model(input_ids=ids)
    assert meter.flops == 2 * n * 10
    model(input_ids=ids).logits.sum().backward()
    assert meter.flops == 2 * n * 10 + 6 * n * 10
    row = meter.take()
    assert row["perf/mfu"] > 0 and row["perf/peak_memory_gb"] > 0 and meter.flops == 0
    meter.close()
    model(input_ids=ids)
    assert meter.flops == 0  # hooks removed


def test_frozen_model_counts_forward_only_even_with_grad_enabled():
    model = tiny_llama(True).requires_grad_(False)
    meter = perf.PerfMeter([model])
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert meter.flops == 2 * perf.matmul_parameters(model) * 4
    meter.close()


@pytest.mark.parametrize("name, expected", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                            ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
                                            ("Tesla T4", None)])
def test_gpu_peak_by_name(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert perf.device_peak_flops(torch.device("cuda", 0)) == expected
    assert perf.device_peak_flops(torch.device("cuda", 0), configured=1e15) == 1e15


def test_cpu_peak_is_measured_once_with_the_kernels_in_use():
    peak = perf.device_peak_flops(torch.device("cpu"))
    assert 1e9 < peak < 1e14 and perf.device_peak_flops(torch.device("cpu")) == peak  # cached
    # The same product, timed here, cannot run much faster than the measured peak.
    a = torch.randn(perf.PEAK_SIZE, perf.PEAK_SIZE)
    from rlhf.kernels.cpu_linear import cpu_linear

    import time
    started = time.perf_counter()
    cpu_linear(a, a)
    assert 2 * perf.PEAK_SIZE**3 / (time.perf_counter() - started) < 1.5 * peak


def test_a_bf16_run_takes_mfu_against_the_bf16_peak(monkeypatch):
    timed = []
    monkeypatch.setattr(perf, "cpu_peak_flops", lambda threads, dtype=torch.float32: timed.append(dtype) or
                        (4e11 if dtype == torch.bfloat16 else 2e11))
    model = tiny_llama(True)
    assert perf.PerfMeter([model], compute_dtype=torch.bfloat16).peak == 4e11
    assert perf.PerfMeter([model]).peak == 2e11
    assert timed == [torch.bfloat16, torch.float32]


def test_the_cpu_peak_times_products_in_the_runs_dtype(monkeypatch):
    from rlhf.kernels import cpu_linear

    seen = []
    monkeypatch.setattr(cpu_linear, "cpu_linear", lambda a, b: seen.append((a.dtype, b.dtype)) or a)
    for dtype in (torch.float32, torch.bfloat16):
        seen.clear()
        assert perf.cpu_peak_flops.__wrapped__(1, dtype) > 0  # uncached: the product above, untimed
        assert seen and set(seen) == {(dtype, dtype)}


def test_padding_of_a_2d_mask_is_not_counted_a_4d_mask_counts_every_position():
    model = tiny_llama(True).requires_grad_(False)
    n = perf.matmul_parameters(model)
    meter = perf.PerfMeter([model], peak_flops=1.0)
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # 10 real tokens of 12
    model(input_ids=ids, attention_mask=mask)
    assert meter.flops == 2 * n * 10
    meter.flops = 0
    full = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    model(input_ids=ids, attention_mask=full)
    assert meter.flops == 2 * n * 12
    meter.close()
