"""bf16 against fp32: one forward and backward of the tiny model on the device, once in fp32
and once under bf16 autocast (as training runs with `mixed_precision: bf16`), from the same
weights and batch. The loss and the gradient norm must agree within stated tolerances.

Tolerances: bf16 keeps 8 bits of mantissa (a relative rounding of 2^-9 ≈ 0.2% per value);
through two layers and a 384-way softmax the loss drifts by well under 1% and the gradient
norm, a sum over every weight's gradient, by a few percent. Measured on an AVX-512 bf16 CPU:
about 1e-3 and 1e-2. A kernel that computes bf16 wrongly is off by far more.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.config_sections import TinyModelConfig
from rlhf.models.tiny import build_tiny_model

LOSS_TOLERANCE = 0.01
"""Largest relative difference of the loss, bf16 autocast against fp32."""
GRAD_NORM_TOLERANCE = 0.05
"""Largest relative difference of the global gradient norm."""


def tiny_model(device: torch.device, hidden: int = 64, layers: int = 2, vocab: int = 384) -> torch.nn.Module:
    cfg = TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=4, intermediate_size=4 * hidden,
                          vocab_size=vocab)
    return build_tiny_model(cfg, vocab, pad_token_id=0, eos_token_id=1, seed=0).to(device)


def _loss_and_grad_norm(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    norms = torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), float(torch.linalg.vector_norm(norms))


def bf16_parity(device: torch.device, batch: int = 4, length: int = 64) -> dict[str, Any]:
    """Losses, gradient norms and their relative differences; `ok` when within tolerance."""
    model = tiny_model(device)
    ids = torch.randint(2, 384, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    loss32, norm32 = _loss_and_grad_norm(model, ids, bf16=False)
    loss16, norm16 = _loss_and_grad_norm(model, ids, bf16=True)
    loss_rel = abs(loss16 - loss32) / abs(loss32)
    norm_rel = abs(norm16 - norm32) / abs(norm32)
    return {"loss_fp32": loss32, "loss_bf16": loss16, "loss_rel_diff": loss_rel, "grad_norm_fp32": norm32,
            "grad_norm_bf16": norm16, "grad_norm_rel_diff": norm_rel,
            "ok": loss_rel <= LOSS_TOLERANCE and norm_rel <= GRAD_NORM_TOLERANCE}
