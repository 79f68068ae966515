"""DeepSpeed ZeRO stage 0-3, optimizer/parameter offload to CPU, behind the Strategy interface.

The DeepSpeed config is built from ours (`build_deepspeed_config`): batch geometry and
gradient accumulation from `train.*`, clipping from `train.max_grad_norm`, AdamW declared in
the config (ZeRO-Offload refuses a client optimizer) over our decay/no-decay parameter
groups, our learning-rate schedule passed as a callable. A raw JSON in
`strategy.deepspeed_config` is merged over it key by key; batch keys that disagree with
`train.*` are refused, since the loss contract depends on them.

On CPU (no GPU) nothing is compiled: the optimizer is `torch.optim.AdamW` (`torch_adam`),
also under offload, where DeepSpeedCPUAdam would cost a g++ build of minutes on first use and
is only faster, not more correct; and the shared-memory all-reduce op (another such build at
`init_distributed`) is switched off, so collectives go through gloo (BENCHMARKS.md,
'Measurements behind the code'). On GPU DeepSpeed's own FusedAdam / DeepSpeedCPUAdam are used.

Loss contract (see strategy.py): `engine.backward(loss * world_size, scale_wrt_gas=False)`:
no division by gradient_accumulation_steps, and the rank-averaging of the gradient reduction
is undone by the factor world_size. DeepSpeed counts micro-steps itself: `backward` advances
its counter with `engine.step()` on every micro-batch but the last (a no-op for the weights),
and `step` runs the real update at the accumulation boundary.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhf.config_sections import StrategyConfig
from rlhf.distributed import reshard
from rlhf.distributed.env import prepare_deepspeed_import
from rlhf.distributed.precision import ProbeShape, resolve_precision
from rlhf.distributed.group import DistributedStrategy
from rlhf.distributed.optim import OptimizerSpec, build_scheduler, param_groups
from rlhf.distributed.strategy import TrainedModel
from rlhf.errors import ConfigError
from rlhf.kernels.host_memory import release_fragments
from rlhf.models.loading import WHOLE, Placement

CHECKPOINT_TAG = "engine"
_GENERATION_CLAIM = -1
"""The id under which `gathered_for_generation` claims the weights (DeepSpeed numbers modules
from 0)."""
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _deepspeed():
    prepare_deepspeed_import()
    import deepspeed

    return deepspeed


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_raw_config(path: str | None) -> dict:
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"strategy.deepspeed_config: {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"strategy.deepspeed_config: {path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"strategy.deepspeed_config: {path}: must hold a JSON object")
    return raw


def build_deepspeed_config(
    cfg: StrategyConfig,
    spec: OptimizerSpec,
    micro_batch_size: int,
    accumulation: int,
    world_size: int,
    device_type: str,
    raw: dict | None = None,
    probe_shape: ProbeShape | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON for one model, from our config, with `raw` merged over it
    (`probe_shape`: the strategy's, for `auto` on a CPU)."""
    on_gpu = device_type == "cuda"
    precision = resolve_precision(cfg.mixed_precision, torch.device(device_type), probe_shape)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * world_size,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": spec.lr,
                "betas": list(spec.betas),
                "eps": spec.eps,
                "weight_decay": spec.weight_decay,
                # torch.optim.AdamW: no C++/CUDA build; on GPU DeepSpeed's fused kernels.
                "torch_adam": not on_gpu,
                **({} if on_gpu else {"fused": True}),  # passed on to torch.optim.AdamW
            },
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    raw = raw or {}
    for key in _BATCH_KEYS:
        if key in raw and raw[key] != config[key]:
            raise ConfigError(
                f"strategy.deepspeed_config sets {key}={raw[key]}, but train.global_batch_size / "
                f"train.micro_batch_size and the world size give {config[key]}; set those instead"
            )
    return _merge(config, raw)


def partitioned_config(cfg: StrategyConfig, world_size: int, device_type: str, raw: dict | None = None,
                       probe_shape: ProbeShape | None = None) -> dict:
    """The ZeRO-3 config that builds models partitioned (zero.Init) and runs frozen ones: no
    optimizer, one micro-batch per step (frozen engines never step); parameter offload,
    precision and the raw JSON's ZeRO and precision keys as for the trained models."""
    precision = resolve_precision(cfg.mixed_precision, torch.device(device_type), probe_shape)
    zero: dict[str, Any] = {"stage": 3}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    raw = {key: value for key, value in (raw or {}).items() if key in ("zero_optimization", "bf16", "fp16")}
    config = _merge(config, raw)
    config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"}
    config["zero_optimization"]["stage"] = 3
    return config


