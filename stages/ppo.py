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
from rlhf.data.prompt_dataset import PromptStream, encode_prompt
from rlhf.data.splits import load_split
from rlhf.distributed.checkpoint import CheckpointManager
from rlhf.distributed.strategy import build_strategy
from rlhf.logging.metrics import MetricsWriter, Progress
from rlhf.logging.tables import rollout_rows
from rlhf.models.loading import load_tokenizer
from rlhf.roles.build import reward_stats_for, steps_per_iteration
from rlhf.roles.team import LocalRoles
from rlhf.rollout.engine import SamplingParams
from rlhf.training.ema import EMA
from rlhf.training.ppo import RewardNormalizer, make_experience, shuffle_orders
from rlhf.training.guards import NonFiniteGuard
from rlhf.training.output import claim_output_dir
from rlhf.training.stop import STOP, interrupted
from rlhf.training.ppo_eval import evaluate_policy, load_gold_reward


@dataclass
class PPOResult:
    metrics: dict[str, float]
    """First and last evaluation (eval/... and initial_eval/...)."""
    model_dir: Path
    actor: torch.nn.Module | None
    """The trained actor in memory (None when the roles ran as Ray actor groups)."""


def rollout_seed(seed: int, iteration: int) -> int:
    """The sampling seed of an iteration's rollouts (worker r adds r): a rollout depends on
    the seed and the iteration alone, whatever ran before it."""
    return seed * 1_000_003 + iteration * 7_919


