"""One optimizer step of every stage (SFT, RM, PPO with a critic, GRPO, DPO) under one strategy.

All five run in one launch of the strategy's processes, one after the other in each process,
through the stages' own `main` (handed over from the registry by the CLI, which is the one
module that knows it) with tiny configs: a 2-layer model built from a config, a few dozen rows
of the quickstart task, one step each. The chain is the pipeline's: RM and DPO start from the
SFT export, PPO from SFT (actor, reference) and RM (reward model, critic), GRPO from SFT with a
reward function and no critic. Rank 0 then checks each stage: every loss it logged at step 1
finite, nothing skipped as non-finite, and the exported weights different from the weights it
started from.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

STAGE_STEPS = ("sft", "rm", "ppo", "grpo", "dpo")

STRATEGIES: dict[str, list[str]] = {
    "single": ["strategy.name=single"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    "fsdp": ["strategy.name=fsdp"],
}
"""The strategies a doctor run can try, by the name the table shows."""

FAULT_VARIABLE = "RLHF_DOCTOR_FAULT"
"""Tests only: stages to break, "sft" (its embeddings give NaN) or "dpo:raise" (they raise),
comma-separated; see `injected_faults`."""

_TINY = ["model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=4",
         "model.tiny.intermediate_size=128", "model.tiny.vocab_size=384"]
_COMMON = ["logging.progress=false", "overwrite=true", "train.max_steps=1", "train.warmup_ratio=0.0",
           "train.eval_every=0", "train.save_every=0", "train.max_consecutive_nonfinite=100"]
MIN_CHANGE = 5e-3
"""Smallest relative change of the weights that counts as a step. AdamW's first step moves every
weight by about lr (1e-3 here): ~1.5e-2 relative for the tiny model. Weights that only went
through a bf16 round trip (a GPU loads the fp32 tiny model in bf16) move by ~2e-3."""
_LOSS_KEYS = {"sft": "sft/loss", "rm": "rm/loss", "dpo": "dpo/loss", "ppo": "ppo/policy_loss",
              "grpo": "ppo/policy_loss"}


def response_length_reward(prompt: str, response: str, **fields: Any) -> float:
    """GRPO's reward in the doctor: the answer's length in characters, over 100. Sampled
    answers of one prompt differ in length, so groups are not uniform and advantages not zero
    (an untrained model scores 0 on every real task, and a zero advantage trains nothing)."""
    return len(response) / 100.0


def write_data(directory: Path, workers: int) -> dict[str, str]:
    """Rows of each quickstart file for one step of every stage on `workers` processes (a
    global batch grows with them; PPO takes 4 prompts per worker), and the
    DeepSpeed JSON of the ZeRO-3 runs: every weight partitioned (by default weights under a
    size threshold stay whole on every rank, which for the tiny model is all of them, and the
    gathering a real model needs would go unchecked)."""
    from rlhf.data.quickstart import synthesize

    scale = max(2, workers)
    files = synthesize(directory, seed=0, sft_rows=32 * scale, rank_rows=24 * scale, prompt_rows=20 * scale,
                       pretrain_rows=16)
    zero3 = Path(directory) / "zero3_partition_all.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}), encoding="utf-8")
    return {**files, "zero3_config": str(zero3)}


def stage_runs(work: Path, data: Mapping[str, str], strategy: str, world_size: int) -> list[tuple[str, str, list[str]]]:
    """(check name, registry stage, overrides) for each stage step, in the order they must run."""
    engine = list(STRATEGIES[strategy])
    if strategy == "zero3":
        engine.append(f"strategy.deepspeed_config={data['zero3_config']}")
    out = {name: work / strategy / name for name in STAGE_STEPS}
    sft_model, rm_model = out["sft"] / "model", out["rm"] / "model"
    batch = ["train.micro_batch_size=2", f"train.global_batch_size={2 * world_size}"]
    lengths = ["data.max_length=64", "data.max_prompt_length=32"]
    ppo_common = [f"model.path={sft_model}", f"data.prompts.path={data['prompts']}",
                  f"data.eval_prompts.path={data['prompts_eval']}", "data.max_prompt_length=32",
                  "ppo.iterations=1", "ppo.eval_every=0", "ppo.sample_every=0", "ppo.actor_lr=1e-3",
                  "ppo.critic_lr=1e-3", "rollout.max_new_tokens=8", "rollout.batch_size=8",
                  "eval.max_prompts=2", "eval.samples_per_prompt=1", "logging.progress=false", "overwrite=true",
                  "ppo.ppo_epochs=1"]
    return [
        ("sft", "sft", [*_TINY, *_COMMON, *engine, *batch, *lengths, f"data.train.path={data['sft']}",
                        "data.eval_fraction=0.1", "train.lr=1e-3", f"output_dir={out['sft']}"]),
        ("rm", "rm", [*_COMMON, *engine, *batch, *lengths, f"model.path={sft_model}", f"data.train.path={data['rank']}",
                      "data.eval_fraction=0.1", "train.lr=1e-3", f"output_dir={out['rm']}"]),
        ("ppo", "ppo", [*ppo_common, *engine, f"reward_model.path={rm_model}", "reward.normalize=running",
                        f"ppo.rollout_batch_size={4 * world_size}", f"ppo.mini_batch_size={4 * world_size}",
                        "ppo.micro_batch_size=2", f"output_dir={out['ppo']}"]),
        ("grpo", "ppo", [*ppo_common, *engine, "ppo.advantage=grpo", "rollout.n_samples_per_prompt=4",
                         f"reward.functions=[{__name__}:response_length_reward]", "reward.normalize=none",
                         "reward.clip=0.0", "kl.coef=0.0", f"ppo.rollout_batch_size={2 * world_size}",
                         f"ppo.mini_batch_size={8 * world_size}", "ppo.micro_batch_size=4",
                         f"output_dir={out['grpo']}"]),
        ("dpo", "dpo", [*_COMMON, *engine, *batch, *lengths, f"model.path={sft_model}",
                        f"data.train.path={data['rank']}", "data.eval_fraction=0.1", "train.lr=1e-3",
                        f"output_dir={out['dpo']}"]),
    ]


def injected_faults(value: str) -> dict[str, str]:
    """RLHF_DOCTOR_FAULT="sft,dpo:raise" -> {"sft": "nan", "dpo": "raise"}."""
    faults = {}
    for item in filter(None, (i.strip() for i in value.split(","))):
        stage, _, mode = item.partition(":")
        faults[stage] = mode or "nan"
    return faults


@contextmanager
def _injected_fault(mode: str | None) -> Iterator[None]:
    """While active, every embedding lookup returns NaN ("nan") or raises ("raise"): the tests'
    way to see a step fail, or a stage crash in the middle of a launch."""
    if mode is None:
        yield
        return

    def poison(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        if not isinstance(module, torch.nn.Embedding):
            return None
        if mode == "raise":
            raise RuntimeError("fault injected by RLHF_DOCTOR_FAULT")
        return output * float("nan")

    handle = torch.nn.modules.module.register_module_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def parameter_change(before: Path, after: Path) -> float:
    """Relative L2 change of the weights the two directories share (same name and shape); a
    reward model's new head and a causal LM's output layer are not compared."""
    old, new = _weights(before), _weights(after)
    common = [k for k in old if k in new and old[k].shape == new[k].shape]
    if not common:
        raise ValueError(f"no weights in common between {before} and {after}")
    diff = math.sqrt(sum(float((new[k].double() - old[k].double()).pow(2).sum()) for k in common))
    norm = math.sqrt(sum(float(old[k].double().pow(2).sum()) for k in common))
    return diff / max(norm, 1e-30)


def check_stage(name: str, run_dir: Path, start_weights: Path) -> dict[str, Any]:
    """PASS when the step-1 row logged finite losses, skipped nothing, and the weights moved."""
    from rlhf.logging.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("step") == 1]
    if not rows:
        return {"status": "FAIL", "detail": f"no step-1 metrics in {run_dir / 'metrics.jsonl'}"}
    row = {k: v for r in rows for k, v in r.items()}
    losses = {k: v for k, v in row.items() if "loss" in k.split("/")[-1] and not k.startswith("eval/")}
    bad = sorted(k for k, v in losses.items() if not (isinstance(v, (int, float)) and math.isfinite(v)))
    skipped = sum(v for k, v in row.items() if k.endswith("/skipped_nonfinite"))
    loss = row.get(_LOSS_KEYS[name], float("nan"))
    figures = {"loss": loss, "step_seconds": row.get("perf/step_seconds", row.get("perf/train_seconds"))}
    if name == "ppo" and "ppo/value_loss" not in row:
        return {"status": "FAIL", "figures": figures, "detail": "no critic update (ppo/value_loss) at step 1"}
    if bad or skipped:
        return {"status": "FAIL", "figures": figures,
                "detail": f"non-finite {', '.join(bad) or 'values'} at step 1 ({int(skipped)} step(s) skipped)"}
    change = parameter_change(start_weights, run_dir / "model")
    figures["param_change"] = change
    if not change > MIN_CHANGE:
        return {"status": "FAIL", "figures": figures, "detail": "the step left the weights (almost) unchanged: "
                f"relative change {change:.1e} <= {MIN_CHANGE:g}"}
    critic = f", value loss {row['ppo/value_loss']:.4g}" if name == "ppo" else ""
    return {"status": "PASS", "figures": figures,
            "detail": f"loss {loss:.4g}{critic}, weights moved {change:.2e} (relative)"}


def run_stage_steps(spec: Mapping[str, Any], stages: Mapping[str, Any], result_path: Path) -> None:
    """The worker's side: every stage step of one strategy, in this process (one of the
    launch's ranks). Rank 0 checks each stage and writes the results as they come, so that
    when a stage raises, what ran before it is kept; the error is written, then raised."""
    from rlhf.config import load_config

    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    is_main = int(os.environ.get("RANK", "0") or 0) == 0
    work, strategy = Path(spec["work"]), spec["strategy"]
    faults = injected_faults(os.environ.get(FAULT_VARIABLE, ""))
    results: dict[str, dict] = {}

    def publish() -> None:
        if is_main:
            result_path.write_text(json.dumps(results, indent=1), encoding="utf-8")

    for check, stage_name, overrides in stage_runs(work, spec["data"], strategy, world_size):
        if check not in spec["stages"]:
            continue
        stage = stages[stage_name]
        started = time.perf_counter()
        results[check] = {"status": "FAIL", "detail": "started and did not finish"}
        publish()
        try:
            cfg = load_config(stage.config, [], overrides)
            with _injected_fault(faults.get(check)):
                stage.main(cfg)
            if is_main:
                start = Path(cfg.output_dir) / "init_model" if check == "sft" else work / strategy / "sft" / "model"
                results[check] = check_stage(check, Path(cfg.output_dir), start)
            else:
                results[check] = {"status": "PASS"}
        except BaseException as exc:
            results[check] = {"status": "FAIL", "detail": f"{type(exc).__name__}: {exc}".splitlines()[0],
                              "traceback": traceback.format_exc()}
            publish()
            raise
        results[check]["seconds"] = round(time.perf_counter() - started, 2)
        publish()
