"""Config sections shared by the stages. Each field's docstring is its documentation.

Stage configs (`SFTConfig`, ...) live in `rlhf/config.py` and are built from these sections.
Cross-field rules live in each section's `validate()`; `load_config` calls them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from rlhf.errors import ConfigError


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(choices)}")


@dataclass
class DataSourceConfig:
    path: str = ""
    """A local file (.jsonl, .json, .parquet, .csv), a directory saved with
    `datasets.save_to_disk`, or a hub dataset id. Empty means "not given"."""
    split: str = "train"
    """Split to read from a saved DatasetDict or a hub dataset."""
    name: Optional[str] = None
    """Hub dataset configuration name, if the dataset has several."""
    columns: Dict[str, str] = field(default_factory=dict)
    """Canonical field -> column in this data, e.g. {prompt: question, response: answer}."""
    format: str = "auto"
    """Row format; "auto" detects it per row from the fields present. See rlhf/data/formats.py."""

    @property
    def given(self) -> bool:
        return bool(self.path)


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 trains all weights."""
    alpha: int = 16
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TinyModelConfig:
    """A small Llama built from scratch, with a byte-level BPE tokenizer trained on the
    stage's training texts. Used by tests and the quickstart; never for real work."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    """Attention heads; the head size is hidden_size / num_heads, 16 by default, which vLLM's
    CPU engine refuses (it runs 32 and 64): a vLLM run sets 2. The quickstarts keep 4 because
    with 2 their DPO and GRPO gains fell just short of the core tests' thresholds."""
    intermediate_size: int = 256
    vocab_size: int = 512
    """Target size of the trained tokenizer (the BPE may stop below it on a small corpus)."""
    max_position_embeddings: int = 512


@dataclass
class ModelConfig:
    path: str = ""
    """A local Hugging Face model directory or a hub id."""
    gguf_file: Optional[str] = None
    """GGUF file inside `path` (or an absolute path); weights are dequantised on load."""
    tokenizer: Optional[str] = None
    """Tokenizer location when it differs from `path`."""
    tiny: Optional[TinyModelConfig] = None
    """Build a tiny model from this config instead of loading `path`."""
    revision: Optional[str] = None
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off: only enable for code you have read."""
    dtype: str = "auto"
    """auto (fp32 on CPU, bf16 on GPUs that support it), float32, bfloat16, float16."""
    attn_implementation: Optional[str] = None
    """sdpa, eager, flash_attention_2; None lets transformers choose."""
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        if not self.path and self.tiny is None:
            raise ConfigError("model.path is required (a model directory, hub id or GGUF location), or set model.tiny")
        if self.tiny is None and self.path.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(self.path)):
            raise ConfigError(f"model.path: {self.path}: no such directory")
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int = -1
    """Optimizer steps to run; -1 runs `epochs` full passes."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one worker."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all workers; accumulation = global / (micro * workers)."""
    lr: float = 1e-5
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule as a fraction of `lr`."""
    lr_scheduler: str = "cosine"
    """cosine, linear or constant, each after a linear warmup."""
    warmup_ratio: float = 0.03
    """Fraction of the total steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    eval_every: int = 50
    """Evaluate every N optimizer steps (and always at the end); 0 evaluates only at the end."""
    log_every: int = 1
    save_every: int = 0
    """Save a resumable checkpoint every N steps; 0 saves none."""
    keep_last: int = 2
    """Checkpoints to keep."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir if any), never, or a checkpoint path."""
    max_restarts: int = 3
    """On Ray: restarts of a stage from its newest checkpoint after a worker dies."""
    max_consecutive_nonfinite: int = 3
    """Steps (PPO: iterations) in a row with a non-finite loss, gradient norm, reward, log-prob
    or value, each skipped and counted, before the run stops."""

    def validate(self) -> None:
        _choice("train.lr_scheduler", self.lr_scheduler, ("cosine", "linear", "constant"))
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.warmup_ratio must be in [0, 1)")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        if len(self.adam_betas) != 2:
            raise ConfigError("train.adam_betas must have two values")


