"""Stage 2, reward model: a scalar head on the SFT backbone trained to rank answers.

    rlhf rm --config configs/rm.yaml [key=value ...]
    rlhf rm score --model runs/rm/model --data FILE --out scores.jsonl

Each batch element is one prompt with its K ranked answers: the K answers are scored in one
forward pass (by default in one row with the prompt forwarded once, `data.share_prompt`) and
the loss averages -log σ(r_better - r_worse - margin) over that prompt's C(K,2) untied pairs
(InstructGPT). Writes config.yaml, metrics.jsonl, checkpoints/ and the best model (by eval
pairwise accuracy) with its eval score statistics into `output_dir`.
"""

from __future__ import annotations

import time

from rlhf.config import RMConfig
from rlhf.data.rank_dataset import RankBatches
from rlhf.data.splits import load_split
from rlhf.distributed.optim import OptimizerSpec
from rlhf.kernels import accelerate
from rlhf.models.loading import load_tokenizer
from rlhf.models.lora import apply_lora
from rlhf.models.reward import load_scalar_model
from rlhf.training.lm import StepPlan, step_micro_batches
from rlhf.training.reward import BestRewardModel, rank_step
from rlhf.training.ranked import encode_ranked
from rlhf.training.run import Run, Schedule, StageResult


def main(cfg: RMConfig) -> StageResult:
    with Run.start("rm", cfg) as run:
        strategy = run.strategy

        # 1. Data: ranked answers from any accepted format, with a held-out eval set.
        data = load_split("rank", cfg.data.train, cfg.data.eval, cfg.data.eval_fraction, cfg.data.on_error, cfg.seed)
        run.say(data.summary())

        # 2. Model: the SFT backbone with a new scalar head (or a reward model to keep training).
        tokenizer = load_tokenizer(cfg.model)
        model = load_scalar_model(cfg.model, strategy.device, seed=cfg.seed, placement=strategy.placement())
        model.config.pad_token_id = tokenizer.pad_token_id
        model = apply_lora(model, cfg.model.lora, scalar_head=True, seed=cfg.seed)

        # 3. Tokenise: each prompt once, each of its K answers after it.
        ranked = encode_ranked(tokenizer, data.train, data.eval, cfg.data, model.config)
        run.say(ranked.note)
        micro = cfg.train.micro_batch_size
        train_batches = RankBatches(ranked.train, micro, tokenizer.pad_token_id, cfg.seed, **ranked.layout)
        eval_batches = RankBatches(ranked.eval, micro, tokenizer.pad_token_id, cfg.seed, shuffle=False, **ranked.layout)

        # 4. Step plan, optimizer and schedule on the chosen engine; resume if a checkpoint exists.
        accumulation = strategy.accumulation_steps(cfg.train.global_batch_size, micro)
        plan = StepPlan(len(train_batches), accumulation, strategy.world_size)
        total = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
        reward_model = strategy.wrap(model, OptimizerSpec.from_train(cfg.train, total), accumulation, micro)
        accelerate(strategy.unwrap(reward_model), cfg.kernels)  # once the weights are on their device
        best = BestRewardModel(run, reward_model, eval_batches, cfg.loss, tokenizer, data.eval)
        schedule = Schedule(total, cfg.train.eval_every, cfg.train.log_every, cfg.train.save_every)
        start = run.begin(schedule, {"reward_model": reward_model}, [reward_model.module], best, state=best)
        reward_model.module.train()

        # 5. Loop: each step is one global batch of prompts, every prompt weighing the same.
        row: dict[str, float] = {}
        for step in range(start, total):
            started = time.time()
            batches = [b.to(strategy.device) for b in step_micro_batches(train_batches, plan, step, strategy.rank)]
            row = rank_step(reward_model, batches, cfg.loss, strategy)
            seconds = time.time() - started
            row.update({"perf/pairs_per_s": row.pop("rm/pairs") / seconds, "perf/step_seconds": seconds})
            run.check_finite(step + 1, {"loss": row["rm/loss"], "grad_norm": row["rm/grad_norm"]}, row)
            run.end_step(step + 1, row, progress={"loss": row["rm/loss"], "acc": row["rm/accuracy"]})

        # 6. The best model by eval accuracy is already exported; record the run's summary.
        summary = {**best.best, "rm/final_loss": row.get("rm/loss", float("nan"))}
        return run.finish(summary, strategy.unwrap(reward_model))
