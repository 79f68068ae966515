"""Stage 1, supervised fine-tuning: next-token loss on the answer tokens of demonstrations.

    rlhf sft --config configs/sft.yaml [key=value ...]

Writes into `output_dir`: config.yaml, metrics.jsonl, checkpoints/ and the exported model/.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config import SFTConfig, save_config
from rlhf.data.builders import load_records
from rlhf.data.sft_dataset import SFTBatches, encode_text, tokenize_sft
from rlhf.data.splits import load_split
from rlhf.distributed.checkpoint import CheckpointManager
from rlhf.distributed.strategy import build_strategy
from rlhf.logging.metrics import MetricsWriter, Progress
from rlhf.models.fused_head import use_fused_head_loss
from rlhf.models.init import resolve_model_path
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.lora import apply_lora
from rlhf.models.segments import use_segment_attention
from rlhf.training.lm import StepPlan, evaluate_lm, lm_forward_nll, step_micro_batches
from rlhf.training.optim import OptimizerSpec
from rlhf.training.guards import NonFiniteGuard
from rlhf.training.output import claim_output_dir
from rlhf.training.stop import STOP, interrupted


def _texts(records) -> list[str]:
    return [m.content for r in records for m in r.messages]


@dataclass
class SFTResult:
    metrics: dict[str, float]
    """Final train loss, eval loss/perplexity and the eval loss before training."""
    model_dir: Path
    model: torch.nn.Module
    """The trained model in memory (sharded under a sharded strategy)."""


def main(cfg: SFTConfig) -> SFTResult:
    run_dir = Path(cfg.output_dir)
    claim_output_dir(cfg)
    strategy = build_strategy(cfg.strategy)
    strategy.setup(cfg.seed)
    accumulation = strategy.accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    say = print if strategy.is_main else (lambda *a, **k: None)

    # 1. Data: canonical records from any accepted format, with a held-out eval set.
    data = load_split("sft", cfg.data.train, cfg.data.eval, cfg.data.eval_fraction, cfg.data.on_error, cfg.seed)
    say(f"[sft] {data.summary()}")
    pretrain_texts = load_records("pretrain", cfg.data.pretrain, cfg.data.on_error)[0] if cfg.data.pretrain.given else []

    # 2. Model and tokenizer (a tiny model is built from the training texts when asked).
    with strategy.main_first():
        model_path = resolve_model_path(cfg.model, run_dir, _texts(data.train), cfg.seed)
    tokenizer = load_tokenizer(cfg.model, model_path if cfg.model.tiny else None)
    model = load_causal_lm(cfg.model, strategy.device, model_path)
    if cfg.data.padding_free:
        use_segment_attention(model)  # attention once per example of a padding-free row
    if cfg.fused_lm_loss:
        use_fused_head_loss(model)  # the head computes the loss over chunks, never whole logits
    model = apply_lora(model, cfg.model.lora)
    if strategy.is_main:
        save_config(cfg, run_dir / "config.yaml")

    # 3. Tokenise with the chat template; prompt tokens get label -100.
    lengths = (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.all_assistant_turns)
    train_examples, truncation = tokenize_sft(tokenizer, data.train, *lengths)
    if pretrain_texts:
        train_examples += [encode_text(tokenizer, r.text, cfg.data.max_length) for r in pretrain_texts]
        say(f"[sft] mixed in {len(pretrain_texts)} pretraining texts")
    eval_examples, _ = tokenize_sft(tokenizer, data.eval, *lengths)
    say(f"[sft] truncation: {truncation.as_dict()}")
    micro = cfg.train.micro_batch_size
    train_batches = SFTBatches(train_examples, micro, tokenizer.pad_token_id, cfg.data.packing, cfg.data.max_length,
                               cfg.seed, group_by_length=cfg.data.group_by_length, padding_free=cfg.data.padding_free)
    eval_batches = SFTBatches(eval_examples, micro, tokenizer.pad_token_id, cfg.data.packing, cfg.data.max_length,
                              cfg.seed, shuffle=False, padding_free=cfg.data.padding_free)

    # 4. Step plan, optimizer and schedule on the chosen engine.
    plan = StepPlan(len(train_batches), accumulation, strategy.world_size)
    total_steps = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
    trained = strategy.wrap(model, OptimizerSpec.from_train(cfg.train, total_steps), accumulation, micro)

    def evaluate() -> dict[str, float]:
        nll, tokens = evaluate_lm(trained.module, eval_batches.epoch(0), strategy.device)
        totals = strategy.all_reduce({"nll": nll, "tokens": tokens}, op="sum")
        loss = totals["nll"] / max(totals["tokens"], 1)
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}

    # 5. Resume from the newest complete checkpoint if there is one.
    checkpoints = CheckpointManager(run_dir / "checkpoints", strategy, cfg.train.keep_last)
    start_step = 0
    resume_from = checkpoints.resolve(cfg.train.resume)
    if resume_from is not None:
        start_step = checkpoints.load({"policy": trained}, resume_from)["step"]
        say(f"[sft] resumed from {resume_from} at step {start_step}")

    metrics = MetricsWriter(run_dir, enabled=strategy.is_main, resume_step=start_step, logging=cfg.logging,
                            stage="sft", config=cfg, models=[trained.module])
    first_eval = evaluate() if start_step == 0 else None
    if first_eval:
        metrics.log(0, first_eval)
        say(f"[sft] step 0 eval loss {first_eval['eval/loss']:.4f}")
    progress = Progress(total_steps, "sft", enabled=strategy.is_main and cfg.logging.progress, initial=start_step)
    trained.module.train()
    last_eval = first_eval or {}
    row: dict[str, float] = {}

    guard = NonFiniteGuard("sft", cfg.train.max_consecutive_nonfinite)

    # 6. Loop: each step is one global batch, normalised by its total answer-token count.
    for step in range(start_step, total_steps):
        started = time.time()
        batches = [b.to(strategy.device) for b in step_micro_batches(train_batches, plan, step, strategy.rank)]
        step_tokens = strategy.all_reduce({"tokens": sum(b.num_target_tokens for b in batches)}, op="sum")["tokens"]
        loss_sum = 0.0
        for batch in batches:
            nll, _ = lm_forward_nll(trained.module, batch)
            strategy.backward(trained, nll / max(step_tokens, 1))
            loss_sum += float(nll.detach())
        lr = trained.lr
        grad_norm = strategy.step(trained)
        seconds = time.time() - started
        totals = strategy.all_reduce({"nll": loss_sum, "seqs": sum(len(b.input_ids) for b in batches),
                                      "tokens": sum(b.real_tokens for b in batches)}, op="sum")
        row = {
            "sft/loss": totals["nll"] / max(step_tokens, 1),
            "sft/lr": lr,
            "sft/grad_norm": grad_norm,
            "sft/target_tokens": step_tokens,
            "sft/tokens": totals["tokens"],
            "perf/tokens_per_s": totals["tokens"] / seconds,
            "perf/step_seconds": seconds,
        }
        done = step + 1
        finite = guard.check(done, {"loss": row["sft/loss"], "grad_norm": grad_norm}, strategy)
        row["sft/skipped_nonfinite"] = float(guard.skipped)
        if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == total_steps:
            last_eval = evaluate()
            row.update(last_eval)
        if done % cfg.train.log_every == 0 or "eval/loss" in row:
            metrics.log(done, row)
        progress.update({"loss": row["sft/loss"], **({"eval": row["eval/loss"]} if "eval/loss" in row else {})})
        if finite and cfg.train.save_every and done % cfg.train.save_every == 0 and done < total_steps:
            checkpoints.save({"policy": trained}, done, {"step": done})
        if done < total_steps and STOP.agreed(strategy):  # SIGTERM / Ctrl-C: checkpoint, then stop
            path = checkpoints.save({"policy": trained}, done, {"step": done})
            metrics.finish()
            raise interrupted("sft", done, total_steps, path, STOP.signal_name)
    progress.close()

    # 7. Export the model (full weights, LoRA merged) for the next stage.
    summary = {"sft/final_loss": row.get("sft/loss", float("nan")), **last_eval}
    if first_eval:
        summary["eval/initial_loss"] = first_eval["eval/loss"]
    strategy.export(trained, tokenizer, run_dir / "model", extra_files={"rlhf_summary.json": summary})
    if strategy.is_main:
        save_config(cfg, run_dir / "model" / "rlhf_config.yaml")
    say(f"[sft] done: eval loss {last_eval.get('eval/loss', float('nan')):.4f}; model in {run_dir / 'model'}")
    metrics.finish()
    strategy.teardown()
    return SFTResult(summary, run_dir / "model", strategy.unwrap(trained))

