"""Memory/batch planner: `rlhf plan STAGE --config FILE` estimates, before anything is loaded,
the memory each worker needs for the chosen strategy and batch sizes, and refuses (exit 3) a
config that cannot fit, with the changes that would make it fit.

The model is never loaded: its config is read (`config.json`, or a GGUF header) and the model
is instantiated on the meta device to count parameters exactly. Everything else is arithmetic:

- Weights, gradients and AdamW states follow the ZeRO paper's accounting (Rajbhandari et al.
  2020, sec. 3.1): mixed-precision Adam holds 2 + 2 + 12 bytes per parameter (16-bit weights
  and gradients; fp32 master weights, momentum and variance). ZeRO stage 1 shards the
  optimizer states over the workers, 2 also the gradients, 3 also the weights; FSDP2 shards
  all three. Offload moves the optimizer (and, for parameters, the weights) to CPU memory.
- Activations of one decoder layer for a micro-batch of b sequences of s tokens, hidden size
  h and a attention heads, without recomputation: s*b*h*(34 + 5*a*s/h) bytes at 16-bit
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  sec. 4.1), twice that in fp32. flash_attention_2 never stores the a*s*s score matrices, so
  the 5*a*s/h term is dropped for it. With gradient checkpointing each layer keeps only its
  input (2*s*b*h bytes at 16-bit) and one layer's full activations are live during its
  recomputation. The loss adds fp32 logits: tokens x vocab x 4 bytes.
- Generation keeps a KV cache of 2 x layers x batch x tokens x (kv heads x head dim) elements.

What the code of this project does decides the details: the `single` strategy trains in
model.dtype (strategy.mixed_precision is DeepSpeed's and FSDP's), the reward model stage never
applies LoRA, PPO's critic is never LoRA, and PPO's reference and reward model are unsharded
frozen copies in their model.dtype on every worker that holds them.

Phases that do not overlap (a training micro-batch, generation, each forward pass of the
experience step) are peaks: the total counts resident memory plus the largest phase. A safety
margin (`SAFETY_MARGIN`) of the device memory is kept for what the estimate leaves out (CUDA
context, kernel workspaces, allocator fragmentation, communication buffers).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from rlhf.config_sections import LoraConfig, ModelConfig, StrategyConfig
from rlhf.errors import ConfigError, UserError

GiB = 2**30
SAFETY_MARGIN = 0.10
"""Fraction of the device memory the plan keeps free."""
LOGIT_BYTES = 4
"""Bytes per logit of the loss (computed in fp32)."""
GATHERED_LAYERS = 2
"""Transformer layers whose full weights ZeRO-3 / FSDP hold at once (the current one and the
prefetched next one), besides the embeddings."""
LORA_RANK = 16
"""Rank the LoRA suggestion proposes."""
MAX_WORKERS = 1024
"""The largest worker count the "more workers" suggestion considers."""
STAGES = ("sft", "rm", "ppo")

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------------------------------
# Model shapes


@dataclass
class ModelShape:
    """The sizes the estimate needs, read from a model's config."""

    params: int
    """Parameters of the causal LM (tied embeddings counted once)."""
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention); None: num_heads."""
    head_dim: Optional[int] = None
    """None: hidden_size // num_heads."""
    tied_embeddings: bool = True
    """The LM head shares the input embedding's weights."""

    @property
    def kv_width(self) -> int:
        """Elements of one token's key (or value) in one layer."""
        heads = self.num_kv_heads or self.num_heads
        return heads * (self.head_dim or self.hidden_size // self.num_heads)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (the rest, spread evenly over the layers)."""
        return max(self.params - self.embedding_params, 0) // max(self.num_layers, 1)

    @property
    def scalar_params(self) -> int:
        """Parameters of the same backbone with a scalar head (reward model, critic): the LM
        head (when it has its own weights) is replaced by a hidden_size x 1 score head."""
        head = 0 if self.tied_embeddings else self.vocab_size * self.hidden_size
        return self.params - head + self.hidden_size


def count_parameters(model_cfg: ModelConfig, field_name: str = "model") -> ModelShape:
    """The model's shape and exact parameter count, without loading weights: `model.tiny`
    builds the tiny Llama's config; otherwise the config is read (remote code never runs)
    and the model is instantiated on the meta device."""
    import torch

    if model_cfg.tiny is not None:
        from rlhf.models.tiny import build_tiny_model

        # The tokenizer is trained later and may stop below the target vocabulary: an upper bound.
        with torch.device("meta"):
            model = build_tiny_model(model_cfg.tiny, model_cfg.tiny.vocab_size, pad_token_id=0, eos_token_id=1, seed=0)
    else:
        from transformers import AutoModelForCausalLM

        config = _read_model_config(model_cfg, field_name)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError) as exc:
            raise UserError(f"{field_name}.path: {model_cfg.path}: transformers cannot build a causal LM from its "
                            f"config ({type(config).__name__}): {str(exc).splitlines()[0]}") from None
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        hidden_size=hidden,
        num_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        num_heads=heads,
        intermediate_size=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        tied_embeddings=head is None or head.weight is embedding.weight,
    )