class DeepSpeedStrategy(DistributedStrategy):
    name = "deepspeed"

    def setup(self, seed: int) -> None:
        deepspeed = _deepspeed()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed calls collectives torch has renamed; the warning repeats on every call.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        super().setup(seed)
        if self.device.type == "cpu":
            # The shared-memory all-reduce op compiles for minutes on first use; gloo does the job.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # Wraps the process group set up above (no second initialisation, no MPI discovery).
        deepspeed.init_distributed(dist_backend=self.backend, auto_mpi_discovery=False)

    def wrap(
        self, model: torch.nn.Module, spec: OptimizerSpec, accumulation: int = 1, micro_batch_size: int = 1
    ) -> TrainedModel:
        config = build_deepspeed_config(self.cfg, spec, micro_batch_size, accumulation, self.world_size,
                                        self.device.type, load_raw_config(self.cfg.deepspeed_config), self.probe_shape)
        engine, optimizer, _, scheduler = _deepspeed().initialize(
            model=model,
            model_parameters=param_groups(model, spec.weight_decay),
            config=config,
            lr_scheduler=lambda opt: build_scheduler(opt, spec),
            dist_init_required=False,
        )
        return TrainedModel(engine, optimizer, scheduler, spec.max_grad_norm, accumulation, strategy=self)

    def _partitioned_config(self) -> dict:
        return partitioned_config(self.cfg, self.world_size, self.device.type,
                                  load_raw_config(self.cfg.deepspeed_config), self.probe_shape)

    def placement(self) -> Placement:
        """ZeRO-3: built partitioned (zero.Init), so no rank holds a whole model; ZeRO 0-2
        keep whole weights on every rank anyway."""
        if self.cfg.zero_stage != 3:
            return WHOLE
        gathered = _deepspeed().zero.GatheredParameters
        return Placement("zero3", self._partitioned_config(), lambda params: gathered(params, modifier_rank=0),
                         self.rank, self.from_main)

    def freeze(self, model: torch.nn.Module) -> torch.nn.Module:
        """ZeRO-3: an engine without optimizer over the partitioned model, whose forwards gather
        layer by layer (as DeepSpeed-Chat and OpenRLHF run their reference and reward models);
        ZeRO 0-2: the whole model."""
        if self.cfg.zero_stage != 3:
            return super().freeze(model)
        model.requires_grad_(False)
        engine, *_ = _deepspeed().initialize(model=model, config=self._partitioned_config(), dist_init_required=False)
        return engine

    def unwrap(self, model: TrainedModel) -> torch.nn.Module:
        return model.module.module

    @contextmanager
    def gathered_for_generation(self, model: torch.nn.Module) -> Iterator[bool]:
        """ZeRO-3: every partitioned weight of `model` gathered once, held for the block. The
        per-module hooks would otherwise release a weight after each submodule's forward (and
        gather it again in the next one): a parameter is released only while no submodule
        claims it, so the block claims every one under an id no module has."""
        params = [param for param in model.parameters() if hasattr(param, "ds_id")]
        if not params:  # ZeRO 0-2: the weights are whole already
            yield False
            return
        with _deepspeed().zero.GatheredParameters(params, modifier_rank=None):
            for param in params:
                param.ds_active_sub_modules.add(_GENERATION_CLAIM)
            try:
                yield True
            finally:  # before GatheredParameters re-partitions them, which refuses claimed weights
                for param in params:
                    param.ds_active_sub_modules.discard(_GENERATION_CLAIM)

    def backward(self, model: TrainedModel, loss: torch.Tensor) -> None:
        engine = model.module
        last = self._count_backward(model)
        if last != engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's micro-step counter is out of step with this strategy's")
        engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if not last:
            engine.step()  # only advances DeepSpeed's micro-step counter

    def step(self, model: TrainedModel) -> float:
        engine = model.module
        self._check_step(model)
        # Stage 0 in fp32 steps a plain torch optimizer that reports no norm; its gradients
        # are already all-reduced here, identical on every rank.
        fallback = _grad_norm(engine.module) if engine.zero_optimization_stage() == 0 else None
        engine.step()
        norm = engine.get_global_grad_norm()
        norm = fallback if norm is None else norm
        release_fragments()
        return float(norm) if norm is not None else float("nan")

    # -- state --------------------------------------------------------------------------
    def save_state(self, model: TrainedModel, directory: Path) -> None:
        # Model and optimizer shards of every rank, the schedule, DeepSpeed's step counters.
        model.module.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)

    def load_state(self, model: TrainedModel, directory: Path) -> None:
        """Saved by this many workers: as saved; by another number (ZeRO 1-3 partitions the
        optimizer by rank): through DeepSpeed's universal checkpoint, converted once (reshard.py)."""
        engine = model.module
        saved = reshard.zero_saved_world_size(directory / CHECKPOINT_TAG)
        if saved is not None and saved != self.world_size:
            universal = reshard.ensure_universal(self, directory, CHECKPOINT_TAG, saved)
            reshard.load_universal(engine, universal, CHECKPOINT_TAG)
            return
        path, _ = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    def full_state_dict(self, model: TrainedModel) -> dict[str, torch.Tensor]:
        engine = model.module
        module = engine.module
        if engine.zero_optimization_stage() < 3:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if self.is_main else {}
        deepspeed = _deepspeed()
        params = dict(module.named_parameters(remove_duplicate=False))
        state: dict[str, torch.Tensor] = {}
        gathered: dict[int, torch.Tensor] = {}
        for name, value in module.state_dict(keep_vars=True).items():
            param = params.get(name)
            if param is None:  # a buffer: not partitioned
                if self.is_main:
                    state[name] = value.detach().cpu().clone()
                continue
            if id(param) not in gathered:
                # One parameter at a time: peak memory is one full tensor, not the model.
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    gathered[id(param)] = param.detach().cpu().clone() if self.is_main else torch.empty(0)
            if self.is_main:
                state[name] = gathered[id(param)]
        return state


def _grad_norm(module: torch.nn.Module) -> float | None:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
