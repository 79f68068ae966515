"""Throughput numbers every logged row gets: model FLOPs utilisation and peak memory.

MFU follows the PaLM paper's definition (Chowdhery et al. 2022, appendix B): the FLOPs the
model needs for the tokens it processed, over the time taken, over the device's peak. A
forward pass costs 2·N FLOPs per token and a training step (forward + backward) 6·N (Kaplan
et al. 2020), N being the parameters that take part in matrix products (the input embedding
table is a lookup, so it is left out unless tied to the output head). Attention's own
FLOPs and recomputation under gradient checkpointing are not counted, as MFU asks.

Tokens are counted by a forward pre-hook on each model's transformer backbone, which every
forward of the project goes through (training, evaluation, generation with its KV cache,
reference log-probs, reward and value heads), so SFT, RM and PPO are measured the same way
without the stages counting anything. A pass with gradients enabled on a model with
trainable weights counts as training (6·N per token); any other pass as a forward (2·N).
Padding is not a token the model needs: with a 2-D attention mask only its attended positions
count. (A ready 4-D mask, as the reward model's shared-prompt rows use, carries no per-token
padding flag, so those rows count whole; their padding is at most the micro-batch's spread of
row lengths.)

The CPU's peak is measured once per process (`cpu_peak_flops`): square products through the
kernels the linear layers use (rlhf/kernels), with the threads this process trains with, in
the dtype the run computes in (bf16 under mixed precision, where a CPU with bf16 instructions
multiplies 2-7x faster than in fp32: MFU against the fp32 peak would flatter a bf16 run). A
fixed number cannot serve: the processors this runs on differ by 3x in fp32 throughput, and
against a slower machine's peak a fast one reports MFU above 1.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from typing import Sequence

import torch
import torch.utils._python_dispatch
import torch.utils._pytree

from rlhf.models.engines import unwrap_engine

PEAK_SIZE = 1024
"""Side of the square products timed for the CPU peak: large enough for the kernels' steady
rate, small enough that the four products (2 GFLOP each) take a fraction of a second."""

GPU_PEAK_FLOPS = (  # dense bf16 tensor-core FLOP/s from the vendor data sheets; first match wins
    ("H100 PCIE", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


@functools.cache
def cpu_peak_flops(threads: int, dtype: torch.dtype = torch.float32) -> float:
    """The best of three timings of a PEAK_SIZE³ product in `dtype`, after a warm-up, through
    the kernel CPU linear layers use (oneDNN or the BLAS in fp32, oneDNN in bf16, see
    rlhf/kernels/cpu_linear.py)."""
    from rlhf.kernels.cpu_linear import cpu_linear

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(PEAK_SIZE, PEAK_SIZE, generator=generator).to(dtype)
    b = torch.randn(PEAK_SIZE, PEAK_SIZE, generator=generator).to(dtype)
    with torch.no_grad():
        cpu_linear(a, b)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            cpu_linear(a, b)
            best = min(best, time.perf_counter() - started)
    return 2 * PEAK_SIZE**3 / best


def device_peak_flops(device: torch.device, configured: float | None = None,
                      dtype: torch.dtype = torch.float32) -> float | None:
    """Peak FLOP/s of one device: the configured value, else a known GPU by name (dense bf16),
    else the CPU's measured peak in `dtype` (the run's compute dtype); None for a GPU this
    table does not know."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return cpu_peak_flops(torch.get_num_threads(), dtype)
    name = torch.cuda.get_device_name(device).upper()
    for key, flops in GPU_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: the most memory tensors have held on `device`. CPU: the process's resident-set
    high-water mark: Linux's VmHWM, of this program's own address space (ru_maxrss keeps the
    peak of the process it was exec'd from, e.g. a large launcher), else ru_maxrss (KiB on
    Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = unwrap_engine(model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def matmul_parameters(model: torch.nn.Module) -> int:
    """N of 6·N·tokens: unique parameters minus an untied input embedding table. ZeRO-3
    partitions report their full size through `ds_numel`."""
    model = _unwrap(model)
    unique = {id(p): p for p in model.parameters()}
    size = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
    total = sum(size(p) for p in unique.values())
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if get_in else None
    head = get_out() if get_out else None
    if embedding is not None and (head is None or head.weight is not embedding.weight):
        total -= size(embedding.weight)
    return total


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    model = _unwrap(model)
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, torch.nn.Module) else model


def _tokens(args: tuple, kwargs: dict) -> int:
    """Tokens of one forward: the attended positions of a 2-D attention mask, else every input
    position (see the module doc)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int(mask.count_nonzero())
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is None and kwargs.get("inputs_embeds") is not None:
        return int(kwargs["inputs_embeds"].shape[:-1].numel())
    return int(ids.numel()) if ids is not None else 0


class PerfMeter:
    """Counts model FLOPs of the given models' forward passes; `take()` returns perf/mfu over
    the time since the previous call (or since construction) and perf/peak_memory_gb."""

    def __init__(self, models: Sequence[torch.nn.Module], peak_flops: float | None = None,
                 compute_dtype: torch.dtype | None = None):
        """`compute_dtype`: what the forwards compute in (bf16 under mixed precision), whose
        peak MFU is taken against; None: fp32."""
        self.flops = 0.0
        self.dtype = compute_dtype or torch.float32
        self._handles = []
        self.device = torch.device("cpu")
        for model in models:
            params = [p for p in model.parameters()]
            if params:
                self.device = params[0].device
            n = matmul_parameters(model)
            trainable = any(p.requires_grad for p in params)
            self._handles.append(_backbone(model).register_forward_pre_hook(self._hook(n, trainable), with_kwargs=True))
        self.peak = device_peak_flops(self.device, peak_flops, self.dtype)
        self.measured = self.device.type != "cuda" and not peak_flops
        """The peak is this process's own timing (a CPU without a configured peak)."""
        self._since = time.perf_counter()

    def _hook(self, n: int, trainable: bool):
        def count(module, args, kwargs):
            factor = 6 if trainable and torch.is_grad_enabled() else 2
            self.flops += factor * n * _tokens(args, kwargs)

        return count

    def take(self) -> dict[str, float]:
        now = time.perf_counter()
        row = {"perf/peak_memory_gb": round(peak_memory_gb(self.device), 4)}
        if self._handles and self.peak:
            achieved = self.flops / max(now - self._since, 1e-9)
            if achieved > self.peak and self.measured:
                # The peak was timed while something else held the cores: time it again.
                cpu_peak_flops.cache_clear()
                self.peak = max(self.peak, cpu_peak_flops(torch.get_num_threads(), self.dtype))
            row["perf/mfu"] = achieved / self.peak
        self.flops, self._since = 0.0, now
        return row

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """While active, the size in bytes of the largest tensor any operation outputs: an exact,
    repeatable measure of how a phase's memory scales on the CPU, where the allocator's
    resident set also moves with caching and fragmentation."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())
        return out
