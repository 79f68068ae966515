"""Stage 3, PPO / PPO-ptx: maximise r(x, y) - β·log(π(y|x) / π_SFT(y|x)) [+ γ·log π(x_pretrain)].

    rlhf ppo --config configs/ppo.yaml [key=value ...]

Roles: actor (trainable, from SFT), critic (trainable, from the RM by default), reference
(frozen SFT) and reward model (frozen RM). Writes config.yaml, metrics.jsonl, samples.jsonl,
checkpoints/ and the final actor as model/ (and model_ema/ with ppo.ema_decay) into
`output_dir`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.algorithms import AdaptiveKLController, FixedKLController
from rlhf.algorithms.rewards import RunningMoments
from rlhf.config import PPOConfig, save_config
from rlhf.data.builders import load_records
from rlhf.data.prompt_dataset import PromptStream, encode_prompt
from rlhf.data.sft_dataset import SFTBatches, encode_text
from rlhf.data.splits import load_split
from rlhf.distributed.checkpoint import CheckpointManager
from rlhf.distributed.strategy import build_strategy
from rlhf.errors import ConfigError, UserError
from rlhf.logging.metrics import MetricsWriter, Progress
from rlhf.logging.tables import rollout_rows
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.lora import apply_lora
from rlhf.models.reward import RewardStats, load_scalar_model
from rlhf.roles.roles import Actor, Critic, Reference, RewardModel
from rlhf.rollout.engine import SamplingParams
from rlhf.training.ema import EMA
from rlhf.training.optim import OptimizerSpec
from rlhf.training.ppo import RewardNormalizer, make_experience, ppo_update
from rlhf.training.ppo_eval import evaluate_policy, load_gold_reward


@dataclass
class PPOResult:
    metrics: dict[str, float]
    """First and last evaluation (eval/... and initial_eval/...)."""
    model_dir: Path
    actor: torch.nn.Module


def _pretrain_batches(cfg: PPOConfig, tokenizer) -> SFTBatches:
    """PPO-ptx data: plain text, every token a target, as micro-batches addressed by step."""
    records, _ = load_records("pretrain", cfg.data.pretrain, cfg.data.on_error)
    examples = [encode_text(tokenizer, r.text, cfg.data.pretrain_max_length) for r in records]
    return SFTBatches(examples, cfg.ppo.ptx_micro_batch_size, tokenizer.pad_token_id, packing=False,
                      max_length=cfg.data.pretrain_max_length, seed=cfg.seed)


def main(cfg: PPOConfig) -> PPOResult:
    run_dir = Path(cfg.output_dir)
    strategy = build_strategy(cfg.strategy)
    strategy.setup(cfg.seed)
    # Backward calls per optimizer step on each worker: the micro-batches of a mini-batch,
    # plus the pretraining micro-batch for the actor under PPO-ptx.
    per_pass = cfg.ppo.micro_batch_size * strategy.world_size
    if cfg.ppo.mini_batch_size % per_pass:
        raise ConfigError(f"ppo.mini_batch_size={cfg.ppo.mini_batch_size} must be a multiple of ppo.micro_batch_size "
                          f"x workers = {cfg.ppo.micro_batch_size} x {strategy.world_size}")
    critic_accumulation = cfg.ppo.mini_batch_size // per_pass
    actor_accumulation = critic_accumulation + (1 if cfg.ppo.ptx_coef > 0 else 0)
    say = print if strategy.is_main else (lambda *a, **k: None)

    # 1. Data: training and held-out prompts (and pretraining text for PPO-ptx).
    data = load_split("prompt", cfg.data.prompts, cfg.data.eval_prompts, cfg.data.eval_fraction,
                      cfg.data.on_error, cfg.seed)
    say(f"[ppo] {data.summary()}")
    gold_reward = load_gold_reward(cfg.eval.gold_reward)

    # 2. Models: actor and reference from SFT, reward model from the RM stage, critic from
    #    the RM (or SFT); dropout off in all four.
    tokenizer = load_tokenizer(cfg.model)
    reward_stats = RewardStats.load(cfg.reward_model.path)
    if cfg.reward.normalize == "rm_stats" and reward_stats is None:
        raise UserError(f"reward.normalize=rm_stats but {cfg.reward_model.path} has no reward_stats.json "
                        "(export it with `rlhf rm`, or set reward.normalize=running)")
    reference = Reference(load_causal_lm(cfg.model, strategy.device), cfg.rollout.temperature)
    reward_model = RewardModel(load_scalar_model(cfg.reward_model, strategy.device), reward_stats)
    critic_source = cfg.reward_model if cfg.ppo.critic_init == "reward" else cfg.model
    critic_model = load_scalar_model(critic_source, strategy.device, seed=cfg.seed)
    actor_model = apply_lora(load_causal_lm(cfg.model, strategy.device), cfg.model.lora)
    if strategy.is_main:
        save_config(cfg, run_dir / "config.yaml")

    # 3. Prompts as token ids; the rollout batch is split over workers.
    prompts = [encode_prompt(tokenizer, r, cfg.data.max_prompt_length) for r in data.train]
    eval_records = data.eval[: cfg.eval.max_prompts] * cfg.eval.samples_per_prompt
    eval_prompts = [encode_prompt(tokenizer, r, cfg.data.max_prompt_length) for r in eval_records]
    eval_texts = [r.prompt[-1].content for r in eval_records]
    stream = PromptStream(prompts, cfg.ppo.rollout_batch_size, cfg.seed)
    ptx = _pretrain_batches(cfg, tokenizer) if cfg.ppo.ptx_coef > 0 else None

    # 4. Optimizers: one actor and one critic step per mini-batch.
    steps_per_iteration = cfg.ppo.ppo_epochs * cfg.ppo.rollout_batch_size // cfg.ppo.mini_batch_size
    total_steps = cfg.ppo.iterations * steps_per_iteration
    micro = cfg.ppo.micro_batch_size
    actor = Actor(strategy.wrap(actor_model, OptimizerSpec.from_train(cfg.train, total_steps, lr=cfg.ppo.actor_lr),
                                actor_accumulation, micro),
                  tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.rollout.temperature, cfg.rollout.batch_size)
    critic = Critic(strategy.wrap(critic_model, OptimizerSpec.from_train(cfg.train, total_steps, lr=cfg.ppo.critic_lr),
                                  critic_accumulation, micro))
    kl_ctl = (AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else FixedKLController(cfg.kl.coef))
    normalizer = RewardNormalizer(cfg.reward.normalize, cfg.reward.clip, cfg.reward.missing_eos_penalty,
                                  reward_stats.mean if reward_stats else 0.0, reward_stats.std if reward_stats else 1.0,
                                  RunningMoments())
    ema = EMA(actor.trained.module, cfg.ppo.ema_decay) if cfg.ppo.ema_decay > 0 else None
    sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p)
    eval_sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.eval.temperature or cfg.rollout.temperature,
                                   cfg.rollout.top_k, cfg.rollout.top_p)
    shuffle_rng = torch.Generator().manual_seed(cfg.seed)

    # 5. Resume: models, optimizers, KL controller, reward normaliser, data position, RNG.
    checkpoints = CheckpointManager(run_dir / "checkpoints", strategy, cfg.train.keep_last)
    start = 0
    resume_from = checkpoints.resolve(cfg.train.resume)
    if resume_from is not None:
        state = checkpoints.load({"actor": actor.trained, "critic": critic.trained}, resume_from)
        start = state["iteration"]
        kl_ctl.load_state_dict(state["kl_controller"])
        normalizer.running.load_state_dict(state["reward_normalizer"])
        shuffle_rng.set_state(state["shuffle_rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        say(f"[ppo] resumed from {resume_from} at iteration {start}")

    def evaluate(iteration: int) -> dict[str, float]:
        metrics, rows = evaluate_policy(actor, reference, reward_model, tokenizer, eval_prompts, eval_texts,
                                        eval_sampling, gold_reward, seed=cfg.seed + 1)
        metrics_log.log_table("eval/samples", iteration, rows[:8])
        return metrics

    metrics_log = MetricsWriter(run_dir, enabled=strategy.is_main, resume_step=start, logging=cfg.logging, stage="ppo",
                                config=cfg, models=[actor_model, critic_model, reference.model, reward_model.model])
    initial = {}
    if start == 0:
        initial = evaluate(0)
        metrics_log.log(0, initial)
        say("[ppo] iteration 0: " + ", ".join(f"{k}={v:.4g}" for k, v in initial.items()))
    progress = Progress(cfg.ppo.iterations, "ppo", enabled=strategy.is_main and cfg.logging.progress, initial=start)
    last_eval: dict[str, float] = dict(initial)

    for iteration in range(start, cfg.ppo.iterations):
        timings = {}
        # 1. Roll out a batch of prompts with the current policy.
        started = time.time()
        batch_prompts = stream.batch(iteration, strategy.rank, strategy.world_size)
        rollout = actor.generate(batch_prompts, sampling)
        timings["perf/generate_seconds"] = time.time() - started

        # 2. Score it: reward model, reference log-probs, values -> rewards and advantages.
        started = time.time()
        experience, row = make_experience(rollout, actor, reference, critic, reward_model, normalizer, cfg, kl_ctl.value)
        timings["perf/score_seconds"] = time.time() - started

        # 3. PPO epochs over shuffled mini-batches for actor and critic (+ the ptx term).
        started = time.time()
        train_actor = iteration >= cfg.ppo.critic_warmup_iterations
        ptx_batch = (lambda step: ptx.batch(step // len(ptx), step % len(ptx))) if ptx is not None else None
        train_metrics, _ = ppo_update(experience, actor, critic, strategy, cfg, kl_ctl.value, train_actor,
                                      ptx_batch, shuffle_rng, iteration * steps_per_iteration)
        if ema is not None and train_actor:
            ema.update(actor.trained.module)
        timings["perf/train_seconds"] = time.time() - started

        # 4. Adapt the KL coefficient to the measured KL (Ziegler et al.).
        kl_ctl.update(row["ppo/kl"], n_steps=cfg.ppo.rollout_batch_size)

        # 5. Log, evaluate and checkpoint.
        row = strategy.all_reduce({**row, **train_metrics, **timings})
        new_tokens = float(rollout.response_mask.sum()) * strategy.world_size
        row["perf/generate_tokens_per_s"] = new_tokens / max(row["perf/generate_seconds"], 1e-9)
        row["perf/samples_per_s"] = cfg.ppo.rollout_batch_size / sum(timings.values())
        done = iteration + 1
        if done % cfg.ppo.eval_every == 0 or done == cfg.ppo.iterations:
            last_eval = evaluate(done)
            row.update(last_eval)
        metrics_log.log(done, row)
        if cfg.ppo.sample_every and done % cfg.ppo.sample_every == 0:
            metrics_log.log_table("ppo/samples", done, rollout_rows(tokenizer, experience))
        progress.update({"reward": row["ppo/reward_raw"], "kl": row["ppo/kl"]})
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done < cfg.ppo.iterations:
            checkpoints.save({"actor": actor.trained, "critic": critic.trained}, done, {
                "iteration": done,
                "kl_controller": kl_ctl.state_dict(),
                "reward_normalizer": normalizer.running.state_dict(),
                "shuffle_rng": shuffle_rng.get_state(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
            })
    progress.close()

    # 6. Export the final actor (and its EMA) for use with plain transformers.
    summary = {**{f"initial_{k}": v for k, v in initial.items()}, **last_eval, "kl_coef": kl_ctl.value}
    strategy.export(actor.trained, tokenizer, run_dir / "model", extra_files={"rlhf_summary.json": summary})
    if ema is not None:
        ema.copy_to(actor.trained.module)
        strategy.export(actor.trained, tokenizer, run_dir / "model_ema")
    if strategy.is_main:
        save_config(cfg, run_dir / "model" / "rlhf_config.yaml")
    say("[ppo] done: " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()) + f"; model in {run_dir / 'model'}")
    metrics_log.finish()
    strategy.teardown()
    return PPOResult(summary, run_dir / "model", strategy.unwrap(actor.trained))
