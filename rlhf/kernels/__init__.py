"""CPU speed-ups, applied to a model by one visible call: `accelerate(model, cfg.kernels)`.

Each keeps the model's parameters, state dict and results (to float rounding):
- linear layers computed by oneDNN or, for a few rows, by the transposed product
  (`CPULinear`, rlhf/kernels/cpu_linear.py);
- the language-model loss from hidden states and the head weight over chunks of tokens
  (`LossHead`, rlhf/kernels/fused_head.py), which `rlhf.training.lm.lm_forward_nll` calls;
- glibc's malloc tuned for repeated training steps (rlhf/kernels/host_memory.py), once per
  process.
The decode engine's Llama step (rlhf/kernels/llama_step.py) is chosen by the engine itself
from `kernels.llama_decode_step`. Nothing here sets environment variables or rebinds a
module's methods: layers get a subclass, visible in `print(model)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.config_sections import KernelsConfig
from rlhf.kernels import onednn
from rlhf.kernels.cpu_linear import use_cpu_linears
from rlhf.kernels.fused_head import use_fused_head_loss
from rlhf.kernels.host_memory import tune_host_memory


@dataclass
class Accelerated:
    """What `accelerate` did to one model."""

    cpu_linears: int = 0
    """Linear layers that are now `CPULinear`."""
    fused_lm_loss: bool = False
    """The output layer computes the LM loss itself (`LossHead`)."""


def configure_process(cfg: KernelsConfig) -> None:
    """The process-wide part: the CPU matmul kernels and glibc's malloc (the first call's
    host-memory setting stays for the life of the process)."""
    cfg = cfg.effective()
    onednn.set_cpu_matmul(cfg.cpu_matmul)
    # A GPU run's host memory holds no per-step tensors worth tuning for.
    tune_host_memory(cfg.tune_host_memory and not torch.cuda.is_available())


def accelerate(model: torch.nn.Module, cfg: KernelsConfig, lm_loss: bool = False) -> Accelerated:
    """Apply the kernels of `cfg` to `model` (in place). `lm_loss`: the model will be trained
    with a language-model loss (SFT, PPO-ptx), so its head may compute that loss."""
    configure_process(cfg)
    done = Accelerated()
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu:
        done.cpu_linears = use_cpu_linears(model)
    if lm_loss and cfg.fused_lm_loss:
        done.fused_lm_loss = use_fused_head_loss(model)
    return done
