"""`iter_full_weights`: the trainer's policy as (Hugging Face name, whole tensor) pairs, for a
rollout engine that keeps its own copy of the weights (vLLM: `VLLMEngine.sync_weights`, and the
broadcast to engine actors).

The pairs come one module at a time: a module's own parameters are gathered whole (ZeRO-3:
`GatheredParameters`; FSDP2: each DTensor's `full_tensor()`, on its mesh's device), handed
out, and released before the next module's are gathered, so no rank ever holds the whole
model beyond its shard. For sharded models it is a collective: every rank iterates over all
of it, in the same order, whether or not it uses the tensors.

LoRA (PEFT): each adapted layer comes out merged, W + (α/r)·B·A for the active adapters,
under the base layer's name, without PEFT's prefixes (`base_model.model.`, `.base_layer`), and
the adapter matrices themselves are not sent: the engine serves a plain model.
"""

from __future__ import annotations

from typing import Iterator

import torch

from rlhf.models.engines import unwrap_engine, whole_tensors

PEFT_PREFIX = "base_model.model."


def hf_name(name: str) -> str:
    """A parameter's name in the plain model: PEFT's wrappers removed."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling")


def iter_full_weights(model: torch.nn.Module, world=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, whole detached tensor) of every parameter of the policy `model` (a training
    engine's wrapper, a PEFT model or a plain HF model), a module at a time. A yielded tensor
    may be a view of gathered storage: use it (copy it, send it) before asking for the next.
    `world` (the run's strategy) is accepted for the engines' call signature; the gathers run
    on each parameter's own process group and device."""
    root = unwrap_engine(model)
    lora_layers = [name for name, module in root.named_modules() if _is_lora_layer(module)]
    seen: set[int] = set()
    for module_name, module in root.named_modules():
        if any(module_name.startswith(layer + ".") for layer in lora_layers):
            continue  # inside an adapted layer: sent merged, with it
        if ".original_module" in f".{module_name}.":
            continue  # PEFT's frozen copy of a module it trains (modules_to_save)
        if module_name in lora_layers:
            yield from _merged_lora(module_name, module)
            continue
        params = [(name, param) for name, param in module.named_parameters(recurse=False) if id(param) not in seen]
        if not params:
            continue
        seen.update(id(param) for _, param in params)
        with whole_tensors([param for _, param in params]) as tensors:
            for (name, _), tensor in zip(params, tensors):
                yield hf_name(f"{module_name}.{name}" if module_name else name), tensor


def _merged_lora(module_name: str, layer: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """An adapted linear layer's weight with its active adapters folded in (PEFT's own merge,
    `get_delta_weight`, written out here: it would multiply DTensor shards)."""
    if any(getattr(layer, "use_dora", {}).get(name, False) for name in layer.lora_A):
        raise NotImplementedError(f"{module_name}: DoRA adapters cannot be merged for the rollout engine")
    base = layer.base_layer
    active = [name for name in layer.active_adapters if name in layer.lora_A] if not getattr(layer, "merged", False) else []
    parts = [base.weight] + [p for name in active for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
    bias = [base.bias] if getattr(base, "bias", None) is not None else []
    with whole_tensors(parts + bias) as tensors:
        weight = tensors[0]
        if active:
            weight = weight.clone()
            for index, name in enumerate(active):
                a, b = tensors[1 + 2 * index], tensors[2 + 2 * index]
                delta = (b.float() @ a.float()) * layer.scaling[name]
                weight += (delta.T if getattr(layer, "fan_in_fan_out", False) else delta).to(weight.dtype)
        yield hf_name(f"{module_name}.weight"), weight
        if bias:
            yield hf_name(f"{module_name}.bias"), tensors[-1]
