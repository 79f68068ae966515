"""Loading tokenizers and causal LMs: a local HF directory, a hub id, a GGUF file, or a tiny
model built from a config (see `rlhf/models/tiny.py`).

Where the weights go is the strategy's call, given as a `Placement`: whole on this process's
device; partitioned while they are built (`zero3`: DeepSpeed's zero.Init, which transformers
enters when an `HfDeepSpeedConfig` is alive during `from_pretrained`; a GGUF file is then read
into the partitions tensor by tensor, rlhf/models/gguf_partitioned.py); or not at all (`meta`:
the model is built on the meta device and carries `PendingWeights`, which the strategy loads
into the shards once it has sharded the model, rlhf/distributed/sharded_load.py). LoRA models
are placed the same way (rlhf/models/lora.py). Either way no worker holds the whole model of a
sharded run, except FSDP2's rank 0 for a moment where the weights are no local safetensors
directory (a hub id, a GGUF file: it loads them whole and broadcasts the shards).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from rlhf.config_sections import ModelConfig
from rlhf.data.template import ensure_chat_template
from rlhf.errors import UserError
from rlhf.models.checkpointing import enable_gradient_checkpointing

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (bf16 matmuls are far slower there) and bf16 on GPUs that have it."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def _gguf_location(cfg: ModelConfig, path: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name) as `from_pretrained` wants them."""
    if not cfg.gguf_file:
        return path, None
    gguf = Path(cfg.gguf_file)
    if gguf.is_absolute():
        if not gguf.is_file():
            raise UserError(f"model.gguf_file: {gguf}: file not found")
        return str(gguf.parent), gguf.name
    if _looks_local(path) and not (Path(path) / gguf).is_file():
        raise UserError(f"model.gguf_file: {Path(path) / gguf}: file not found")
    return path, cfg.gguf_file


def resolve_location(cfg: ModelConfig, path: str, field: str = "model.path") -> tuple[str, str | None]:
    """(location, gguf file) for `from_pretrained`: a missing local path is a user error, and
    the GGUF file applies only to the configured model path (not to a run's own exports)."""
    if _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise UserError(f"{field}: {path}: no such directory")
    return _gguf_location(cfg, path) if path == cfg.path else (path, None)


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `path` (default `cfg.tokenizer` or `cfg.path`), with a chat template
    (a documented fallback when the model has none) and a pad token set."""
    path = path or cfg.tokenizer or cfg.path
    location, gguf_file = resolve_location(cfg, path, "model.tokenizer" if cfg.tokenizer else "model.path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location,
            gguf_file=gguf_file,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except OSError as exc:
        raise UserError(f"cannot load the tokenizer from '{path}': {str(exc).splitlines()[0]}") from None
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer of '{path}' has no EOS token; responses could never end")
    _choose_pad_token(tokenizer)
    ensure_chat_template(tokenizer)
    return tokenizer


_PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


def _choose_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Prefer a pad token distinct from EOS (SmolLM2 ships pad == EOS): transformers' sequence
    classification pooling finds the last token by comparing with pad_token_id. Our own code
    never derives masks from pad ids, so falling back to EOS is still correct."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def detach_gguf_quantizer(model: PreTrainedModel) -> None:
    """GGUF weights are dequantised on load; detach the quantizer so save_pretrained works."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@dataclass(frozen=True)
class Placement:
    """How a strategy wants a model built (see the module docstring)."""

    mode: str = "whole"
    """whole, zero3 or meta."""
    zero_config: dict | None = None
    """zero3: the DeepSpeed config that zero.Init partitions by."""
    modify: Callable[[list[torch.nn.Parameter]], ContextManager] = field(default=lambda params: nullcontext())
    """A block in which rank 0 may change these parameters in place and every rank sees the
    change (DeepSpeed's GatheredParameters for partitioned ones)."""
    rank: int = 0
    """This process's rank: rank 0 reads what the others receive."""
    from_main: Callable[[list[int]], list[int]] = field(default=lambda values: values)
    """Rank 0's list of integers, on every rank: a collective, on the strategy's device (the
    other ranks' arguments are ignored)."""


WHOLE = Placement()