def _read_model_config(model_cfg: ModelConfig, field_name: str):
    from transformers import AutoConfig

    from rlhf.models.loading import resolve_location

    location, gguf_file = resolve_location(model_cfg, model_cfg.path, f"{field_name}.path")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        # The planner never runs code shipped with a checkpoint, whatever trust_remote_code says.
        return AutoConfig.from_pretrained(location, revision=model_cfg.revision, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{field_name}.path: cannot read the model config of '{model_cfg.path}' (the planner reads "
                        f"only the config and never runs remote code): {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------
# Precision and sharding


@dataclass(frozen=True)
class Precision:
    """Bytes per element of a trained model under the strategy."""

    name: str
    param_bytes: int
    """Stored weights."""
    grad_bytes: int
    optim_bytes: int
    """Optimizer state per trainable parameter: AdamW's two moments, plus any master copy."""
    compute_bytes: int
    """Activations, gathered weights and the KV cache."""


def model_bytes(dtype: str, device_type: str) -> int:
    """Bytes per weight for model.dtype; auto is bf16 on CUDA and fp32 on CPU (as loading does)."""
    if dtype == "auto":
        return 2 if device_type == "cuda" else 4
    return _DTYPE_BYTES[dtype]


def resolve_mixed_precision(name: str, device_type: str) -> str:
    """strategy.mixed_precision -> no / bf16 / fp16 (auto: bf16 on CUDA, no on CPU)."""
    if name != "auto":
        return name
    return "bf16" if device_type == "cuda" else "no"


def precision(strategy: StrategyConfig, model_cfg: ModelConfig, device_type: str) -> Precision:
    mixed = resolve_mixed_precision(strategy.mixed_precision, device_type)
    if strategy.name == "deepspeed" and mixed in ("bf16", "fp16"):
        # ZeRO paper: 16-bit weights and gradients, K = 12 bytes of fp32 master, m and v.
        return Precision(f"{mixed} mixed precision, fp32 master weights and AdamW states", 2, 2, 12, 2)
    if strategy.name == "fsdp" and mixed in ("bf16", "fp16") and device_type == "cuda":
        # FSDP2 upcasts the model before sharding: the fp32 shards are the master weights.
        return Precision(f"{mixed} compute, fp32 sharded weights, gradients and AdamW states", 4, 4, 8, 2)
    width = model_bytes(model_cfg.dtype, device_type)
    name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(model_cfg.dtype,
                                                                          "bf16" if width == 2 else "fp32")
    name += (" (model.dtype; the single strategy does not use strategy.mixed_precision)" if strategy.name == "single"
             else " (model.dtype, no mixed precision)")
    # Without mixed precision AdamW keeps its moments in the weights' dtype.
    return Precision(name, width, width, 2 * width, width)


class Sharding(NamedTuple):
    params: bool
    grads: bool
    optim: bool
    offload_params: bool
    offload_grads: bool
    offload_optim: bool


def sharding(strategy: StrategyConfig) -> Sharding:
    if strategy.name == "fsdp":
        offload = strategy.offload_params or strategy.offload_optimizer  # FSDP2 offloads all three together
        return Sharding(True, True, True, offload, offload, offload)
    if strategy.name == "deepspeed":
        stage = strategy.zero_stage
        return Sharding(stage >= 3, stage >= 2, stage >= 1, strategy.offload_params, False, strategy.offload_optimizer)
    return Sharding(False, False, False, False, False, False)


def describe_strategy(strategy: StrategyConfig) -> str:
    if strategy.name == "single":
        return "single process"
    text = "FSDP2" if strategy.name == "fsdp" else f"DeepSpeed ZeRO-{strategy.zero_stage}"
    flags = (("optimizer", strategy.offload_optimizer), ("params", strategy.offload_params))
    offloaded = [name for name, on in flags if on]
    return text + (f", offload {' + '.join(offloaded)}" if offloaded else "")


# ---------------------------------------------------------------------------------------
# The plan


class Bytes(NamedTuple):
    device: int
    cpu: int


@dataclass
class Component:
    """One row of the plan: bytes per worker on the device and in CPU memory."""

    name: str
    kind: str
    """parameters, gathered, gradients, optimizer, activations, frozen or kv_cache."""
    device: int = 0
    cpu: int = 0
    role: str = "model"
    """PPO: actor, critic, reference or reward."""
    phase: Optional[str] = None
    """None: held for the whole run. Otherwise the phase whose peak this is; phases do not
    overlap, so the total counts only the largest."""


@dataclass
class Plan:
    """Per-worker memory of one stage under one config."""

    stage: str
    workers: int
    device_type: str
    available: int
    """Device memory per worker, in bytes."""
    memory_source: str
    components: list[Component]
    strategy: str
    precision: str
    model: str
    note: str = ""
    margin: float = SAFETY_MARGIN
    cfg: Any = field(default=None, repr=False)
    shapes: dict = field(default_factory=dict, repr=False)
    answers_per_prompt: int = 2

    def _resident(self, kind: str) -> Bytes:
        rows = [c for c in self.components if c.kind == kind]
        return Bytes(sum(c.device for c in rows), sum(c.cpu for c in rows))

    @property
    def parameters(self) -> Bytes:
        return self._resident("parameters")

    @property
    def gathered(self) -> Bytes:
        return self._resident("gathered")

    @property
    def gradients(self) -> Bytes:
        return self._resident("gradients")

    @property
    def optimizer(self) -> Bytes:
        return self._resident("optimizer")

    @property
    def frozen(self) -> Bytes:
        """PPO's frozen reference and reward model parameters."""
        return self._resident("frozen")

    @property
    def kv_cache(self) -> Bytes:
        return Bytes(max((c.device for c in self.components if c.kind == "kv_cache"), default=0), 0)

    @property
    def activations(self) -> Bytes:
        """Activations (and logits) of the heaviest pass."""
        by_phase: dict[str, int] = {}
        for c in self.components:
            if c.kind == "activations":
                by_phase[c.phase or ""] = by_phase.get(c.phase or "", 0) + c.device
        return Bytes(max(by_phase.values(), default=0), 0)

    @property
    def phases(self) -> dict[str, int]:
        """Device bytes of each phase."""
        out: dict[str, int] = {}
        for c in self.components:
            if c.phase is not None:
                out[c.phase] = out.get(c.phase, 0) + c.device
        return out

    @property
    def peak_phase(self) -> Optional[str]:
        phases = self.phases
        return max(phases, key=phases.get) if phases else None

    @property
    def device_total(self) -> int:
        resident = sum(c.device for c in self.components if c.phase is None)
        return resident + max(self.phases.values(), default=0)

    @property
    def cpu_total(self) -> int:
        return sum(c.cpu for c in self.components)

    @property
    def need(self) -> int:
        """Bytes compared with the device memory: on a CPU run offloaded parts share the RAM."""
        return self.device_total + (self.cpu_total if self.device_type == "cpu" else 0)

    @property
    def usable(self) -> int:
        return int(self.available * (1 - self.margin))

    @property
    def fits(self) -> bool:
        return self.need <= self.usable


def _shard(nbytes: int, workers: int, sharded: bool) -> int:
    return -(-nbytes // workers) if sharded else nbytes


def lora_params(shape: ModelShape, lora: LoraConfig) -> int:
    """Adapter parameters: A (r x in) and B (out x r) per target module and layer, estimated
    as 2 * r * hidden each."""
    return 2 * lora.r * shape.hidden_size * len(lora.target_modules) * shape.num_layers


def _trained_model(prefix: str, role: str, shape: ModelShape, base_params: int, lora: Optional[LoraConfig],
                   prec: Precision, strategy: StrategyConfig, workers: int) -> list[Component]:
    """Weights, gradients and optimizer states of a model the strategy trains."""
    adapters = lora_params(shape, lora) if lora is not None and lora.r > 0 else 0
    total = base_params + adapters
    trainable = adapters or base_params
    s = sharding(strategy)
    rows = []
    for kind, name, nbytes, sharded, offloaded in (
        ("parameters", "parameters", total * prec.param_bytes, s.params, s.offload_params),
        ("gradients", "gradients" + (" (LoRA adapters)" if adapters else ""), trainable * prec.grad_bytes,
         s.grads, s.offload_grads),
        ("optimizer", "optimizer states (AdamW)", trainable * prec.optim_bytes, s.optim, s.offload_optim),
    ):
        per_worker = _shard(nbytes, workers, sharded)
        device, cpu = (0, per_worker) if offloaded else (per_worker, 0)
        rows.append(Component(prefix + name, kind, device, cpu, role))
    if s.params or s.offload_params:
        gathered = min(shape.embedding_params + GATHERED_LAYERS * shape.layer_params, total) * prec.compute_bytes
        rows.append(Component(f"{prefix}weights gathered for compute (embeddings + {GATHERED_LAYERS} layers)",
                              "gathered", gathered, 0, role))
    return rows


def layer_activation_bytes(shape: ModelShape, seq: int, batch: int, compute_bytes: int, flash: bool) -> int:
    """One decoder layer's stored activations, Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h)
    bytes at 16-bit (the second term, 5*a*s*s*b, is the attention scores), scaled to the
    compute width."""
    sbh = seq * batch * shape.hidden_size
    at_16bit = 34 * sbh + (0 if flash else 5 * shape.num_heads * seq * seq * batch)
    return at_16bit * compute_bytes // 2


def activation_bytes(shape: ModelShape, seq: int, batch: int, compute_bytes: int, checkpointing: bool,
                     flash: bool) -> int:
    """All layers' activations of a micro-batch kept for the backward pass."""
    layer = layer_activation_bytes(shape, seq, batch, compute_bytes, flash)
    if checkpointing:
        # Each layer keeps its input (2*s*b*h bytes at 16-bit), one layer is recomputed at a time.
        return shape.num_layers * seq * batch * shape.hidden_size * compute_bytes + layer
    return shape.num_layers * layer


def _pass(phase: str, role: str, shape: ModelShape, batch: int, seq: int, logit_tokens: int, compute_bytes: int,
          model_cfg: ModelConfig, train: bool, label: Optional[str] = None,
          batch_text: Optional[str] = None) -> list[Component]:
    """A training micro-batch (activations kept for backward) or a forward pass without
    gradients (one layer's activations live at a time), plus its fp32 logits. Rows are
    named after the phase unless `label` is given."""
    label = f"{phase}: " if label is None else label
    batch_text = batch_text or str(batch)
    flash = model_cfg.attn_implementation == "flash_attention_2"
    if train:
        checkpointing = model_cfg.gradient_checkpointing
        nbytes = activation_bytes(shape, seq, batch, compute_bytes, checkpointing, flash)
        name = f"{label}activations, micro-batch {batch_text} x {seq} tokens"
        name += ", checkpointed" if checkpointing else ""
    else:
        nbytes = layer_activation_bytes(shape, seq, batch, compute_bytes, flash)
        name = f"{label}forward of {batch_text} x {seq} tokens without gradients"
    rows = [Component(name, "activations", nbytes, 0, role, phase)]
    if logit_tokens:
        rows.append(Component(f"{label}logits, {logit_tokens} tokens x {shape.vocab_size} vocab, fp32", "activations",
                              logit_tokens * shape.vocab_size * LOGIT_BYTES, 0, role, phase))
    return rows


def _sft_components(cfg, shapes: dict, workers: int, device_type: str, answers: int) -> list[Component]:
    shape = shapes["model"]
    prec = precision(cfg.strategy, cfg.model, device_type)
    seq, batch = cfg.data.max_length, cfg.train.micro_batch_size
    rows = _trained_model("", "model", shape, shape.params, cfg.model.lora, prec, cfg.strategy, workers)
    return rows + _pass("train", "model", shape, batch, seq, batch * seq, prec.compute_bytes, cfg.model, True, "")


def _rm_components(cfg, shapes: dict, workers: int, device_type: str, answers: int) -> list[Component]:
    # A batch element is a prompt with its K answers; a scalar head, so no vocabulary logits.
    # The RM stage trains all weights (it does not apply model.lora).
    shape = shapes["model"]
    prec = precision(cfg.strategy, cfg.model, device_type)
    seq, prompts = cfg.data.max_length, cfg.train.micro_batch_size
    rows = _trained_model("", "model", shape, shape.scalar_params, None, prec, cfg.strategy, workers)
    return rows + _pass("train", "model", shape, prompts * answers, seq, 0, prec.compute_bytes, cfg.model, True, "",
                        f"{prompts} prompts x {answers} answers")


def _ppo_components(cfg, shapes: dict, workers: int, device_type: str, answers: int) -> list[Component]:
    actor, reward = shapes["model"], shapes["reward_model"]
    critic_cfg = cfg.reward_model if cfg.ppo.critic_init == "reward" else cfg.model
    critic = reward if cfg.ppo.critic_init == "reward" else actor
    actor_prec = precision(cfg.strategy, cfg.model, device_type)
    critic_prec = precision(cfg.strategy, critic_cfg, device_type)
    ref_bytes = model_bytes(cfg.model.dtype, device_type)
    rm_bytes = model_bytes(cfg.reward_model.dtype, device_type)
    prompt, new = cfg.data.max_prompt_length, cfg.rollout.max_new_tokens
    seq = prompt + new
    rollout = -(-cfg.ppo.rollout_batch_size // workers)  # this worker's share of each iteration
    generate = min(cfg.rollout.batch_size, rollout)
    micro = cfg.ppo.micro_batch_size
    logit_tokens = new + 1  # only the response region's logits are computed (logits_to_keep)

    rows = _trained_model("actor ", "actor", actor, actor.params, cfg.model.lora, actor_prec, cfg.strategy, workers)
    rows += _trained_model("critic ", "critic", critic, critic.scalar_params, None, critic_prec, cfg.strategy, workers)
    rows.append(Component("reference parameters (frozen)", "frozen", actor.params * ref_bytes, 0, "reference"))
    rows.append(Component("reward model parameters (frozen)", "frozen", reward.scalar_params * rm_bytes, 0, "reward"))
    kv = 2 * actor.num_layers * generate * seq * actor.kv_width * actor_prec.compute_bytes
    rows.append(Component(f"generate: KV cache, {generate} x {seq} tokens", "kv_cache", kv, 0, "actor", "generate"))
    actor_width, critic_width = actor_prec.compute_bytes, critic_prec.compute_bytes
    rows += _pass("actor train", "actor", actor, micro, seq, micro * logit_tokens, actor_width, cfg.model, True)
    if cfg.ppo.ptx_coef > 0:
        ptx, length = cfg.ppo.ptx_micro_batch_size, cfg.data.pretrain_max_length
        rows += _pass("actor ptx", "actor", actor, ptx, length, ptx * length, actor_width, cfg.model, True)
    rows += _pass("critic train", "critic", critic, micro, seq, 0, critic_width, critic_cfg, True)
    # The experience step runs each model once over this worker's whole rollout.
    rollout_logits = rollout * logit_tokens
    rows += _pass("actor log-probs", "actor", actor, rollout, seq, rollout_logits, actor_width, cfg.model, False)
    rows += _pass("reference log-probs", "reference", actor, rollout, seq, rollout_logits, ref_bytes, cfg.model, False)
    rows += _pass("critic values", "critic", critic, rollout, seq, 0, critic_width, critic_cfg, False)
    rows += _pass("reward scores", "reward", reward, rollout, seq, 0, rm_bytes, cfg.reward_model, False)
    return rows


_BUILDERS = {"sft": _sft_components, "rm": _rm_components, "ppo": _ppo_components}


def _describe_model(model_cfg: ModelConfig, shape: ModelShape) -> str:
    where = "tiny (built from model.tiny)" if model_cfg.tiny is not None else (
        model_cfg.path + (f" [{model_cfg.gguf_file}]" if model_cfg.gguf_file else ""))
    return (f"{where}: {_count(shape.params)} parameters, hidden {shape.hidden_size}, {shape.num_layers} layers, "
            f"{shape.num_heads} heads, vocab {shape.vocab_size}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def detect_device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def detect_device_memory(device_type: str, local_workers: int = 1) -> tuple[int, str]:
    """(bytes per worker, where the number comes from): the GPU's total memory, or on CPU this
    machine's RAM shared by the workers running on it."""
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("planning a CUDA run on a machine without a CUDA device: give --device-memory-gb "
                            "(one GPU's memory in GiB)")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"{props.name} total memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local_workers = max(local_workers, 1)
    if local_workers == 1:
        return ram, "this machine's RAM, no CUDA device"
    return ram // local_workers, f"this machine's RAM ({ram / GiB:.1f} GiB) shared by {local_workers} local workers"


def estimate(stage_cfg: Any, stage: str, workers: int, device_memory: Optional[int] = None, *,
             device_type: Optional[str] = None, answers_per_prompt: int = 2, shapes: Optional[dict] = None,
             memory_source: Optional[str] = None) -> Plan:
    """The plan of `stage` with config `stage_cfg` on `workers` workers. `device_memory`
    (bytes per worker) and `device_type` (cuda / cpu) default to this machine's; `shapes`
    ({"model": ModelShape, "reward_model": ModelShape}) skips reading the model configs."""
    if stage not in STAGES:
        raise UserError(f"plan: stage {stage!r} is not one of {', '.join(STAGES)}")
    if workers < 1:
        raise UserError(f"plan: workers={workers} must be >= 1")
    if answers_per_prompt < 2:
        raise UserError(f"plan: answers per prompt={answers_per_prompt} must be >= 2 (a ranking needs two answers)")
    device_type = device_type or detect_device_type()
    if device_memory is None:
        device_memory, memory_source = detect_device_memory(device_type, _local_workers(stage_cfg, workers))
    shapes = dict(shapes or {})
    for key in ("model", "reward_model") if stage == "ppo" else ("model",):
        if key not in shapes:
            shapes[key] = count_parameters(getattr(stage_cfg, key), key)
    components = _BUILDERS[stage](stage_cfg, shapes, workers, device_type, answers_per_prompt)
    model = _describe_model(stage_cfg.model, shapes["model"])
    if stage == "ppo":
        model = f"policy {model}; reward model {_describe_model(stage_cfg.reward_model, shapes['reward_model'])}"
    plan = Plan(stage, workers, device_type, int(device_memory), memory_source or "--device-memory-gb", components,
                describe_strategy(stage_cfg.strategy),
                precision(stage_cfg.strategy, stage_cfg.model, device_type).name, model,
                cfg=stage_cfg, shapes=shapes, answers_per_prompt=answers_per_prompt)
    groups = stage_cfg.ppo.role_groups() if stage == "ppo" else None
    if groups:
        # Each role group runs on its own `resources` workers: plan the heaviest.
        plans = [(group, copy.copy(plan)) for group in groups]
        for group, sub in plans:
            sub.components = [c for c in components if c.role in group]
        group, plan = max(plans, key=lambda item: item[1].need)
        plan.note = f"role group [{', '.join(group)}], the heaviest of {len(groups)} (each runs on its own workers)"
    return plan


def _local_workers(cfg: Any, workers: int) -> int:
    if cfg.ray.enabled:
        return min(cfg.resources.workers_per_node, workers)
    return min(_env_int("LOCAL_WORLD_SIZE", workers), workers)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def default_workers(cfg: Any) -> int:
    """resources.num_nodes x workers_per_node on Ray, else WORLD_SIZE (torchrun / deepspeed), else 1."""
    if cfg.ray.enabled:
        return cfg.resources.workers
    return _env_int("WORLD_SIZE", 1)


# ---------------------------------------------------------------------------------------
# Suggestions


@dataclass
class Suggestion:
    text: str
    overrides: dict[str, Any]
    """Config changes (dotted key -> value)."""
    workers: Optional[int]
    """A different worker count, or None."""
    plan: Plan = field(repr=False)

    def __str__(self) -> str:
        changes = [f"--workers {self.workers}"] if self.workers else []
        changes += [f"{key}={_yaml_value(value)}" for key, value in self.overrides.items()]
        return (f"{self.text}: {' '.join(changes)} "
                f"(fits: {size(self.plan.need)} of {size(self.plan.usable)} usable)")


def _yaml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _set(cfg: Any, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, name, value)


def reestimate(plan: Plan, overrides: dict[str, Any], workers: Optional[int] = None) -> Optional[Plan]:
    """`plan` again with these config changes (and worker count); None when the changed config
    is not valid."""
    cfg = copy.deepcopy(plan.cfg)
    for key, value in overrides.items():
        _set(cfg, key, value)
    try:
        cfg.validate()
    except ConfigError:
        return None
    return estimate(cfg, plan.stage, workers or plan.workers, plan.available, device_type=plan.device_type,
                    answers_per_prompt=plan.answers_per_prompt, shapes=plan.shapes, memory_source=plan.memory_source)


def _fitting(plan: Plan, text: str, overrides: dict[str, Any], workers: Optional[int] = None) -> Optional[Suggestion]:
    changed = reestimate(plan, overrides, workers)
    return Suggestion(text, overrides, workers, changed) if changed is not None and changed.fits else None


def _micro_candidates(current: int, batch: int, workers: int) -> list[int]:
    """Micro-batches below `current`, largest first, that keep `batch` a multiple of
    micro x workers (or, when no worker split divides it, of micro alone)."""
    split = [m for m in range(current - 1, 0, -1) if batch % (m * workers) == 0]
    return split or [m for m in range(current - 1, 0, -1) if batch % m == 0]


def _lower_batches(plan: Plan) -> Optional[Suggestion]:
    cfg, workers = plan.cfg, plan.workers
    if plan.stage != "ppo":
        for micro in _micro_candidates(cfg.train.micro_batch_size, cfg.train.global_batch_size, workers):
            found = _fitting(plan, "lower the micro-batch (same global batch, more accumulation steps)",
                             {"train.micro_batch_size": micro})
            if found:
                return found
        return None
    # PPO: the training micro-batch and the generation batch peak in different phases.
    current_micro, current_generate = cfg.ppo.micro_batch_size, cfg.rollout.batch_size
    for micro in [current_micro] + _micro_candidates(current_micro, cfg.ppo.mini_batch_size, workers):
        changes = {"ppo.micro_batch_size": micro} if micro != current_micro else {}
        low = reestimate(plan, {**changes, "rollout.batch_size": 1})
        if low is None or not low.fits:
            continue
        lo, hi = 1, current_generate  # largest generation batch that fits: lo fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = reestimate(plan, {**changes, "rollout.batch_size": mid})
            lo, hi = (mid, hi) if trial is not None and trial.fits else (lo, mid - 1)
        if lo != current_generate:
            changes["rollout.batch_size"] = lo
        if changes:
            return _fitting(plan, "lower the batch sizes (same PPO mini-batches; more accumulation, smaller "
                            "generation chunks)", changes)
    return None


def _checkpointing(plan: Plan) -> Optional[Suggestion]:
    cfg = plan.cfg
    sections = ["model"]
    if plan.stage == "ppo" and cfg.ppo.critic_init == "reward":
        sections.append("reward_model")  # the critic is built from it
    changes = {f"{s}.gradient_checkpointing": True for s in sections if not getattr(cfg, s).gradient_checkpointing}
    return _fitting(plan, "enable gradient checkpointing (recompute activations: ~30% slower steps)",
                    changes) if changes else None


def _zero_stage(plan: Plan) -> Optional[Suggestion]:
    strategy = plan.cfg.strategy
    if strategy.name == "fsdp":
        return None  # already shards weights, gradients and optimizer states
    current = strategy.zero_stage if strategy.name == "deepspeed" else -1
    for stage in (2, 3):
        if stage <= current:
            continue
        changes = {"strategy.name": "deepspeed"} if strategy.name != "deepspeed" else {}
        changes["strategy.zero_stage"] = stage
        sharded = "optimizer states and gradients" if stage == 2 else "optimizer states, gradients and weights"
        found = _fitting(plan, f"shard {sharded} over the {plan.workers} workers (DeepSpeed ZeRO-{stage})", changes)
        if found:
            return found
    return None


def _offload_optimizer(plan: Plan) -> Optional[Suggestion]:
    strategy = plan.cfg.strategy
    if strategy.offload_optimizer or (strategy.name == "fsdp" and strategy.offload_params):
        return None
    if strategy.name == "fsdp":
        return _fitting(plan, "offload to CPU memory (FSDP2 moves weights, gradients and the optimizer step together)",
                        {"strategy.offload_optimizer": True})
    changes: dict[str, Any] = {"strategy.name": "deepspeed"} if strategy.name != "deepspeed" else {}
    if strategy.name != "deepspeed" or strategy.zero_stage == 0:
        changes["strategy.zero_stage"] = 2
    changes["strategy.offload_optimizer"] = True
    return _fitting(plan, "offload the optimizer states and step to CPU memory (ZeRO-Offload; slower steps)", changes)


def _offload_params(plan: Plan) -> Optional[Suggestion]:
    strategy = plan.cfg.strategy
    if strategy.name == "fsdp" or strategy.offload_params:
        return None  # FSDP2: the same as offloading the optimizer
    changes: dict[str, Any] = {"strategy.name": "deepspeed"} if strategy.name != "deepspeed" else {}
    changes.update({"strategy.zero_stage": 3, "strategy.offload_optimizer": True, "strategy.offload_params": True})
    return _fitting(plan, "offload the weights and the optimizer to CPU memory (ZeRO-3; much slower steps)", changes)


def _lora(plan: Plan) -> Optional[Suggestion]:
    if plan.stage == "rm" or plan.cfg.model.lora.r > 0:
        return None  # the reward model stage trains all weights
    who = "the actor's" if plan.stage == "ppo" else "the model's"
    return _fitting(plan, f"train LoRA adapters instead of all of {who} weights (changes what is learned)",
                    {"model.lora.r": LORA_RANK})


def _more_workers(plan: Plan) -> Optional[Suggestion]:
    """The fewest workers that fit, among counts that split the (mini-)batch evenly; the
    micro-batch comes down where the batch no longer splits into it."""
    cfg, strategy = plan.cfg, plan.cfg.strategy
    base: dict[str, Any] = {}
    if strategy.name == "single" or (strategy.name == "deepspeed" and strategy.zero_stage == 0):
        # More workers help only when something is sharded over them.
        base = {"strategy.name": "deepspeed"} if strategy.name == "single" else {}
        base["strategy.zero_stage"] = 3
    if plan.stage == "ppo":  # rollout_batch_size is a multiple of mini_batch_size
        key, micro, batch = "ppo.micro_batch_size", cfg.ppo.micro_batch_size, cfg.ppo.mini_batch_size
    else:
        key, micro, batch = "train.micro_batch_size", cfg.train.micro_batch_size, cfg.train.global_batch_size
    for workers in range(plan.workers + 1, min(batch, MAX_WORKERS) + 1):
        if batch % workers:
            continue
        split = max(m for m in range(1, micro + 1) if batch % (m * workers) == 0)
        if split != micro:
            alone = reestimate(plan, {key: split})
            if alone is not None and alone.fits:
                continue  # the smaller micro-batch, not the workers, makes it fit
        changes = {**base, key: split} if split != micro else dict(base)
        why = ["ZeRO-3 shards the model over them"] if base else []
        why += [f"the micro-batch drops to {split} so the batch of {batch} splits evenly"] if split != micro else []
        text = f"use {workers} workers" + (f" ({'; '.join(why)})" if why else "")
        found = _fitting(plan, text, changes, workers)
        if found:
            return found
    return None


SUGGESTERS = (_lower_batches, _checkpointing, _zero_stage, _offload_optimizer, _offload_params, _lora, _more_workers)
"""Least disruptive first."""


def plan_suggestions(plan: Plan) -> list[Suggestion]:
    """Single changes that make `plan` fit, each re-estimated; empty when it already fits."""
    if plan.fits:
        return []
    return [s for s in (suggest(plan) for suggest in SUGGESTERS) if s is not None]


def suggestions(plan: Plan) -> list[str]:
    """The suggestions as lines: what to change, the overrides, and the re-estimated need."""
    return [str(s) for s in plan_suggestions(plan)]


# ---------------------------------------------------------------------------------------
# Output


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.3f}"


def size(nbytes: int) -> str:
    """Bytes for text: GiB, or MiB below a tenth of a GiB."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def format_plan(plan: Plan) -> str:
    name_width = max([len(c.name) for c in plan.components] + [24]) + 2
    lines = [
        f"plan: {plan.stage} on {plan.workers} worker{'s' if plan.workers != 1 else ''}, {plan.strategy}, "
        f"{plan.device_type}",
        f"precision: {plan.precision}",
        f"model: {plan.model}",
    ]
    if plan.note:
        lines.append(plan.note)
    lines += ["", f"{'component':<{name_width}}{'device GiB':>12}{'CPU GiB':>12}"]
    for c in plan.components:
        marker = " *" if c.phase is not None else "  "
        lines.append(f"{c.name + marker:<{name_width}}{_gib(c.device):>12}{_gib(c.cpu):>12}")
    lines.append(f"{'total':<{name_width}}{_gib(plan.device_total):>12}{_gib(plan.cpu_total):>12}")
    peak = plan.peak_phase
    if peak is not None:
        lines.append(f"* peak of a phase; phases do not overlap, the total counts the largest ({peak})")
    if plan.device_type == "cpu":
        lines.append("on a CPU run the device and CPU columns share the same RAM: both count")
    lines += [
        f"available: {size(plan.available)} per worker ({plan.memory_source}); usable after the "
        f"{plan.margin:.0%} safety margin: {size(plan.usable)}",
        f"{'fits' if plan.fits else 'does not fit'}: {size(plan.need)} of {size(plan.usable)} usable",
    ]
    return "\n".join(lines)


def refusal(plan: Plan, tips: list[Suggestion]) -> str:
    """The block printed on stderr when the plan does not fit."""
    parts = {"weights": plan.parameters.device + plan.gathered.device + plan.frozen.device,
             "gradients": plan.gradients.device, "optimizer states": plan.optimizer.device,
             "activations and logits": plan.activations.device, "generation KV cache": plan.kv_cache.device}
    largest = sorted(((v, k) for k, v in parts.items() if v), reverse=True)[:3]
    lines = [
        f"does not fit: {plan.stage} needs {size(plan.need)} per worker, {size(plan.usable)} usable "
        f"({size(plan.available)} less the {plan.margin:.0%} safety margin)",
        "largest parts: " + ", ".join(f"{k} {size(v)}" for v, k in largest),
    ]
    if tips:
        lines.append("each of these fits on its own (least disruptive first):")
        lines += [f"  {i}. {tip}" for i, tip in enumerate(tips, 1)]
    else:
        lines.append("no single change fits: combine several (e.g. a smaller micro-batch with ZeRO-3), "
                     "use a device with more memory, or a smaller model")
    return "\n".join(lines)


def plan_to_dict(plan: Plan, tips: list[Suggestion]) -> dict:
    totals = {kind: getattr(plan, kind)._asdict()
              for kind in ("parameters", "gathered", "gradients", "optimizer", "activations", "frozen", "kv_cache")}
    return {
        "stage": plan.stage,
        "workers": plan.workers,
        "device_type": plan.device_type,
        "strategy": plan.strategy,
        "precision": plan.precision,
        "model": plan.model,
        "note": plan.note,
        "components": [{"name": c.name, "kind": c.kind, "role": c.role, "phase": c.phase,
                        "device_bytes": c.device, "cpu_bytes": c.cpu} for c in plan.components],
        "totals": totals,
        "device_total_bytes": plan.device_total,
        "cpu_total_bytes": plan.cpu_total,
        "need_bytes": plan.need,
        "available_bytes": plan.available,
        "usable_bytes": plan.usable,
        "memory_source": plan.memory_source,
        "safety_margin": plan.margin,
        "fits": plan.fits,
        "suggestions": [{"text": str(t), "overrides": [f"{k}={_yaml_value(v)}" for k, v in t.overrides.items()],
                         "workers": t.workers, "need_bytes": t.plan.need} for t in tips],
    }


# ---------------------------------------------------------------------------------------
# CLI


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan",
        help="Estimate memory per worker before training; refuse configs that cannot fit.",
        description="Estimate the parameter, gradient, optimizer, activation (and PPO: frozen model and KV cache) "
        "memory per worker for a stage's config, strategy and batch sizes, without loading the model. Exits 0 "
        "when it fits, 3 when it does not (with changes that would fit on stderr), 2 on a config error.",
    )
    parser.add_argument("stage", choices=STAGES, help="the stage to plan")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config; repeat to layer several (later files win)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="training processes (default: resources.num_nodes x workers_per_node with "
                        "ray.enabled, else $WORLD_SIZE, else 1)")
    parser.add_argument("--device-memory-gb", type=float, metavar="G",
                        help="memory of one worker's device in GiB (default: this machine's GPU, else its RAM)")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="the device the run will use (default: cuda when this machine has one); "
                        "decides what auto precisions mean")
    parser.add_argument("--answers-per-prompt", type=int, default=2, metavar="K",
                        help="rm: answers ranked per prompt, each a sequence in the micro-batch (default 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.micro_batch_size=8")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; 0 when it fits, 3 when it does not. Config errors (UserError) propagate."""
    from rlhf.config import STAGE_CONFIGS, load_config

    cfg = load_config(STAGE_CONFIGS[args.stage], args.config, args.overrides)
    workers = args.workers if args.workers is not None else default_workers(cfg)
    device_type = args.device or detect_device_type()
    memory = source = None
    if args.device_memory_gb is not None:
        if args.device_memory_gb <= 0:
            raise UserError(f"--device-memory-gb {args.device_memory_gb} must be > 0")
        memory, source = int(args.device_memory_gb * GiB), "--device-memory-gb"
    plan = estimate(cfg, args.stage, workers, memory, device_type=device_type,
                    answers_per_prompt=args.answers_per_prompt, memory_source=source)
    tips = plan_suggestions(plan)
    print(json.dumps(plan_to_dict(plan, tips), indent=2) if args.json else format_plan(plan))
    if plan.fits:
        return 0
    sys.stdout.flush()
    print(refusal(plan, tips), file=sys.stderr)
    return 3