@dataclass
class KernelsConfig:
    """CPU speed-ups applied by `rlhf.kernels.accelerate` (nothing else changes a model's
    computation behind its back). Each gives the same numbers up to float rounding; the
    environment variables in brackets, when set, win over the file (the run's config.yaml
    records the values that were used)."""

    cpu_matmul: str = "auto"
    """[RLHF_CPU_MATMUL] Linear layers on the CPU: onednn, blas (PyTorch's default), or auto:
    oneDNN on a non-Intel CPU with AVX-512, where MKL leaves the wide units unused. Decode
    steps pack their weights for oneDNN under auto and onednn on any CPU; blas: never."""
    tune_host_memory: bool = True
    """[RLHF_TUNE_HOST_MEMORY] glibc's malloc kept from faulting in fresh pages every step
    (rlhf/kernels/host_memory.py); off: glibc's defaults."""
    fused_lm_loss: bool = True
    """Language-model losses (SFT, PPO-ptx) computed from hidden states and the head weight
    over chunks of tokens, never the whole (tokens, vocab) logits."""
    llama_decode_step: bool = True
    """Our decode step for plain Llama models in the decode engine (fused projections, a
    preallocated KV cache); off: the model's own forward at every step."""

    def effective(self, environ: Optional[Dict[str, str]] = None) -> "KernelsConfig":
        """This config with the environment's overrides applied."""
        environ = os.environ if environ is None else environ
        out = KernelsConfig(**{name: getattr(self, name) for name in self.__dataclass_fields__})
        if environ.get("RLHF_CPU_MATMUL", "").strip():
            out.cpu_matmul = environ["RLHF_CPU_MATMUL"].strip().lower()
        if environ.get("RLHF_TUNE_HOST_MEMORY", "").strip():
            out.tune_host_memory = environ["RLHF_TUNE_HOST_MEMORY"].strip() != "0"
        return out

    def validate(self) -> None:
        _choice("kernels.cpu_matmul", self.cpu_matmul, ("auto", "onednn", "blas"))


