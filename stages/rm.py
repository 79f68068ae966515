"""Stage 2, reward model: a scalar head on the SFT backbone trained to rank answers.

    rlhf rm --config configs/rm.yaml [key=value ...]
    rlhf rm score --model runs/rm/model --data FILE --out scores.jsonl

Each batch element is one prompt with its K ranked answers: the K answers are scored in one
forward pass (by default in one row with the prompt forwarded once, `data.share_prompt`) and the loss averages -log σ(r_better - r_worse - margin) over that prompt's
C(K,2) untied pairs (InstructGPT). Writes config.yaml, metrics.jsonl, checkpoints/ and the
best model (by eval pairwise accuracy) with its eval score statistics into `output_dir`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config import RMConfig, save_config
from rlhf.data.rank_dataset import RankBatches, encode_rank
from rlhf.data.sft_dataset import TruncationStats
from rlhf.data.splits import load_split
from rlhf.distributed.checkpoint import CheckpointManager
from rlhf.distributed.strategy import build_strategy
from rlhf.logging.metrics import MetricsWriter, Progress
from rlhf.logging.tables import rm_eval_rows
from rlhf.models.loading import load_tokenizer
from rlhf.models.reward import load_scalar_model
from rlhf.models.shared_prefix import attention_window, shared_prefix_unsupported
from rlhf.training.lm import StepPlan, step_micro_batches
from rlhf.training.optim import OptimizerSpec
from rlhf.training.guards import NonFiniteGuard
from rlhf.training.output import claim_output_dir
from rlhf.training.stop import STOP, interrupted
from rlhf.training.reward import evaluate_rm, rank_loss, reward_stats


def _read_summary(model_dir: Path) -> dict[str, float]:
    path = model_dir / "rlhf_summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass
class RMResult:
    metrics: dict[str, float]
    """Best eval metrics (eval/accuracy, eval/loss, ...) and the final train loss."""
    model_dir: Path
    model: torch.nn.Module


def main(cfg: RMConfig) -> RMResult:
    run_dir = Path(cfg.output_dir)
    claim_output_dir(cfg)
    strategy = build_strategy(cfg.strategy)
    strategy.setup(cfg.seed)
    accumulation = strategy.accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    say = print if strategy.is_main else (lambda *a, **k: None)

    # 1. Data: ranked answers from any accepted format, with a held-out eval set.
    data = load_split("rank", cfg.data.train, cfg.data.eval, cfg.data.eval_fraction, cfg.data.on_error, cfg.seed)
    say(f"[rm] {data.summary()}")

    # 2. Model: the SFT backbone with a new scalar head (or a reward model to keep training).
    tokenizer = load_tokenizer(cfg.model)
    model = load_scalar_model(cfg.model, strategy.device, seed=cfg.seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    if strategy.is_main:
        save_config(cfg, run_dir / "config.yaml")

    # 3. Tokenise: each prompt once, each of its K answers after it.
    truncation = TruncationStats()
    lengths = (cfg.data.max_length, cfg.data.max_prompt_length)
    train_examples = [encode_rank(tokenizer, r, *lengths, truncation) for r in data.train]
    eval_examples = [encode_rank(tokenizer, r, *lengths) for r in data.eval]
    say(f"[rm] truncation: {truncation.as_dict()}")
    micro = cfg.train.micro_batch_size
    unsupported = cfg.data.share_prompt and shared_prefix_unsupported(model.config)
    if unsupported:
        say(f"[rm] data.share_prompt: one row per answer instead ({unsupported})")
    layout = {"share_prompt": cfg.data.share_prompt and not unsupported,
              "max_shared_length": attention_window(model.config)}
    train_batches = RankBatches(train_examples, micro, tokenizer.pad_token_id, cfg.seed, **layout)
    eval_batches = RankBatches(eval_examples, micro, tokenizer.pad_token_id, cfg.seed, shuffle=False, **layout)

    # 4. Step plan, optimizer and schedule on the chosen engine.
    plan = StepPlan(len(train_batches), accumulation, strategy.world_size)
    total_steps = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
    trained = strategy.wrap(model, OptimizerSpec.from_train(cfg.train, total_steps), accumulation, micro)

    def evaluate() -> tuple[dict[str, float], torch.Tensor]:
        metrics, scores = evaluate_rm(trained.module, eval_batches.epoch(0), cfg.loss, strategy.device)
        return {f"eval/{k}": v for k, v in metrics.items()}, scores

    # 5. Resume from the newest complete checkpoint if there is one.
    checkpoints = CheckpointManager(run_dir / "checkpoints", strategy, cfg.train.keep_last)
    start_step, best_accuracy = 0, -1.0
    best: dict[str, float] = {}
    resume_from = checkpoints.resolve(cfg.train.resume)
    if resume_from is not None:
        state = checkpoints.load({"reward_model": trained}, resume_from)
        start_step, best_accuracy = state["step"], state["best_accuracy"]
        best = _read_summary(run_dir / "model")
        say(f"[rm] resumed from {resume_from} at step {start_step}")

    metrics = MetricsWriter(run_dir, enabled=strategy.is_main, resume_step=start_step, logging=cfg.logging,
                            stage="rm", config=cfg, models=[trained.module])

    def evaluate_and_keep_best(step: int) -> dict[str, float]:
        nonlocal best_accuracy, best
        row, scores = evaluate()
        metrics.log_table("eval/rm_samples", step, rm_eval_rows(data.eval, scores))
        if row["eval/accuracy"] > best_accuracy:
            best_accuracy, best = row["eval/accuracy"], dict(row, best_step=step)
            stats = reward_stats(scores)
            strategy.export(trained, tokenizer, run_dir / "model",
                            extra_files={"reward_stats.json": stats.__dict__, "rlhf_summary.json": best})
        return row

    if start_step == 0:
        first = evaluate()[0]
        metrics.log(0, first)
        say(f"[rm] step 0 eval accuracy {first['eval/accuracy']:.3f}")
    progress = Progress(total_steps, "rm", enabled=strategy.is_main and cfg.logging.progress, initial=start_step)
    trained.module.train()
    row: dict[str, float] = {}

    guard = NonFiniteGuard("rm", cfg.train.max_consecutive_nonfinite)

    # 6. Loop: each step is one global batch of prompts, every prompt weighing the same.
    for step in range(start_step, total_steps):
        started = time.time()
        batches = [b.to(strategy.device) for b in step_micro_batches(train_batches, plan, step, strategy.rank)]
        step_prompts = strategy.all_reduce({"prompts": sum(b.num_prompts for b in batches)}, op="sum")["prompts"]
        sums = {"loss": 0.0, "correct": 0.0, "pairs": 0.0, "margin": 0.0, "score": 0.0, "score_sq": 0.0, "answers": 0.0}
        for batch in batches:
            loss, scores, _ = rank_loss(trained.module, batch, cfg.loss)
            strategy.backward(trained, loss * batch.num_prompts / step_prompts)
            diff = (scores[batch.pair_index[:, 0]] - scores[batch.pair_index[:, 1]]).detach()
            sums["loss"] += float(loss.detach()) * batch.num_prompts
            sums["correct"] += float((diff > 0).sum())
            sums["pairs"] += diff.numel()
            sums["margin"] += float(diff.sum())
            sums["score"] += float(scores.detach().sum())
            sums["score_sq"] += float(scores.detach().pow(2).sum())
            sums["answers"] += scores.numel()
        lr = trained.lr
        grad_norm = strategy.step(trained)
        seconds = time.time() - started
        totals = strategy.all_reduce(sums, op="sum")
        mean = totals["score"] / totals["answers"]
        row = {
            "rm/loss": totals["loss"] / step_prompts,
            "rm/accuracy": totals["correct"] / max(totals["pairs"], 1),
            "rm/margin": totals["margin"] / max(totals["pairs"], 1),
            "rm/score_mean": mean,
            "rm/score_std": max(totals["score_sq"] / totals["answers"] - mean**2, 0.0) ** 0.5,
            "rm/lr": lr,
            "rm/grad_norm": grad_norm,
            "perf/pairs_per_s": totals["pairs"] / seconds,
            "perf/step_seconds": seconds,
        }
        done = step + 1
        finite = guard.check(done, {"loss": row["rm/loss"], "grad_norm": grad_norm}, strategy)
        row["rm/skipped_nonfinite"] = float(guard.skipped)
        if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == total_steps:
            row.update(evaluate_and_keep_best(done))
        if done % cfg.train.log_every == 0 or "eval/accuracy" in row:
            metrics.log(done, row)
        progress.update({"loss": row["rm/loss"], "acc": row["rm/accuracy"]})
        if finite and cfg.train.save_every and done % cfg.train.save_every == 0 and done < total_steps:
            checkpoints.save({"reward_model": trained}, done, {"step": done, "best_accuracy": best_accuracy})
        if done < total_steps and STOP.agreed(strategy):  # SIGTERM / Ctrl-C: checkpoint, then stop
            path = checkpoints.save({"reward_model": trained}, done, {"step": done, "best_accuracy": best_accuracy})
            metrics.finish()
            raise interrupted("rm", done, total_steps, path, STOP.signal_name)
    progress.close()

    # 7. The best model by eval accuracy is already exported; record the run's summary.
    summary = {**best, "rm/final_loss": row.get("rm/loss", float("nan"))}
    if strategy.is_main:
        save_config(cfg, run_dir / "model" / "rlhf_config.yaml")
    say(f"[rm] done: best eval accuracy {best.get('eval/accuracy', float('nan')):.3f} "
        f"at step {best.get('best_step')}; model in {run_dir / 'model'}")
    metrics.finish()
    strategy.teardown()
    return RMResult(summary, run_dir / "model", strategy.unwrap(trained))
