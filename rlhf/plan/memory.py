"""The plan: per-worker memory of one stage under one config, component by component, and
`estimate`, which builds it. Everything here is arithmetic on the model's shape and the config.

- Weights, gradients and optimizer states of each trained model: bytes per element from
  `strategy.precision`, sharded over the workers or offloaded as `strategy.sharding` says.
  ZeRO-3 and FSDP also hold the full weights of a few layers at once for compute; the single
  strategy under mixed precision holds all of them cast to the compute dtype (autocast).
- Activations of one decoder layer for a micro-batch of b sequences of s tokens, hidden size
  h and a attention heads, without recomputation: s*b*h*(34 + 5*a*s/h) bytes at 16-bit
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  sec. 4.1), twice that in fp32. flash_attention_2 never stores the a*s*s score matrices, so
  the 5*a*s/h term is dropped for it. With gradient checkpointing each layer keeps only its
  input (2*s*b*h bytes at 16-bit) and one layer's full activations are live during its
  recomputation. The loss adds fp32 logits: tokens x vocab x 4 bytes.
- Generation keeps a KV cache of 2 x layers x batch x tokens x (kv heads x head dim) elements;
  with rollout.gather_weights a sharded actor also holds its whole weights while it generates.
  A colocated vLLM engine (rollout.engine=vllm) holds its own copy of the weights and the KV
  budget its config gives it (rollout.vllm.kv_cache_gib or gpu_memory_utilization), released
  between rollouts with rollout.vllm.sleep.

What this project's code does decides the details: the reward model stage never applies LoRA,
PPO's critic is never LoRA, and PPO's reference and reward model are frozen copies in their
model.dtype, sharded over the workers where the strategy shards parameters (ZeRO-3, FSDP2) and
whole on every worker that holds them otherwise.

Loading (`Plan.load_peak`) is counted apart: the framework's baseline and the weights as built,
before any gradient or activation exists, plus what a worker holds for a moment while it reads
one model (`load_transient`).

Phases that do not overlap (a training micro-batch, generation, each forward pass of the
experience step) are peaks: the total counts resident memory plus the largest phase. A safety
margin (`SAFETY_MARGIN`) of the device memory is kept for what the estimate leaves out (CUDA
context, kernel workspaces, allocator fragmentation, communication buffers).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from rlhf.config_sections import LoraConfig, ModelConfig, StrategyConfig
from rlhf.errors import UserError
from rlhf.plan.devices import detect_device_memory, detect_device_type, local_workers
from rlhf.plan.shapes import ModelShape, count_parameters, describe_model, lora_params
from rlhf.plan.strategy import Precision, describe_strategy, model_bytes, precision, sharding

SAFETY_MARGIN = 0.10
"""Fraction of the device memory the plan keeps free."""
LOGIT_BYTES = 4
"""Bytes per logit of the loss (computed in fp32)."""
GATHERED_LAYERS = 2
"""Transformer layers whose full weights ZeRO-3 / FSDP hold at once (the current one and the
prefetched next one), besides the embeddings."""
STAGES = ("sft", "rm", "ppo")
MiB = 1 << 20
FRAMEWORK_BASELINE = {"single": 416 * MiB, "fsdp": 416 * MiB, "deepspeed": 440 * MiB}
"""A worker's resident set before it builds any model: Python, torch, transformers (and
DeepSpeed), the process group and the tokenizer. Measured on the CPU with the pinned versions
(benchmarks/load_memory.py, BENCHMARKS.md 'Memory at load'); a GPU worker adds its CUDA
context on the device, which the safety margin covers."""


class Bytes(NamedTuple):
    device: int
    cpu: int


@dataclass
class Component:
    """One row of the plan: bytes per worker on the device and in CPU memory."""

    name: str
    kind: str
    """parameters, gathered, gradients, optimizer, activations, frozen, kv_cache or engine."""
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
    load_transient: int = 0
    """Bytes a worker holds beyond its share while one model loads (`load_transient`)."""

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
    def engine(self) -> Bytes:
        """A vLLM rollout engine's own weights (rollout.engine=vllm, colocated)."""
        return Bytes(max((c.device for c in self.components if c.kind == "engine"), default=0),
                     sum(c.cpu for c in self.components if c.kind == "engine"))

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
    def load_peak(self) -> int:
        """Bytes a worker holds once its models are built, before the first step: the framework
        baseline, every model's weights (this worker's shard where the strategy shards them:
        they are built sharded, rlhf/models/loading.py), what the engine allocates when it
        wraps a trained model (DeepSpeed its gradient partitions and optimizer states at once;
        FSDP2 and single only at the first step), and the largest moment's extra while one
        model is read (`load_transient`: a model FSDP2's rank 0 loads whole, a GGUF tensor
        under ZeRO-3), counted on top, as if it came last."""
        engine = self.cfg.strategy.name if self.cfg is not None else "single"
        kinds = ("parameters", "frozen") + (("gradients", "optimizer") if engine == "deepspeed" else ())
        held = sum(c.device + c.cpu for c in self.components if c.kind in kinds)
        return FRAMEWORK_BASELINE.get(engine, FRAMEWORK_BASELINE["single"]) + held + self.load_transient

    @property
    def usable(self) -> int:
        return int(self.available * (1 - self.margin))

    @property
    def fits(self) -> bool:
        return self.need <= self.usable