@dataclass
class StrategyConfig:
    name: str = "single"
    """single (one process), deepspeed or fsdp."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the optimizer step) in CPU memory: DeepSpeed ZeRO 1-3;
    under FSDP2 either offload flag offloads parameters, gradients and optimizer together."""
    offload_params: bool = False
    """Keep parameters in CPU memory between uses: DeepSpeed ZeRO-3 or FSDP2."""
    deepspeed_config: Optional[str] = None
    """A raw DeepSpeed JSON whose keys override the ones built from this config."""
    mixed_precision: str = "auto"
    """auto, no, bf16, fp16: compute in bf16/fp16 with fp32 master weights and AdamW states
    (single: autocast; DeepSpeed: its bf16/fp16 mode; FSDP2: MixedPrecisionPolicy), on GPUs and
    CPUs. auto: bf16 on GPUs that have it, and on CPUs with avx512_bf16 or amx_bf16 where a
    start-up probe times bf16 products faster than fp32 (rlhf/distributed/precision.py; the run
    logs the probe; RLHF_CPU_BF16=0 or 1 overrides it); fp32 elsewhere."""

    @property
    def shards_weights(self) -> bool:
        """Each worker holds only a shard of every model's weights (ZeRO-3, FSDP2)."""
        return self.name == "fsdp" or (self.name == "deepspeed" and self.zero_stage == 3)

    def validate(self) -> None:
        _choice("strategy.name", self.name, ("single", "deepspeed", "fsdp"))
        if self.mixed_precision == "False":  # YAML 1.1 reads an unquoted `no` as false
            self.mixed_precision = "no"
        _choice("strategy.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"strategy.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.name == "single" and (self.offload_params or self.offload_optimizer):
            raise ConfigError("strategy.offload_*: offload needs strategy.name=deepspeed or fsdp")
        if self.name == "deepspeed" and self.offload_params and self.zero_stage != 3:
            raise ConfigError("strategy.offload_params needs strategy.zero_stage=3 (only ZeRO-3 partitions parameters)")
        if self.name == "deepspeed" and self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("strategy.offload_optimizer needs strategy.zero_stage 1, 2 or 3")


_PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def forward_precision(strategy: StrategyConfig, model: ModelConfig, device_type: str, auto_bf16: bool) -> str:
    """fp32, bf16 or fp16: what a trained model's forwards compute in on a worker of this
    device type ("cpu" or "cuda"), as loading and the engines set it up. The same for the
    rollout and the training forward of one engine, but two low-precision forwards of another
    shape (a cached decode, a full sequence) round differently, so only fp32 makes them agree.
    `auto_bf16`: strategy.mixed_precision=auto resolves to bf16 on that device (a GPU with
    bf16; a CPU whose bf16 products the start-up probe found faster,
    rlhf/distributed/precision.py).

    - model.dtype auto: bf16 on a GPU with bf16, else fp32 (rlhf/models/loading.py);
    - strategy.mixed_precision auto: bf16 where `auto_bf16`, else fp32;
    - every engine computes in the mixed-precision dtype when there is one, on any device:
      the single strategy under autocast, DeepSpeed on a module cast to it, FSDP2 on
      low-precision gathered weights;
    - without mixed precision the weights' dtype is the compute dtype."""
    weights = _PRECISION_OF_DTYPE.get(model.dtype, "bf16" if device_type == "cuda" and auto_bf16 else "fp32")
    mixed = {"auto": "bf16" if auto_bf16 else "fp32", "no": "fp32", "False": "fp32"}.get(
        strategy.mixed_precision, strategy.mixed_precision)
    return mixed if mixed != "fp32" else weights


@dataclass
class LoggingConfig:
    backends: List[str] = field(default_factory=list)
    """Trackers besides the always-on metrics.jsonl: wandb, tensorboard."""
    project: str = "rlhf"
    """W&B project."""
    run_name: Optional[str] = None
    """W&B run name; None names the run after its output directory."""
    group: Optional[str] = None
    """W&B group: a pipeline id, so the SFT, RM and PPO runs of one pipeline show side by side."""
    wandb_mode: Optional[str] = None
    """offline (no account, no network; upload later with `wandb sync`), online or disabled.
    None: the WANDB_MODE environment variable if set, else offline. WANDB_MODE wins when both are set."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for perf/mfu; None detects H100/H200/A100/L40S/L4 (dense bf16)
    and assumes 1.4e11 on CPU. Unknown GPUs log no perf/mfu unless this is set."""
    progress: bool = True
    """Show a tqdm progress bar (plain log lines when output is not a terminal)."""
    verbose: bool = False
    """Also show the libraries' own progress bars and info messages (transformers' and the hub's
    weight loading and saving, vLLM's INFO lines); off, a stage prints only its own lines."""

    def validate(self) -> None:
        for backend in self.backends:
            _choice("logging.backends[]", backend, ("wandb", "tensorboard"))
        if self.wandb_mode is not None:
            _choice("logging.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError("logging.peak_flops must be > 0 (FLOP/s of one device)")


@dataclass
class RayConfig:
    enabled: bool = False
    """Run the stage as a group of Ray actors, one per training process. Off: a plain process
    (or whatever torchrun / the deepspeed launcher started)."""
    address: str = ""
    """Empty: start a private local Ray (127.0.0.1, dashboard off). `auto` joins the cluster
    started on this machine by `ray start` (launchers/ray_head.sh); `HOST:PORT` or
    `ray://HOST:10001` (Ray Client) join a remote one."""
    namespace: str = "rlhf"
    num_cpus: Optional[int] = None
    """CPUs of the local Ray (address empty); None: all of this machine's."""
    num_gpus: Optional[int] = None
    """GPUs of the local Ray (address empty); None: all visible ones."""
    working_dir: str = ""
    """Directory shipped to every node with the Ray runtime_env (for clusters without a shared
    filesystem); empty: nodes see the driver's files at the same paths."""
    env_vars: Dict[str, str] = field(default_factory=dict)
    """Extra environment for the workers (besides the forwarded HF_*, WANDB_MODE/DIR/PROJECT,
    NCCL_*, OMP settings). Secrets such as WANDB_API_KEY are never forwarded: set them on the nodes."""

    def validate(self) -> None:
        if self.working_dir and not os.path.isdir(self.working_dir):
            raise ConfigError(f"ray.working_dir: {self.working_dir}: no such directory")
        secret = [k for k in self.env_vars if _looks_secret(k)]
        if secret:
            raise ConfigError(f"ray.env_vars: {', '.join(secret)} looks like a secret; configs are saved with the run, "
                              "so set it in the nodes' environment instead")


def _looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in ("KEY", "TOKEN", "SECRET", "PASSWORD"))


@dataclass
class ResourcesConfig:
    """What each stage asks of the cluster when it runs on Ray: `num_nodes x workers_per_node`
    training processes (Ray actors) in one placement group. With GPUs each worker slot is its
    own bundle of whole GPUs, so two ranks of one group never share a device (PPO roles in one
    ppo.colocate group share their slot's GPUs on purpose); on CPUs one bundle per node. See
    rlhf/ray/placement.py."""

    num_nodes: int = 1
    workers_per_node: int = 1
    """Training processes per node (usually one per GPU)."""
    cpus_per_worker: Optional[float] = None
    """None: the smallest node's CPUs divided by workers_per_node (colocated PPO roles split a
    worker's share between them)."""
    gpus_per_worker: Optional[float] = None
    """None: 1 where the cluster has GPUs, else 0."""

    @property
    def workers(self) -> int:
        return self.num_nodes * self.workers_per_node

    def validate(self) -> None:
        if self.num_nodes < 1 or self.workers_per_node < 1:
            raise ConfigError("resources.num_nodes and resources.workers_per_node must be >= 1")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError("resources.cpus_per_worker must be > 0")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError("resources.gpus_per_worker must be >= 0")
        self.check_gpu_share(1)

    def check_gpu_share(self, roles_sharing: int) -> None:
        """Refuse GPU counts Ray cannot place on distinct devices, when the config is read rather
        than when the placement group is reserved (rlhf/ray/placement.py asks the same)."""
        problem = gpu_share_problem(self.gpus_per_worker or 0, roles_sharing)
        if problem:
            raise ConfigError(problem)


def _whole(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


def gpu_share_problem(gpus_per_worker: float, roles_sharing: int) -> Optional[str]:
    """Why Ray could not give each of `roles_sharing` colocated roles of a worker slot of
    `gpus_per_worker` GPUs its own whole devices (None: it can). A slot holds whole GPUs (Ray
    packs fractions best-fit, which would put two ranks of one NCCL group on one GPU), and a
    slot of several GPUs splits into whole GPUs per role."""
    if gpus_per_worker and not _whole(gpus_per_worker):
        return (f"resources.gpus_per_worker={gpus_per_worker:g}: a worker takes whole GPUs. Ray would put two "
                "workers' fractions on one GPU, and NCCL refuses two ranks of one group on one device; to share "
                "GPUs between PPO roles, list them in one ppo.colocate group")
    per_role = gpus_per_worker / roles_sharing
    if gpus_per_worker > 1 and not _whole(per_role):
        return (f"resources.gpus_per_worker={gpus_per_worker:g} shared by {roles_sharing} colocated roles is "
                f"{per_role:.3g} GPUs each, which Ray cannot place on whole devices: use 1 GPU per worker "
                f"(all roles of a group on it) or a multiple of {roles_sharing}")
    return None


@dataclass
class AlarmsConfig:
    """Health alarms of a PPO / GRPO run (rlhf/logging/alarms.py), checked every iteration from
    the metrics the loop logs. Each fires once when its condition starts holding (again after it
    stopped): one printed line with the numbers and what to try, alarms/<name> = 1 in the metrics
    and the trackers, and a line in `rlhf report`. Trend alarms compare the mean of the last
    `window` iterations with the mean of the first `window` (the SFT policy's behaviour). A
    threshold of 0 turns its alarm off."""

    enabled: bool = True
    """Check the alarms at all."""
    window: int = 5
    """Iterations averaged on each side of a comparison (smooths the noise of one batch)."""
    kl_budget: Optional[float] = None
    """kl_budget: the mean ppo/kl (nats per answer) of the last `window` iterations above this.
    None: kl.target."""
    length_growth: float = 1.5
    """length_growth: the mean response length grew by more than this factor (length hacking)."""
    repetition_rise: float = 0.2
    """repetition_rise: ppo/repetition, the share of an answer's n-grams that repeat an earlier
    one, rose by more than this (absolute; repetition hacking)."""
    repetition_ngram: int = 3
    """n of the n-grams ppo/repetition counts (metric only; it is logged whatever the alarms)."""
    eos_drop: float = 0.5
    """eos_collapse: the EOS rate fell below this fraction of its start (answers run to
    rollout.max_new_tokens)."""
    entropy_drop: float = 0.3
    """entropy_collapse: the policy's entropy fell below this fraction of its start."""
    explained_variance_patience: int = 10
    """value_explained_variance: the critic's explained variance was negative this many
    iterations in a row (its values explain the returns worse than their mean). Runs with a critic
    only; the first iterations of a fresh critic are often negative."""
    clip_frac_max: float = 0.3
    """clip_frac_high: the mean clip fraction of the last `window` iterations above this."""
    approx_kl_max: float = 0.05
    """approx_kl_high: the mean approx KL (old vs updated policy, per token) of the last `window`
    iterations above this."""
    overoptimization_evals: int = 3
    """overoptimization: over the last this-many evaluations, the held-out reward-model score
    rose (least-squares slope > 0) while eval.gold_reward fell; without a gold reward, the training
    reward rose while the held-out reward fell. 0: off; else >= 2."""
    overoptimization_min_fall: float = 0.1
    """The fall of the gold (held-out) reward over those evaluations (of the fitted line) must
    exceed this fraction of its whole range so far (max - min over every evaluation): noise on
    a plateau stays quiet."""

    def validate(self) -> None:
        if self.window < 1:
            raise ConfigError("alarms.window must be >= 1 (iterations averaged)")
        if self.kl_budget is not None and self.kl_budget <= 0:
            raise ConfigError("alarms.kl_budget must be > 0 (nats per answer), or null for kl.target")
        if self.repetition_ngram < 1:
            raise ConfigError("alarms.repetition_ngram must be >= 1")
        for name in ("length_growth", "repetition_rise", "eos_drop", "entropy_drop", "clip_frac_max", "approx_kl_max",
                     "explained_variance_patience", "overoptimization_min_fall"):
            if getattr(self, name) < 0:
                raise ConfigError(f"alarms.{name} must be >= 0 (0 turns its alarm off)")
        if self.length_growth and self.length_growth <= 1:
            raise ConfigError(f"alarms.length_growth={self.length_growth}: a growth factor > 1, or 0 for off")
        for name in ("eos_drop", "entropy_drop"):
            if getattr(self, name) >= 1:
                raise ConfigError(f"alarms.{name}={getattr(self, name)}: a fraction of the start below 1, or 0 for off")
        if self.overoptimization_evals == 1 or self.overoptimization_evals < 0:
            raise ConfigError("alarms.overoptimization_evals: 0 (off) or >= 2 evaluations (a trend needs two points)")
