"""Mixed precision by autocast: a model whose weights stay fp32 (the master weights the
optimizer steps, with fp32 AdamW states) computes its forwards under `torch.autocast` in bf16
(or fp16). Linear layers and attention products run in the low dtype on casts of the weights
and activations; the residual stream, norms and losses stay fp32, as autocast's op lists say.
The single strategy uses it (rlhf/distributed/single.py), where DeepSpeed casts the module and
FSDP2 gathers low-precision weights.

`use_autocast(model, dtype)` registers a forward pre-hook that enters autocast and a forward
hook (run also when the forward raises) that leaves it, on the model and on each of its direct
submodules: the project calls some of those on their own, outside the model's forward (the
backbone and scalar head of a reward model or critic, rlhf/models/reward.py; the output layer
computing the fused LM loss, rlhf/kernels/lm_loss.py). Regions nest. Nothing rebinds a
forward; `print(model._forward_pre_hooks)` shows the hooks. The decode engine asks
`autocast_dtype` and generates under the same autocast (its Llama step computes from the
weights directly, rlhf/kernels/llama_step.py).
"""

from __future__ import annotations

import torch

_DTYPE = "_rlhf_autocast_dtype"


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (whose own forward calls it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype `use_autocast` gave `model` (or the model inside a PEFT wrapper), else None."""
    return getattr(model, _DTYPE, None) or getattr(_inner(model), _DTYPE, None)


def _hooks(device_type: str, dtype: torch.dtype):
    regions: list[torch.autocast] = []

    def enter(_module, _args) -> None:
        region = torch.autocast(device_type, dtype=dtype)
        region.__enter__()
        regions.append(region)

    def leave(_module, _args, _output) -> None:
        regions.pop().__exit__(None, None, None)

    enter.autocast = leave.autocast = True
    return enter, leave


def only_autocast_hooks(module: torch.nn.Module) -> bool:
    """`module` has no forward hooks but `use_autocast`'s (which change no result but its
    precision), e.g. for code that computes from its weights directly."""
    hooks = (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
    return all(getattr(hook, "autocast", False) for hook in hooks)


def use_autocast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Forwards of `model` (on its device, as placed now) under autocast in `dtype`; a model
    that has it already is left as it is."""
    if autocast_dtype(model) is not None:
        return
    device_type = next(model.parameters()).device.type
    inner = _inner(model)
    modules = {id(m): m for m in (model, inner, *inner.children())}
    for module in modules.values():
        enter, leave = _hooks(device_type, dtype)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)
    setattr(inner, _DTYPE, dtype)