@dataclass
class PendingWeights:
    """The weights of a model built on the meta device, loaded once the strategy has sharded it."""

    location: str
    """A local directory (its safetensors files are read slice by slice) or anything else
    `load_whole` understands (a hub id, a GGUF file: rank 0 loads it whole and broadcasts)."""
    gguf_file: str | None
    load_whole: Callable[[], PreTrainedModel]
    """The model loaded whole on the CPU, as `Placement()` would."""
    fill_missing: Callable[[set[str]], dict[str, torch.Tensor]] = field(default=lambda missing: {})
    """Full values of the parameters the checkpoint lacks (a new scalar head, LoRA adapters),
    by their `checkpoint_name`, the same on every rank; a name it leaves out is an error."""
    checkpoint_name: Callable[[str], str] = field(default=lambda name: name)
    """The checkpoint's name of a parameter of the model (PEFT's tree renames the base weights,
    rlhf/models/lora.py)."""


SAFETENSORS_INDEX = "model.safetensors.index.json"


def local_safetensors(location: str, gguf_file: str | None) -> bool:
    """Whether the weights are a local directory of safetensors files (`model.safetensors` or
    an index of shards), which an FSDP2 rank reads its own rows of; anything else (a hub id, a
    GGUF file) rank 0 loads whole and broadcasts (rlhf/distributed/sharded_load.py)."""
    directory = Path(location)
    return not gguf_file and ((directory / SAFETENSORS_INDEX).is_file() or (directory / "model.safetensors").is_file())


def rank0_loads_whole(path: str, gguf_file: str | None) -> bool:
    """Whether FSDP2's rank 0 loads this model whole and broadcasts it (a GGUF file, a hub id, a
    directory without safetensors weights) rather than every rank reading its own rows. For
    the planner: a local path that does not exist yet (an earlier stage's export, written as
    safetensors) counts as read by rows."""
    if gguf_file:
        return True
    if os.path.isdir(os.path.expanduser(path)):
        return not local_safetensors(os.path.expanduser(path), None)
    return not _looks_local(path) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None


