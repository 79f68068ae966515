"""One process, no process group: the reference every sharded engine must match.

Mixed precision (`strategy.mixed_precision` bf16 or fp16, or auto where it resolves to one,
rlhf/distributed/precision.py): the weights stay fp32 and are what AdamW steps (fp32 master
weights and optimizer states; a model loaded in a low dtype is upcast first), and forwards run
under autocast (rlhf/models/autocast.py); frozen models (reference, reward model) compute the
same way. Autocast and bf16 compute copies of the weights (a bf16 module with an fp32 master
copy, as DeepSpeed's bf16 mode keeps) were both timed on a SmolLM2-width Llama (hidden 576,
vocabulary 49,152, tied head) forward + backward, AMD EPYC Zen 5 with avx512_bf16, on a machine
shared with other jobs (load 10-20), so only ratios within one run mean anything:
- 4 layers, 4 x 256 tokens, 2 threads, one pass each: fp32 1.56 s, autocast 0.72 s, bf16
  module 1.61 s (+0.12 s copying gradients and weights between the two);
- 2 layers, 2 x 256, best of 3 interleaved: 2 threads fp32 4.27, autocast 2.51, bf16 module
  1.79 s; 1 thread 3.40 / 1.40 / 1.22 s and 2.84 / 1.25 / 1.27 s.
Both beat fp32 by 2-2.7x; between the two the runs disagree, within the noise. Autocast is
used: it keeps no second copy of the state (checkpoints, export, LoRA and EMA read the fp32
module as before) and leaves the residual stream, norms and losses in fp32. On the
quickstart's tiny model (hidden 64, 2 layers, 8 x 128 tokens) autocast measured slower than
fp32 (74 against 58 ms): the casts outweigh products that small.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from rlhf.distributed import reshard
from rlhf.distributed.precision import LOW_PRECISION, resolve_precision
from rlhf.distributed.optim import OptimizerSpec, build_optimizer, build_scheduler
from rlhf.distributed.strategy import Strategy, TrainedModel
from rlhf.kernels.host_memory import release_fragments
from rlhf.distributed.gather import export_gathered
from rlhf.models.autocast import use_autocast
from rlhf.models.export import export_pretrained


SINGLE_WEIGHTS = "model.safetensors"
SINGLE_OPTIMIZER = "optimizer.pt"
"""A single-process checkpoint: the weights, then the optimizer and schedule state dicts."""


class SingleStrategy(Strategy):
    name = "single"

    def setup(self, seed: int) -> None:
        super().setup(seed)
        self.precision = resolve_precision(self.cfg.mixed_precision, self.device, self.probe_shape)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype of forwards, None for fp32."""
        return LOW_PRECISION.get(getattr(self, "precision", None) or
                                 resolve_precision(self.cfg.mixed_precision, self.device, self.probe_shape))

    def wrap(
        self, model: torch.nn.Module, spec: OptimizerSpec, accumulation: int = 1, micro_batch_size: int = 1
    ) -> TrainedModel:
        model.to(self.device)
        if self.compute_dtype is not None:
            model.float()  # the master weights AdamW steps
            use_autocast(model, self.compute_dtype)
        optimizer = build_optimizer(model, spec)
        return TrainedModel(model, optimizer, build_scheduler(optimizer, spec), spec.max_grad_norm, accumulation,
                            strategy=self)

    def freeze(self, model: torch.nn.Module) -> torch.nn.Module:
        model = super().freeze(model)
        if self.compute_dtype is not None:
            use_autocast(model, self.compute_dtype)
        return model

    def backward(self, model: TrainedModel, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, model: TrainedModel) -> float:
        params = [p for p in model.module.parameters() if p.requires_grad]
        max_norm = model.max_grad_norm if model.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if torch.isfinite(grad_norm):  # a NaN/inf gradient is dropped, never applied
            model.optimizer.step()
        model.scheduler.step()
        model.optimizer.zero_grad(set_to_none=True)
        release_fragments()
        return float(grad_norm)

    def save_state(self, model: TrainedModel, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in model.module.state_dict().items()}
        # Tied embeddings share storage; safetensors wants each tensor once.
        save_file(_dedupe(weights), directory / SINGLE_WEIGHTS)
        torch.save(
            {"optimizer": model.optimizer.state_dict(), "scheduler": model.scheduler.state_dict()},
            directory / SINGLE_OPTIMIZER,
        )

    def load_state(self, model: TrainedModel, directory: Path) -> None:
        """This strategy's checkpoint, or an FSDP2 one of any number of workers (reshard.py)."""
        if not (directory / SINGLE_WEIGHTS).is_file() and (directory / "dcp").is_dir():
            reshard.load_dcp(model.module, model.optimizer, directory / "dcp", alone=True)
            model.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
            return
        weights = load_file(directory / SINGLE_WEIGHTS, device=str(self.device))
        missing, unexpected = model.module.load_state_dict(weights, strict=False)
        if unexpected or any(not _is_tied(model.module, name) for name in missing):
            raise RuntimeError(f"checkpoint {directory} does not match the model: {missing or unexpected}")
        state = torch.load(directory / SINGLE_OPTIMIZER, weights_only=True, map_location=self.device)
        model.optimizer.load_state_dict(state["optimizer"])
        model.scheduler.load_state_dict(state["scheduler"])

    def export(self, model: TrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
               extra_files: dict | None = None) -> None:
        if hasattr(model.module, "merge_and_unload"):
            # LoRA: merged into a copy, so that training goes on with its adapters (a reward
            # model exports its best state mid-run).
            state = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}
            export_gathered(model.module, state, tokenizer, directory, extra_files)
            return
        export_pretrained(model.module, tokenizer, directory, extra_files=extra_files)


def _dedupe(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in weights.items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue
        seen[key] = name
        out[name] = tensor
    return out


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = tied.keys() if isinstance(tied, dict) else tied
    return any(name == t or name.endswith(t) for t in names)
