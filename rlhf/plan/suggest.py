"""Suggestions for a plan that does not fit: single config changes (or a worker count), least
disruptive first, each re-estimated with the same model shapes and kept only when it fits."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from rlhf.errors import ConfigError
from rlhf.plan.memory import Plan, estimate
from rlhf.plan.units import size

LORA_RANK = 16
"""Rank the LoRA suggestion proposes."""
MAX_WORKERS = 1024
"""The largest worker count the "more workers" suggestion considers."""


@dataclass
class Suggestion:
    """One change that makes a plan fit, with the re-estimated plan it gives."""

    text: str
    overrides: dict[str, Any]
    """Config changes (dotted key -> value)."""
    workers: Optional[int]
    """A different worker count, or None."""
    plan: Plan = field(repr=False)

    def __str__(self) -> str:
        changes = [f"--workers {self.workers}"] if self.workers else []
        changes += [f"{key}={yaml_value(value)}" for key, value in self.overrides.items()]
        return (f"{self.text}: {' '.join(changes)} "
                f"(fits: {size(self.plan.need)} of {size(self.plan.usable)} usable)")


def yaml_value(value: Any) -> str:
    """A config value as an override writes it (YAML booleans are lower case)."""
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


def _rollout_layer_by_layer(plan: Plan) -> Optional[Suggestion]:
    """A sharded actor generating on its whole gathered weights (rollout.gather_weights): gather
    one layer at a time in every decode step instead."""
    if plan.stage != "ppo" or not any("rollout.gather_weights" in c.name for c in plan.components):
        return None
    return _fitting(plan, "gather the actor's weights layer by layer in each decode step, not whole for the "
                    "rollout (slower generation)", {"rollout.gather_weights": False})


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


SUGGESTERS = (_lower_batches, _checkpointing, _rollout_layer_by_layer, _zero_stage, _offload_optimizer, _offload_params, _lora, _more_workers)
"""Least disruptive first."""


def plan_suggestions(plan: Plan) -> list[Suggestion]:
    """Single changes that make `plan` fit, each re-estimated; empty when it already fits."""
    if plan.fits:
        return []
    return [s for s in (suggest(plan) for suggest in SUGGESTERS) if s is not None]


def suggestions(plan: Plan) -> list[str]:
    """The suggestions as lines: what to change, the overrides, and the re-estimated need."""
    return [str(s) for s in plan_suggestions(plan)]