def model_kwargs(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """`from_pretrained` keywords of `cfg` (dtype: `dtype`, else `cfg.dtype` resolved for `device`)."""
    kwargs: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
                              "dtype": dtype or resolve_dtype(cfg.dtype, device)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs


def effective_placement(placement: Placement | None, cfg: ModelConfig, location: str,
                        gguf_file: str | None) -> Placement:
    """The placement that applies to this model: the strategy's, else whole. It holds for LoRA
    models (rlhf/models/lora.py renames their pending weights) and GGUF files: under FSDP2 rank 0
    loads the file whole and broadcasts the shards (rlhf/distributed/sharded_load.py), under
    ZeRO-3 they are read into the partitions tensor by tensor (rlhf/models/gguf_partitioned.py).
    Only GGUF architectures that transformers reads through its newer loader (not its GGUF
    name map) still load whole under ZeRO-3."""
    placement = placement or WHOLE
    if placement.mode == "zero3" and gguf_file:
        from rlhf.models.gguf_partitioned import supports

        if not supports(gguf_path(location, gguf_file, cfg.revision)):
            return WHOLE
    return placement


@contextmanager
def zero3_construction(placement: Placement) -> Iterator[None]:
    """transformers enters zero.Init in `from_pretrained` while an HfDeepSpeedConfig object is
    alive (it keeps only a weak reference): one lives for the block, and is gone after it, so
    nothing later mistakes itself for a ZeRO-3 run."""
    if placement.mode != "zero3":
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(placement.zero_config)
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


def build_empty(auto_class: type, location: str, gguf_file: str | None, kwargs: dict[str, Any],
                **config_overrides: Any) -> PreTrainedModel:
    """The model of `location`'s config on the meta device: no memory for its weights."""
    return _from_config(auto_class, location, gguf_file, kwargs, torch.device("meta"), **config_overrides)


def _from_config(auto_class: type, location: str, gguf_file: str | None, kwargs: dict[str, Any],
                 construction: ContextManager, **config_overrides: Any) -> PreTrainedModel:
    """The model of `location`'s config, built inside `construction` (the meta device, zero.Init)."""
    config_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code")}
    try:
        config = AutoConfig.from_pretrained(location, gguf_file=gguf_file, **config_kwargs, **config_overrides)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a model from '{location}': {str(exc).splitlines()[0]}") from None
    construct = {k: v for k, v in kwargs.items() if k in ("dtype", "attn_implementation", "trust_remote_code")}
    with construction:
        return auto_class.from_config(config, **construct)


def build_partitioned_from_gguf(auto_class: type, location: str, gguf_file: str, kwargs: dict[str, Any],
                                placement: Placement, **config_overrides: Any) -> tuple[PreTrainedModel, set[str]]:
    """A GGUF model under ZeRO-3: built partitioned (zero.Init), then its tensors dequantised on
    rank 0 one at a time and scattered into the partitions (rlhf/models/gguf_partitioned.py), and the
    names of the parameters the file lacks. transformers would build a GGUF model on the meta
    device and load it whole on every rank instead."""
    from rlhf.models.gguf_partitioned import load_gguf_partitioned

    # transformers enters zero.Init in `from_config` too while the HfDeepSpeedConfig lives.
    model = _from_config(auto_class, location, gguf_file, kwargs, zero3_construction(placement), **config_overrides)
    missing = load_gguf_partitioned(model, gguf_path(location, gguf_file, kwargs["revision"]), placement)
    return model, missing


def gguf_path(location: str, gguf_file: str, revision: str | None) -> str:
    """The GGUF file on this disk (a hub one from the cache, fetched if need be)."""
    from transformers.utils import cached_file

    try:
        return cached_file(location, gguf_file, revision=revision)
    except OSError as exc:
        raise UserError(f"model.gguf_file: {gguf_file}: {str(exc).splitlines()[0]}") from None


def load_causal_lm(
    cfg: ModelConfig, device: torch.device, path: str | None = None, dtype: torch.dtype | None = None,
    placement: Placement | None = None,
) -> PreTrainedModel:
    """Load the causal LM at `path` (default `cfg.path`) on `device`, placed as `placement`
    says (default: whole); dropout off unless training wants it is a caller decision;
    `trust_remote_code` only when the config says so."""
    path = path or cfg.path
    location, gguf_file = resolve_location(cfg, path)
    placement = effective_placement(placement, cfg, location, gguf_file)
    kwargs = model_kwargs(cfg, device, dtype)
    if placement.mode == "meta":
        model = build_empty(AutoModelForCausalLM, location, gguf_file, kwargs)
        model.pending_weights = PendingWeights(
            location, gguf_file, lambda: load_causal_lm(cfg, torch.device("cpu"), path, dtype))
    elif placement.mode == "zero3" and gguf_file:
        model, missing = build_partitioned_from_gguf(AutoModelForCausalLM, location, gguf_file, kwargs, placement)
        if missing:
            raise UserError(f"model.gguf_file: {gguf_file} holds no weights for {sorted(missing)[:5]}")
    else:
        try:
            with zero3_construction(placement):
                model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf_file, **kwargs)
        except OSError as exc:
            raise UserError(f"cannot load a model from '{path}': {str(exc).splitlines()[0]}") from None
        if gguf_file:
            detach_gguf_quantizer(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        model.config.use_cache = False
    # Partitioned parameters are already on the device zero.Init chose; meta ones have no data yet.
    return model.to(device) if placement.mode == "whole" else model


_CONFIG_DROPOUT_SUFFIXES = ("dropout", "dropout_prob", "pdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """Turn every dropout of `model` off, also in train mode.

    RLHF compares log-probs of the same tokens across models and passes (the PPO ratio, the
    KL to the reference): dropout would make them noisy, so every role runs without it.

    Dropout modules are not the only kind: many transformers models keep the rate as a plain
    float read in forward (Llama's attention stores `self.attention_dropout` and passes it to
    SDPA's `dropout_p` when training) or read it from the config at call time. So this zeroes
    `p` of every dropout module (`nn.Dropout`, `Dropout1d/2d/3d`, `AlphaDropout`, ...), every
    float attribute of a module whose name ends in `dropout`, and every float field of the
    model's configs (sub-configs included) ending in `dropout`, `dropout_prob` or `pdrop`
    (`attention_dropout`, `hidden_dropout`, `hidden_dropout_prob`, `resid_pdrop`, ...). The
    config change is saved with the model, like the weights.
    """
    from transformers import PretrainedConfig

    configs: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)
        config = vars(module).get("config")
        if isinstance(config, PretrainedConfig):
            configs[id(config)] = config
    seen: set[int] = set()
    pending = list(configs.values())
    while pending:
        config = pending.pop()
        if id(config) in seen:
            continue
        seen.add(id(config))
        for name, value in list(vars(config).items()):
            if isinstance(value, PretrainedConfig):  # a sub-config (text_config, vision_config, ...)
                pending.append(value)
            elif name.endswith(_CONFIG_DROPOUT_SUFFIXES) and isinstance(value, float):
                setattr(config, name, 0.0)