def main(cfg: PPOConfig, roles=None, strategy=None) -> PPOResult:
    """Run PPO. By default all four roles live in this process (or in each SPMD worker);
    the Ray launcher passes role groups and a driver-side strategy instead."""
    run_dir = Path(cfg.output_dir)
    claim_output_dir(cfg)
    strategy = strategy or build_strategy(cfg.strategy)
    strategy.setup(cfg.seed)
    say = print if strategy.is_main else (lambda *a, **k: None)

    # 1. Data: training and held-out prompts (and pretraining text for PPO-ptx).
    data = load_split("prompt", cfg.data.prompts, cfg.data.eval_prompts, cfg.data.eval_fraction,
                      cfg.data.on_error, cfg.seed)
    say(f"[ppo] {data.summary()}")
    gold_reward = load_gold_reward(cfg.eval.gold_reward)

    # 2. Roles: actor and reference from SFT, reward model from the RM stage, critic from the
    #    RM (or SFT); dropout off in all four.
    tokenizer = load_tokenizer(cfg.model)
    reward_stats = reward_stats_for(cfg)
    roles = roles or LocalRoles(cfg, strategy, tokenizer)
    if strategy.is_main:
        save_config(cfg, run_dir / "config.yaml")

    # 3. Prompts as token ids; the rollout batch is split over workers.
    prompts = [encode_prompt(tokenizer, r, cfg.data.max_prompt_length) for r in data.train]
    eval_records = data.eval[: cfg.eval.max_prompts] * cfg.eval.samples_per_prompt
    eval_prompts = [encode_prompt(tokenizer, r, cfg.data.max_prompt_length) for r in eval_records]
    eval_texts = [r.prompt[-1].content for r in eval_records]
    stream = PromptStream(prompts, cfg.ppo.rollout_batch_size, cfg.seed)

    # 4. KL controller, reward normaliser, EMA and sampling settings.
    kl_ctl = (AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else FixedKLController(cfg.kl.coef))
    normalizer = RewardNormalizer(cfg.reward.normalize, cfg.reward.clip, cfg.reward.missing_eos_penalty,
                                  reward_stats.mean if reward_stats else 0.0, reward_stats.std if reward_stats else 1.0,
                                  RunningMoments())
    trained = roles.trained()
    ema = EMA(trained["actor"].module, cfg.ppo.ema_decay) if cfg.ppo.ema_decay > 0 else None
    sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p)
    eval_sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.eval.temperature or cfg.rollout.temperature,
                                   cfg.rollout.top_k, cfg.rollout.top_p)
    shuffle_rng = torch.Generator().manual_seed(cfg.seed)

    # 5. Resume: models, optimizers, KL controller, reward normaliser, data position, RNG.
    checkpoints = CheckpointManager(run_dir / "checkpoints", strategy, cfg.train.keep_last)
    start = 0
    resume_from = checkpoints.resolve(cfg.train.resume)
    if resume_from is not None:
        state = checkpoints.load(trained, resume_from)
        start = state["iteration"]
        kl_ctl.load_state_dict(state["kl_controller"])
        normalizer.running.load_state_dict(state["reward_normalizer"])
        shuffle_rng.set_state(state["shuffle_rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        say(f"[ppo] resumed from {resume_from} at iteration {start}")

    def loop_state(iteration: int) -> dict:
        """What a checkpoint holds besides the models: enough to replay the next iteration exactly."""
        return {"iteration": iteration, "initial_eval": initial, "kl_controller": kl_ctl.state_dict(),
                "reward_normalizer": normalizer.running.state_dict(), "shuffle_rng": shuffle_rng.get_state(),
                **({"ema": ema.state_dict()} if ema is not None else {})}

    def evaluate(iteration: int) -> dict[str, float]:
        metrics, rows = evaluate_policy(roles.actor, roles.reference, roles.reward_model, tokenizer, eval_prompts,
                                        eval_texts, eval_sampling, gold_reward, seed=cfg.seed + 1)
        metrics_log.log_table("eval/samples", iteration, rows[:8])
        return metrics

    metrics_log = MetricsWriter(run_dir, enabled=strategy.is_main, resume_step=start, logging=cfg.logging, stage="ppo",
                                config=cfg, models=roles.models())
    initial = dict(state.get("initial_eval", {})) if resume_from is not None else {}
    if start == 0:
        initial = evaluate(0)
        metrics_log.log(0, initial)
        say("[ppo] iteration 0: " + ", ".join(f"{k}={v:.4g}" for k, v in initial.items()))
    progress = Progress(cfg.ppo.iterations, "ppo", enabled=strategy.is_main and cfg.logging.progress, initial=start)
    last_eval: dict[str, float] = dict(initial)
    guard = NonFiniteGuard("ppo", cfg.train.max_consecutive_nonfinite)

    for iteration in range(start, cfg.ppo.iterations):
        timings = {}
        # 1. Roll out a batch of prompts with the current policy.
        started = time.time()
        batch_prompts = stream.batch(iteration, strategy.rank, strategy.world_size)
        rollout = roles.actor.generate(batch_prompts, sampling, seed=rollout_seed(cfg.seed, iteration) + strategy.rank)
        timings["perf/generate_seconds"] = time.time() - started

        # 2. Score it: reward model, reference log-probs, values -> rewards and advantages.
        started = time.time()
        experience, row = make_experience(rollout, roles.actor, roles.reference, roles.critic, roles.reward_model,
                                          normalizer, cfg, kl_ctl.value)
        timings["perf/score_seconds"] = time.time() - started
        nonfinite = {name: float("nan") for name in row.get("ppo/nonfinite", "").split(",") if name}
        if not guard.check(iteration + 1, nonfinite, strategy, before_update=True):
            # A non-finite score, log-prob or value: skip this update, keep the last good weights.
            metrics_log.log(iteration + 1, {"ppo/skipped_nonfinite": float(guard.skipped)})
            continue
        row["ppo/skipped_nonfinite"] = float(guard.skipped)

        # 3. PPO epochs over shuffled mini-batches for actor and critic (+ the ptx term).
        started = time.time()
        train_actor = iteration >= cfg.ppo.critic_warmup_iterations
        orders = shuffle_orders(shuffle_rng, cfg.ppo.ppo_epochs, roles.local_batch_size(len(batch_prompts)))
        train_metrics = roles.update(experience, orders, kl_ctl.value, train_actor, iteration * steps_per_iteration(cfg))
        if ema is not None and train_actor:
            ema.update(trained["actor"].module)
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
            checkpoints.save(trained, done, loop_state(done))
        if done < cfg.ppo.iterations and STOP.agreed(strategy):  # SIGTERM / Ctrl-C: checkpoint, then stop
            path = checkpoints.save(trained, done, loop_state(done))
            metrics_log.finish()
            raise interrupted("ppo", done, cfg.ppo.iterations, path, STOP.signal_name)
    progress.close()

    # 6. Export the final actor (and its EMA) for use with plain transformers.
    summary = {**{f"initial_{k}": v for k, v in initial.items()}, **last_eval, "kl_coef": kl_ctl.value}
    strategy.export(trained["actor"], tokenizer, run_dir / "model", extra_files={"rlhf_summary.json": summary})
    if ema is not None:
        ema.copy_to(trained["actor"].module)
        strategy.export(trained["actor"], tokenizer, run_dir / "model_ema")
    if strategy.is_main:
        save_config(cfg, run_dir / "model" / "rlhf_config.yaml")
    say("[ppo] done: " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items()) + f"; model in {run_dir / 'model'}")
    metrics_log.finish()
    strategy.teardown()
    return PPOResult(summary, run_dir / "model", strategy.unwrap(trained["actor"]))
