"""DPO / IPO: the policy learns ranked answers directly, without a reward model.

    rlhf dpo --config configs/dpo.yaml [key=value ...]

Rafailov et al. 2023: minimise -log σ(β·[(log π - log π_ref)(preferred) - (log π - log π_ref)(other)])
over the untied pairs of each prompt's K ranked answers (IPO, Azar et al. 2023: a squared loss
instead). Each batch element is one prompt with its K answers: every answer's log-prob is taken
once (by default in one row with the prompt forwarded once, `data.share_prompt`), the C(K,2)
pairs are formed from those K numbers, and the loss is the mean over a prompt's pairs, then
over prompts. The reference is the frozen SFT model, live or precomputed once
(`reference.precompute`). Held-out evaluation reports the loss, implicit-reward accuracy and
margin and the answers' log-probs; with `eval.gold_reward`, also the gold reward of answers
sampled from the policy. Writes config.yaml, metrics.jsonl, checkpoints/ and the exported
policy model/ into `output_dir`.
"""

from __future__ import annotations

import time

from rlhf.config import DPOConfig
from rlhf.data.splits import load_split
from rlhf.distributed.optim import OptimizerSpec
from rlhf.kernels import accelerate
from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer
from rlhf.models.lora import apply_lora
from rlhf.roles.evaluate import load_gold_reward
from rlhf.training.dpo import (DPOEvaluation, PreferenceBatches, ReferenceLogps, dpo_step, reference_loader,
                               sampled_gold)
from rlhf.training.lm import StepPlan, step_micro_batches
from rlhf.training.ranked import encode_ranked
from rlhf.training.run import Run, Schedule, StageResult


def main(cfg: DPOConfig) -> StageResult:
    with Run.start("dpo", cfg) as run:
        strategy = run.strategy

        # 1. Data: ranked answers from any accepted format, with a held-out eval set.
        data = load_split("rank", cfg.data.train, cfg.data.eval, cfg.data.eval_fraction, cfg.data.on_error, cfg.seed)
        run.say(data.summary())

        # 2. Models: the policy from the SFT model (dropout off, as in every RLHF role) and the
        # frozen reference, loaded when first needed (never, on a resume with precomputed numbers).
        tokenizer = load_tokenizer(cfg.model)
        model = load_causal_lm(cfg.model, strategy.device, placement=strategy.placement())
        disable_dropout(model)
        model = apply_lora(model, cfg.model.lora, seed=cfg.seed)

        # 3. Tokenise: each prompt once, each of its K answers after it.
        ranked = encode_ranked(tokenizer, data.train, data.eval, cfg.data, model.config)
        run.say(ranked.note)
        micro = cfg.train.micro_batch_size
        train_batches = PreferenceBatches(ranked.train, micro, tokenizer.pad_token_id, cfg.seed, **ranked.layout)
        eval_batches = PreferenceBatches(ranked.eval, micro, tokenizer.pad_token_id, cfg.seed, shuffle=False, **ranked.layout)
        reference = ReferenceLogps(reference_loader(cfg, strategy), cfg.reference.precompute,
                                   {"train": train_batches, "eval": eval_batches}, strategy)

        # 4. Step plan, optimizer and schedule on the chosen engine; resume if a checkpoint exists
        # (with the precomputed reference numbers, when there are some).
        accumulation = strategy.accumulation_steps(cfg.train.global_batch_size, micro)
        plan = StepPlan(len(train_batches), accumulation, strategy.world_size)
        total = plan.total_steps(cfg.train.epochs, cfg.train.max_steps)
        policy = strategy.wrap(model, OptimizerSpec.from_train(cfg.train, total), accumulation, micro)
        accelerate(strategy.unwrap(policy), cfg.kernels)  # once the weights are on their device
        gold = sampled_gold(cfg, load_gold_reward(cfg.eval.gold_reward), tokenizer, data.eval)
        evaluation = DPOEvaluation(policy, eval_batches, reference, cfg.loss, strategy.device, gold)
        schedule = Schedule(total, cfg.train.eval_every, cfg.train.log_every, cfg.train.save_every)
        start = run.begin(schedule, {"policy": policy}, [policy.module], evaluation, state=reference)
        policy.module.train()

        # 5. Loop: each step is one global batch of prompts, every prompt weighing the same.
        row: dict[str, float] = {}
        for step in range(start, total):
            started = time.time()
            batches = [b.to(strategy.device) for b in step_micro_batches(train_batches, plan, step, strategy.rank)]
            row = dpo_step(policy, batches, reference, cfg.loss, strategy)
            seconds = time.time() - started
            row.update({"perf/pairs_per_s": row.pop("dpo/pairs") / seconds, "perf/step_seconds": seconds})
            run.check_finite(step + 1, {"loss": row["dpo/loss"], "grad_norm": row["dpo/grad_norm"]}, row)
            run.end_step(step + 1, row, progress={"loss": row["dpo/loss"], "acc": row["dpo/accuracy"]})

        # 6. Export the policy (full weights, LoRA merged) with the run's summary.
        summary = {"dpo/final_loss": row.get("dpo/loss", float("nan")), **run.last_eval,
                   **{f"initial_{k}": v for k, v in run.initial_eval.items()}}
        run.export(policy, tokenizer, "model", {"rlhf_summary.json": summary})
        return run.finish(summary, strategy.unwrap(policy))