def _shard(nbytes: int, workers: int, sharded: bool) -> int:
    return -(-nbytes // workers) if sharded else nbytes


TRAINED_STATE_BYTES, FROZEN_STATE_BYTES = 16, 4
"""Bytes per parameter of the state FSDP2 shards, as its HSDP decision counts it
(rlhf/distributed/fsdp.py `sharded_state_bytes`): fp32 weight, gradient and two AdamW moments
for a trained parameter, the weight alone for a frozen one."""


def _trained_state(shape: ModelShape, base_params: int, lora: Optional[LoraConfig]) -> int:
    adapters = lora_params(shape, lora) if lora is not None and lora.r > 0 else 0
    if adapters:
        return base_params * FROZEN_STATE_BYTES + adapters * TRAINED_STATE_BYTES
    return base_params * TRAINED_STATE_BYTES


def shard_workers(cfg: Any, workers: int, state_bytes: int, device_type: str, device_memory: int) -> int:
    """Workers a model's sharded state is split over. FSDP2 on several nodes shards within a
    node and replicates across nodes (HSDP) where a node's share fits (rlhf/distributed/fsdp.py
    `mesh_shape`, the same decision the strategy takes); otherwise, and for DeepSpeed, over all
    workers."""
    if cfg.strategy.name != "fsdp":
        return workers
    from rlhf.distributed.fsdp import mesh_shape  # torch is already loaded by the shape count

    offload = cfg.strategy.offload_params or cfg.strategy.offload_optimizer
    device_bytes = device_memory if device_type == "cuda" and not offload else None
    return mesh_shape(workers, local_workers(cfg, workers), state_bytes, device_bytes)[-1]


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
    if prec.compute_copies:
        rows.append(Component(f"{prefix}weights cast for compute (autocast, through a forward and its backward)",
                              "gathered", total * prec.compute_bytes, 0, role))
    return rows


def _frozen_model(name: str, shape: ModelShape, nbytes: int, compute_bytes: int, strategy: StrategyConfig,
                  workers: int, role: Optional[str] = None) -> list[Component]:
    """A frozen model's weights: sharded like the trained models' where the strategy shards
    parameters (ZeRO-3, FSDP2; rlhf/distributed `freeze`), in CPU memory under parameter
    offload, else whole on every worker; a sharded one gathers a few layers for compute."""
    role = role or name
    s = sharding(strategy)
    per_worker = _shard(nbytes, workers, s.params)
    device, cpu = (0, per_worker) if s.offload_params else (per_worker, 0)
    rows = [Component(f"{name} parameters (frozen)", "frozen", device, cpu, role)]
    if s.params:
        gathered = min(shape.embedding_params + GATHERED_LAYERS * shape.layer_params, shape.params) * compute_bytes
        rows.append(Component(f"{name} weights gathered for compute (embeddings + {GATHERED_LAYERS} layers)",
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


def _sft_components(cfg, shapes: dict, workers: int, device_type: str, answers: int,
                    device_memory: int) -> list[Component]:
    shape = shapes["model"]
    prec = precision(cfg.strategy, cfg.model, device_type, cfg)
    seq, batch = cfg.data.max_length, cfg.train.micro_batch_size
    over = shard_workers(cfg, workers, _trained_state(shape, shape.params, cfg.model.lora), device_type, device_memory)
    rows = _trained_model("", "model", shape, shape.params, cfg.model.lora, prec, cfg.strategy, over)
    return rows + _pass("train", "model", shape, batch, seq, batch * seq, prec.compute_bytes, cfg.model, True, "")


def _rm_components(cfg, shapes: dict, workers: int, device_type: str, answers: int,
                   device_memory: int) -> list[Component]:
    # A batch element is a prompt with its K answers; a scalar head, so no vocabulary logits.
    # The RM stage trains all weights (it does not apply model.lora).
    shape = shapes["model"]
    prec = precision(cfg.strategy, cfg.model, device_type, cfg)
    seq, prompts = cfg.data.max_length, cfg.train.micro_batch_size
    over = shard_workers(cfg, workers, _trained_state(shape, shape.scalar_params, None), device_type, device_memory)
    rows = _trained_model("", "model", shape, shape.scalar_params, None, prec, cfg.strategy, over)
    return rows + _pass("train", "model", shape, prompts * answers, seq, 0, prec.compute_bytes, cfg.model, True, "",
                        f"{prompts} prompts x {answers} answers")


def _ppo_components(cfg, shapes: dict, workers: int, device_type: str, answers: int,
                    device_memory: int) -> list[Component]:
    # Only the roles the run builds (rlhf/roles/team.py): no critic for the critic-free
    # estimators, no reference when the KL coefficient is 0, no reward model with rewards only
    # from code.
    actor, reward = shapes["model"], shapes.get("reward_model")
    critic_cfg = cfg.reward_model if cfg.ppo.critic_init == "reward" else cfg.model
    critic = reward if cfg.ppo.critic_init == "reward" else actor
    actor_prec = precision(cfg.strategy, cfg.model, device_type, cfg)
    critic_prec = precision(cfg.strategy, critic_cfg, device_type, cfg)
    ref_bytes = model_bytes(cfg.model.dtype, device_type)
    rm_bytes = model_bytes(cfg.reward_model.dtype, device_type)
    prompt, new = cfg.data.max_prompt_length, cfg.rollout.max_new_tokens
    seq = prompt + new
    prompts = -(-cfg.ppo.rollout_batch_size // workers)  # this worker's share of each iteration
    answers = cfg.rollout.n_samples_per_prompt
    rollout = prompts * answers
    generate = min(cfg.rollout.batch_size, prompts) * answers  # rollout.batch_size counts prompts
    micro = cfg.ppo.micro_batch_size
    logit_tokens = new + 1  # only the response region's logits are computed (logits_to_keep)

    def over(state_bytes: int) -> int:
        return shard_workers(cfg, workers, state_bytes, device_type, device_memory)

    rows = _trained_model("actor ", "actor", actor, actor.params, cfg.model.lora, actor_prec, cfg.strategy,
                          over(_trained_state(actor, actor.params, cfg.model.lora)))
    if cfg.uses_critic:
        rows += _trained_model("critic ", "critic", critic, critic.scalar_params, None, critic_prec, cfg.strategy,
                               over(_trained_state(critic, critic.scalar_params, None)))
    if cfg.uses_reference:
        rows += _frozen_model("reference", actor, actor.params * ref_bytes, ref_bytes, cfg.strategy,
                              over(actor.params * FROZEN_STATE_BYTES))
    if cfg.uses_reward_model:
        rows += _frozen_model("reward model", reward, reward.scalar_params * rm_bytes, rm_bytes, cfg.strategy,
                              over(reward.scalar_params * FROZEN_STATE_BYTES), role="reward")
    if cfg.rollout.engine == "vllm":
        rows += _vllm_engine(cfg, actor, actor_prec, device_type, device_memory)
    else:
        kv = 2 * actor.num_layers * generate * seq * actor.kv_width * actor_prec.compute_bytes
        rows.append(Component(f"generate: KV cache, {generate} x {seq} tokens", "kv_cache", kv, 0, "actor", "generate"))
        rows += _gathered_for_generation(cfg, actor, actor_prec)
    actor_width, critic_width = actor_prec.compute_bytes, critic_prec.compute_bytes
    rows += _pass("actor train", "actor", actor, micro, seq, micro * logit_tokens, actor_width, cfg.model, True)
    if cfg.ppo.ptx_coef > 0:
        ptx, length = cfg.ppo.ptx_micro_batch_size, cfg.data.pretrain_max_length
        rows += _pass("actor ptx", "actor", actor, ptx, length, ptx * length, actor_width, cfg.model, True)
    if cfg.uses_critic:
        rows += _pass("critic train", "critic", critic, micro, seq, 0, critic_width, critic_cfg, True)
    # The experience step scores this worker's rollout in pieces of ppo.micro_batch_size rows
    # (rlhf/roles/roles.py RoleForwards), so its peak follows the piece, not the rollout.
    piece = min(micro, rollout)
    piece_logits = piece * logit_tokens
    rows += _pass("actor log-probs", "actor", actor, piece, seq, piece_logits, actor_width, cfg.model, False)
    if cfg.uses_reference:
        rows += _pass("reference log-probs", "reference", actor, piece, seq, piece_logits, ref_bytes, cfg.model,
                      False)
    if cfg.uses_critic:
        rows += _pass("critic values", "critic", critic, piece, seq, 0, critic_width, critic_cfg, False)
    if cfg.uses_reward_model:
        rows += _pass("reward scores", "reward", reward, piece, seq, 0, rm_bytes, cfg.reward_model, False)
    return rows


def _gathered_for_generation(cfg, actor: ModelShape, prec: Precision) -> list[Component]:
    """rollout.gather_weights on a sharded actor: its whole weights in the compute dtype on
    every worker while it generates, beyond the few layers gathered for compute (counted
    already, resident)."""
    s = sharding(cfg.strategy)
    if not (s.params or s.offload_params) or not cfg.rollout.gathers_weights:
        return []
    adapters = lora_params(actor, cfg.model.lora) if cfg.model.lora.r > 0 else 0
    whole = actor.params + adapters
    working_set = min(actor.embedding_params + GATHERED_LAYERS * actor.layer_params, whole)
    return [Component("generate: the rest of the actor's weights, gathered whole for the rollout "
                      "(rollout.gather_weights)", "gathered", (whole - working_set) * prec.compute_bytes, 0, "actor",
                      "generate")]


def _loaded_models(cfg: Any, stage: str, shapes: dict) -> list[tuple[ModelConfig, ModelShape]]:
    """The models a stage reads from files, with their shapes (PPO: only the roles it builds)."""
    if stage != "ppo":
        return [(cfg.model, shapes["model"])]
    models = [(cfg.model, shapes["model"])]
    if cfg.uses_critic:
        reward_critic = cfg.ppo.critic_init == "reward"
        models.append((cfg.reward_model, shapes["reward_model"]) if reward_critic else (cfg.model, shapes["model"]))
    if cfg.uses_reward_model:
        models.append((cfg.reward_model, shapes["reward_model"]))
    return models


def load_transient(cfg: Any, stage: str, shapes: dict, device_type: str, workers: int) -> int:
    """The most a worker holds beyond its share of the weights while one model is read (rank 0,
    which reads the files), over the models the stage loads:
    - FSDP2, weights that are not a local safetensors directory (a hub id, a GGUF file): rank 0
      loads the model whole on the CPU (model.dtype as loaded there) and broadcasts the shards
      (rlhf/distributed/sharded_load.py);
    - ZeRO-3, a GGUF file: rank 0 holds one tensor dequantised and the same tensor gathered whole
      (rlhf/models/gguf_partitioned.py), the largest being the embedding or an MLP matrix; a
      GGUF architecture read by transformers' newer loader is loaded whole on every worker;
    - otherwise nothing: FSDP2 ranks read their own rows, zero.Init partitions layer by layer."""
    if not sharding(cfg.strategy).params or workers < 1:
        return 0
    from rlhf.models.loading import rank0_loads_whole

    transient = 0
    for model_cfg, shape in _loaded_models(cfg, stage, shapes):
        if model_cfg.tiny is not None:
            continue  # built from its config, sharded like a local directory
        gguf_file = model_cfg.gguf_file
        whole = shape.params * model_bytes(model_cfg.dtype, "cpu" if cfg.strategy.name == "fsdp" else device_type)
        if cfg.strategy.name == "fsdp":
            extra = whole if rank0_loads_whole(model_cfg.path, gguf_file) else 0
        elif gguf_file and _gguf_partitioned(model_cfg):
            largest = shape.hidden_size * max(shape.vocab_size, shape.intermediate_size)
            extra = 2 * largest * model_bytes(model_cfg.dtype, device_type)
        else:
            extra = whole - whole // workers if gguf_file else 0
        transient = max(transient, extra)
    return transient


def _gguf_partitioned(model_cfg: ModelConfig) -> bool:
    """Whether ZeRO-3 reads this GGUF file into the partitions (a file not there yet: assumed)."""
    from rlhf.models.gguf_partitioned import supports
    from rlhf.models.loading import gguf_path, resolve_location

    try:
        location, gguf_file = resolve_location(model_cfg, model_cfg.path)
        return supports(gguf_path(location, gguf_file, model_cfg.revision))
    except UserError:
        return True


def _vllm_engine(cfg, actor: ModelShape, prec: Precision, device_type: str, device_memory: int) -> list[Component]:
    """rollout.engine=vllm, colocated: the engine's own copy of the policy (merged, in
    rollout.vllm.dtype) and the memory vLLM takes beside it: rollout.vllm.kv_cache_gib of KV
    cache, or else gpu_memory_utilization of the device for weights and KV cache together.
    With rollout.vllm.sleep the KV cache is held only while generating, and on a GPU the
    weights too (vLLM's sleep mode keeps them in host memory meanwhile); the CPU backend frees
    only the KV cache. Engine actors (placement=actors) take nothing on the trainer's workers."""
    vllm = cfg.rollout.vllm
    if vllm.placement != "colocate":
        return []
    width = prec.param_bytes if vllm.dtype == "auto" else model_bytes(vllm.dtype, device_type)
    weights = actor.params * width
    if vllm.kv_cache_gib is not None:
        kv = int(vllm.kv_cache_gib * (1 << 30))
        kv_name = f"vLLM KV cache (rollout.vllm.kv_cache_gib={vllm.kv_cache_gib:g})"
    elif device_type == "cpu":  # sized to the calls' answers (rlhf/rollout/vllm_kv.py)
        from rlhf.rollout.vllm_kv import rollout_kv_bytes

        seq = vllm.max_model_len or cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        kv = rollout_kv_bytes(cfg.rollout.batch_size, seq, 2 * actor.num_layers * actor.kv_width * width)
        kv_name = f"vLLM KV cache ({cfg.rollout.batch_size} answers of {seq} tokens, rollout.batch_size)"
    else:
        kv = max(int(vllm.gpu_memory_utilization * device_memory) - weights, 0)
        kv_name = f"vLLM KV cache (rollout.vllm.gpu_memory_utilization={vllm.gpu_memory_utilization:g} less its weights)"
    asleep = vllm.sleep
    phase = "generate" if asleep else None
    if asleep and device_type == "cuda":
        rows = [Component("vLLM engine weights, on the device while generating", "engine", weights, 0, "actor",
                          "generate"),
                Component("vLLM engine weights in host memory while training (sleep mode)", "engine", 0, weights,
                          "actor")]
    else:
        rows = [Component("vLLM engine weights", "engine", weights, 0, "actor")]
    return rows + [Component(kv_name, "kv_cache", kv, 0, "actor", phase)]


_BUILDERS = {"sft": _sft_components, "rm": _rm_components, "ppo": _ppo_components}


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
        device_memory, memory_source = detect_device_memory(device_type, local_workers(stage_cfg, workers))
    shapes = dict(shapes or {})
    reads_reward_model = stage == "ppo" and (stage_cfg.uses_reward_model or
                                             (stage_cfg.uses_critic and stage_cfg.ppo.critic_init == "reward"))
    for key in ("model", "reward_model") if reads_reward_model else ("model",):
        if key not in shapes:
            shapes[key] = count_parameters(getattr(stage_cfg, key), key)
    components = _BUILDERS[stage](stage_cfg, shapes, workers, device_type, answers_per_prompt, int(device_memory))
    model = describe_model(stage_cfg.model, shapes["model"])
    if stage == "ppo" and "reward_model" in shapes:
        model = f"policy {model}; reward model {describe_model(stage_cfg.reward_model, shapes['reward_model'])}"
    plan = Plan(stage, workers, device_type, int(device_memory), memory_source or "--device-memory-gb", components,
                describe_strategy(stage_cfg.strategy),
                precision(stage_cfg.strategy, stage_cfg.model, device_type, stage_cfg).name, model,
                cfg=stage_cfg, shapes=shapes, answers_per_prompt=answers_per_prompt,
                load_transient=load_transient(stage_cfg, stage, shapes, device_type, workers))
    groups = stage_cfg.ppo.role_groups() if stage == "ppo" else None
    if groups:
        # Each role group runs on its own `resources` workers: plan the heaviest.
        plans = [(group, copy.copy(plan)) for group in groups]
        for group, sub in plans:
            sub.components = [c for c in components if c.role in group]
        group, plan = max(plans, key=lambda item: item[1].need)
        plan.note = f"role group [{', '.join(group)}], the heaviest of {len(groups)} (each runs on its own workers)"
    return plan

