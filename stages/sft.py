"""Stage 1, supervised fine-tuning: next-token loss on the answer tokens of demonstrations.

    rlhf sft --config configs/sft.yaml [key=value ...]

Writes into `output_dir`: config.yaml, metrics.jsonl, checkpoints/ and the exported model/.
"""

from __future__ import annotations

import time

from rlhf.config import SFTConfig
from rlhf.data.builders import load_records
from rlhf.data.sft_dataset import SFTBatches, encode_text, tokenize_sft
from rlhf.data.splits import load_split
from rlhf.distributed.optim import OptimizerSpec
from rlhf.kernels import accelerate
from rlhf.models.init import resolve_model_path
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.lora import apply_lora
from rlhf.kernels.lm_loss import lm_forward_nll
from rlhf.training.lm import LMEvaluation, StepPlan, step_micro_batches
from rlhf.training.run import Run, Schedule, StageResult


def main(cfg: SFTConfig) -> StageResult:
    with Run.start("sft", cfg) as run:
        strategy = run.strategy

        # 1. Data: canonical records from any accepted format, with a held-out eval set.
        data = load_split("sft", cfg.data.train, cfg.data.eval, cfg.data.eval_fraction, cfg.data.on_error, cfg.seed)
        run.say(data.summary())
        pretrain = load_records("pretrain", cfg.data.pretrain, cfg.data.on_error)[0] if cfg.data.pretrain.given else []

        # 2. Model and tokenizer (a tiny model is built from the training texts when asked).
        with strategy.main_first():
            texts = [m.content for r in data.train for m in r.messages]
            model_path = resolve_model_path(cfg.model, run.dir, texts, cfg.seed)
        tokenizer = load_tokenizer(cfg.model, model_path if cfg.model.tiny else None)
        # Placed as the strategy shards (ZeRO-3: partitioned as built; FSDP2: meta, read per shard).
        model = load_causal_lm(cfg.model, strategy.device, model_path, placement=strategy.placement())
        model = apply_lora(model, cfg.model.lora, seed=cfg.seed)

        # 3. Tokenise with the chat template; prompt tokens get label -100.
        lengths = (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.all_assistant_turns)
        train_examples, truncation = tokenize_sft(tokenizer, data.train, *lengths)
        train_examples += [encode_text(tokenizer, r.text, cfg.data.max_length) for r in pretrain]
        eval_examples, _ = tokenize_sft(tokenizer, data.eval, *lengths)
        run.say(f"truncation: {truncation.as_dict()}; {len(pretrain)} pretraining texts mixed in")
        layout = dict(pad_token_id=tokenizer.pad_token_id, packing=cfg.data.packing, max_length=cfg.data.max_length,
                      seed=cfg.seed, padding_free=cfg.data.padding_free)
        train_batches = SFTBatches(train_examples, cfg.train.micro_batch_size, group_by_length=cfg.data.group_by_length,
                                   **layout)
        eval_batches = SFTBatches(eval_examples, cfg.train.micro_batch_size, shuffle=False, **layout)

        # 4. Step plan, optimizer and schedule on the chosen engine; resume if a checkpoint exists.
        accumulation = strategy.accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size)
        plan = StepPlan(len(train_batches), accumulation, strategy.world_size)
        total = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
        spec = OptimizerSpec.from_train(cfg.train, total)
        policy = strategy.wrap(model, spec, accumulation, cfg.train.micro_batch_size)
        accelerate(strategy.unwrap(policy), cfg.kernels, lm_loss=True)  # once the weights are on their device
        schedule = Schedule(total, cfg.train.eval_every, cfg.train.log_every, cfg.train.save_every)
        start = run.begin(schedule, {"policy": policy}, [policy.module], LMEvaluation(policy.module, eval_batches, strategy))
        policy.module.train()

        # 5. Loop: each step is one global batch, normalised by its total answer-token count.
        row: dict[str, float] = {}
        for step in range(start, total):
            started = time.time()
            batches = [b.to(strategy.device) for b in step_micro_batches(train_batches, plan, step, strategy.rank)]
            step_tokens = strategy.all_reduce({"n": sum(b.num_target_tokens for b in batches)}, op="sum")["n"]
            loss_sum = 0.0
            for batch in batches:
                nll, _ = lm_forward_nll(policy.module, batch)
                strategy.backward(policy, nll / max(step_tokens, 1))
                loss_sum += float(nll.detach())
            lr, grad_norm = policy.lr, strategy.step(policy)
            seconds = time.time() - started
            totals = strategy.all_reduce({"nll": loss_sum, "tokens": sum(b.real_tokens for b in batches)}, op="sum")
            row = {"sft/loss": totals["nll"] / max(step_tokens, 1), "sft/lr": lr, "sft/grad_norm": grad_norm,
                   "sft/target_tokens": step_tokens, "sft/tokens": totals["tokens"],
                   "perf/tokens_per_s": totals["tokens"] / seconds, "perf/step_seconds": seconds}
            run.check_finite(step + 1, {"loss": row["sft/loss"], "grad_norm": grad_norm}, row)
            run.end_step(step + 1, row, progress={"loss": row["sft/loss"]})

        # 6. Export the model (full weights, LoRA merged) for the next stage.
        summary = {"sft/final_loss": row.get("sft/loss", float("nan")), **run.last_eval}
        if "eval/loss" in run.initial_eval:
            summary["eval/initial_loss"] = run.initial_eval["eval/loss"]
        run.export(policy, tokenizer, "model", {"rlhf_summary.json": summary})
        return run.finish(summary, strategy.unwrap(policy))
