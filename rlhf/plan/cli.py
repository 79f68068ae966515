"""The `rlhf plan` command: its arguments, the plan as a table (or JSON), and the refusal
printed on stderr when it does not fit. Exits 0 when the plan fits, 3 when it does not."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rlhf.errors import UserError
from rlhf.plan.devices import default_workers, detect_device_type
from rlhf.plan.memory import STAGES, Plan, estimate
from rlhf.plan.suggest import Suggestion, plan_suggestions, yaml_value
from rlhf.plan.units import GiB, size

def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.3f}"


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
    lines.append(f"at load: {size(plan.load_peak)} per worker (framework baseline and the weights as built, "
                 "before the first step)")
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
             "activations and logits": plan.activations.device, "generation KV cache": plan.kv_cache.device,
             "vLLM engine weights": plan.engine.device}
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
              for kind in ("parameters", "gathered", "gradients", "optimizer", "activations", "frozen", "kv_cache",
                           "engine")}
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
        "load_peak_bytes": plan.load_peak,
        "available_bytes": plan.available,
        "usable_bytes": plan.usable,
        "memory_source": plan.memory_source,
        "safety_margin": plan.margin,
        "fits": plan.fits,
        "suggestions": [{"text": str(t), "overrides": [f"{k}={yaml_value(v)}" for k, v in t.overrides.items()],
                         "workers": t.workers, "need_bytes": t.plan.need} for t in tips],
    }



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


def run_plan(args: argparse.Namespace, cfg: Any) -> int:
    """Print the plan of `cfg` (the stage config `args` name, loaded by the caller: rlhf.config
    reads model shapes from this package); 0 when it fits, 3 when it does not. Config errors
    (UserError) propagate."""
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
