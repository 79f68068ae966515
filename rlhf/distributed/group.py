"""What the multi-process engines (DeepSpeed, FSDP2) share: launch detection, the process
group, metric reduction, the backward-count contract and rank-0 export."""

from __future__ import annotations

import atexit
from abc import abstractmethod
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.distributed import env
from rlhf.distributed.precision import cpu_bf16_probe, resolve_precision
from rlhf.distributed.strategy import REDUCE_OPS, Strategy, TrainedModel, seed_everything
from rlhf.errors import UserError


class DistributedStrategy(Strategy):
    """What the multi-process engines share. A world of one (no launcher) still gets a
    process group, so a sharded engine also runs as one plain process.

    The process group lives as long as the process: the first `setup` creates it, later ones
    (the next stage of a pipeline run in the same process) reuse it, and it is destroyed at
    exit. DeepSpeed caches its groups on first use, so a destroyed and re-created group would
    break a second DeepSpeed stage in the same process."""

    backend: str = "gloo"
    local_rank: int = 0

    def setup(self, seed: int) -> None:
        launch = env.detect_launch()
        env.export_single_process_env(launch)
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank
        self.device, self.backend = env.pick_device(launch.local_rank)
        if self.device.type == "cpu":
            env.configure_cpu_threads(launch)
        if not torch.distributed.is_initialized():
            kwargs = {"device_id": self.device} if self.backend == "nccl" else {}
            torch.distributed.init_process_group(self.backend, init_method="env://", rank=self.rank,
                                                 world_size=self.world_size, **kwargs)
            atexit.register(_destroy_process_group)
        seed_everything(seed)
        self.precision = self._agreed_precision()

    def _agreed_precision(self) -> str:
        """strategy.mixed_precision as this worker resolves it (auto: a timing on the CPU,
        rlhf/distributed/precision.py), the same on every worker, else a UserError: workers
        computing in different precisions would not give one model."""
        precision = resolve_precision(self.cfg.mixed_precision, self.device, self.probe_shape)
        votes = self.all_reduce({name: float(precision == name) for name in ("no", "bf16", "fp16")}, op="sum")
        if votes[precision] < self.world_size:
            raise UserError(
                f"strategy.mixed_precision={self.cfg.mixed_precision} resolves differently on the workers "
                f"({', '.join(f'{int(n)} {name}' for name, n in votes.items() if n)}; this one: "
                f"{cpu_bf16_probe(shape=self.probe_shape).reason}); set strategy.mixed_precision=bf16 or no")
        return precision

    def teardown(self) -> None:
        """Wait for every worker; the process group itself is destroyed at exit."""
        if torch.distributed.is_initialized():
            self.barrier()

    def barrier(self) -> None:
        if self.backend == "nccl":
            torch.distributed.barrier(device_ids=[self.device.index])
        else:
            torch.distributed.barrier()

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce op must be one of {', '.join(REDUCE_OPS)}, not {op!r}")
        keys = sorted(values)
        # float64: token counts stay exact and sums of losses lose nothing. On the process
        # group's device: NCCL reduces CUDA tensors only.
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(tensor, op=reduce_op)
        if op == "mean":
            tensor /= self.world_size
        return dict(zip(keys, tensor.tolist()))

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        # On the process group's device (NCCL gathers CUDA tensors only), back where it came from.
        local = tensor.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, local.contiguous())
        return [part.to(tensor.device) for part in parts]

    def from_main(self, values: list[int]) -> list[int]:
        """Rank 0's list of integers on every rank (the others' `values` are ignored): its length,
        then its elements, broadcast on the process group's device."""
        length = torch.tensor([len(values)], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(length, src=0)
        data = torch.tensor(values if self.rank == 0 else [0] * int(length), dtype=torch.int64, device=self.device)
        if data.numel():
            torch.distributed.broadcast(data, src=0)
        return data.tolist()

    # -- loss contract ------------------------------------------------------------------
    def _count_backward(self, model: TrainedModel) -> bool:
        """Count a backward pass; True when it is the last one before `step`."""
        if model.pending_backwards >= model.accumulation:
            raise RuntimeError(
                f"{model.pending_backwards + 1} backward passes before step, but the model was wrapped "
                f"with accumulation={model.accumulation}; pass the real count to Strategy.wrap"
            )
        model.pending_backwards += 1
        return model.pending_backwards == model.accumulation

    def _check_step(self, model: TrainedModel) -> None:
        if model.pending_backwards != model.accumulation:
            raise RuntimeError(
                f"step after {model.pending_backwards} backward passes, but the model was wrapped with "
                f"accumulation={model.accumulation}"
            )
        model.pending_backwards = 0

    # -- export -------------------------------------------------------------------------
    @abstractmethod
    def full_state_dict(self, model: TrainedModel) -> dict[str, torch.Tensor]:
        """Every worker calls this; rank 0 gets the complete weights on CPU, the others {}."""

    def export(self, model: TrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
               extra_files: dict | None = None) -> None:
        state = self.full_state_dict(model)
        error: Exception | None = None
        if self.is_main:
            from rlhf.distributed.gather import export_gathered

            try:
                export_gathered(self.unwrap(model), state, tokenizer, directory, extra_files)
            except Exception as exc:  # raised below on rank 0, after the others know (no hang)
                error = exc
        if self.all_reduce({"failed": float(error is not None)}, op="max")["failed"]:
            if error is not None:
                raise error
            raise UserError(f"the export to {directory} failed on rank 0 (its message says why)")


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
