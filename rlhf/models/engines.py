"""The transformers model inside a training engine's wrapper, whether a tensor is whole, and
sharded parameters gathered whole for a block."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from transformers import PreTrainedModel


def unwrap_engine(model: torch.nn.Module) -> torch.nn.Module:
    """The module a DeepSpeed engine (or DDP) wraps as `.module`, or `model` itself. Calling
    its submodules directly is fine (ZeRO-3 gathers through hooks on the submodules
    themselves). The engine forwards unknown attributes to the module, but not `config`,
    which is its own."""
    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def is_whole(tensor: torch.Tensor) -> bool:
    """Not a ZeRO-3 partition or a DTensor shard (FSDP2): the whole tensor, used as it is,
    without an engine's gathering or per-use gradient reduction."""
    return not hasattr(tensor, "ds_id") and type(tensor) in (torch.Tensor, torch.nn.Parameter)


def reshard_frozen(model: torch.nn.Module) -> None:
    """FSDP2 leaves the root's parameters (embeddings, final norm, heads) gathered after a
    forward, for the backward that reshards them; a frozen model has no backward, so without
    this every worker would keep them whole between scoring calls."""
    reshard = getattr(model, "reshard", None)
    if callable(reshard) and hasattr(model, "unshard"):  # an FSDPModule
        reshard()


@contextmanager
def whole_tensors(params: list[torch.nn.Parameter]) -> Iterator[list[torch.Tensor]]:
    """The whole, detached tensor of each parameter for the block: ZeRO-3 partitions gathered
    together (and partitioned again on exit), FSDP2 DTensors gathered one by one on their
    mesh's device, whole tensors as they are. A collective where any is sharded: every rank
    enters it with the same parameters."""
    from torch.distributed.tensor import DTensor

    partitioned = [param for param in params if hasattr(param, "ds_id")]
    if partitioned:
        import deepspeed  # only reached with ZeRO-3 parameters, i.e. DeepSpeed already imported

        gathered = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    else:
        gathered = nullcontext()
    with gathered:
        yield [_full_dtensor(param.detach()) if isinstance(param, DTensor) else param.detach() for param in params]


def _full_dtensor(param) -> torch.Tensor:
    """The whole tensor, gathered on the mesh's device: FSDP2's CPU offload keeps the shards
    in host memory, which NCCL cannot gather."""
    from torch.distributed.tensor import DTensor

    mesh = param.device_mesh
    local = param.to_local()
    if local.device.type != mesh.device_type:
        device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else \
            torch.device(mesh.device_type)
        param = DTensor.from_local(local.to(device), mesh, param.placements, run_check=False, shape=param.shape,
                                   stride=param.stride())
    return param.full_tensor()
