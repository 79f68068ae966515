"""Stage 3, PPO / PPO-ptx: maximise r(x, y) - β·log(π(y|x) / π_SFT(y|x)) [+ γ·log π(x_pretrain)].

    rlhf ppo --config configs/ppo.yaml [key=value ...]

Roles: actor (trainable, from SFT), critic (trainable, from the RM by default), reference
(frozen SFT) and reward model (frozen RM), all in this process (or in each SPMD worker), or as
Ray actor groups when `ppo.colocate` lists role groups. Writes config.yaml, metrics.jsonl,
samples.jsonl, checkpoints/ and the final actor as model/ (and model_ema/ with ppo.ema_decay)
into `output_dir`.
"""

from __future__ import annotations

import time

from rlhf.config import PPOConfig
from rlhf.data.prompt_dataset import PromptStream, prompt_batch
from rlhf.data.splits import load_split
from rlhf.logging.alarms import AlarmMonitor
from rlhf.logging.tables import rollout_rows
from rlhf.models.loading import load_tokenizer
from rlhf.ray.ppo_roles import build_ppo_roles, ppo_world, uses_role_groups
from rlhf.roles.build import reward_stats_for, steps_per_iteration
from rlhf.roles.evaluate import PolicyEvaluation, load_gold_reward
from rlhf.rollout.engine import SamplingParams
from rlhf.training.ppo import PPOState, make_experience, rollout_seed, shuffle_orders, update_samples
from rlhf.training.run import Run, Schedule, StageResult

runs_on_driver = uses_role_groups  # on Ray with role groups, this loop runs in the driver


def main(cfg: PPOConfig) -> StageResult:
    with Run.start("ppo", cfg, world=ppo_world(cfg)) as run:
        world = run.world

        # 1. Data: training and held-out prompts (token ids, texts and their rows' fields).
        data = load_split("prompt", cfg.data.prompts, cfg.data.eval_prompts, cfg.data.eval_fraction,
                          cfg.data.on_error, cfg.seed)
        run.say(data.summary())
        tokenizer = load_tokenizer(cfg.model)
        stream = PromptStream(prompt_batch(tokenizer, data.train, cfg.data.max_prompt_length),
                              cfg.ppo.rollout_batch_size, cfg.seed)
        eval_records = data.eval[: cfg.eval.max_prompts] * cfg.eval.samples_per_prompt
        group = cfg.rollout.n_samples_per_prompt

        # 2. Roles (only those the config needs; dropout off in all), sampling, evaluation, state.
        roles = run.own(build_ppo_roles(cfg, world, tokenizer))
        sample = cfg.rollout
        sampling = SamplingParams(sample.max_new_tokens, sample.temperature, sample.top_k, sample.top_p)
        eval_sampling = SamplingParams(sample.max_new_tokens, cfg.eval.temperature or sample.temperature,
                                       sample.top_k, sample.top_p)
        evaluation = PolicyEvaluation(run, roles, tokenizer, prompt_batch(tokenizer, eval_records,
                                      cfg.data.max_prompt_length), eval_sampling,
                                      load_gold_reward(cfg.eval.gold_reward), seed=cfg.seed + 1)
        state = PPOState.from_config(cfg, reward_stats_for(cfg), roles.policy.module if cfg.ppo.ema_decay > 0 else None)
        schedule = Schedule(cfg.ppo.iterations, cfg.ppo.eval_every, save_every=cfg.train.save_every)
        start = run.begin(schedule, roles.trained(), roles.models(), evaluation, state,
                          alarms=AlarmMonitor(cfg.alarms, cfg.kl.target))

        for iteration in range(start, cfg.ppo.iterations):
            done, timings = iteration + 1, {}
            # 1. Roll out this worker's prompts (n answers each) with the current policy, and score
            #    them: reward sources, reference log-probs, values; joined into the global batch.
            started = time.time()
            prompts = stream.take(iteration, world.rank, world.world_size).repeated(group)
            rollout = roles.generate(prompts.ids, sampling, rollout_seed(cfg.seed, iteration))
            timings["perf/generate_seconds"], started = time.time() - started, time.time()
            scored = roles.score(rollout, prompts)
            timings["perf/score_seconds"] = time.time() - started
            row: dict[str, float] = world.all_reduce(roles.rewards.take_failures(), op="sum")
            if not run.check_finite(done, scored.nonfinite() or {}, row, before_update=True):
                run.log(done, row)  # a non-finite reward, log-prob or value: skip, keep the last good weights
                continue

            # 2. Rewards (normalised score - β·KL) and advantages over the global batch.
            experience, row_metrics = make_experience(scored, state.normalizer, state.kl_controller.value,
                                                      cfg.kl.estimator, cfg.kl.in_loss, cfg.ppo.gamma, cfg.ppo.lam,
                                                      cfg.ppo.whiten_advantages, cfg.ppo.advantage, group,
                                                      cfg.alarms.repetition_ngram)
            row.update(row_metrics)

            # 3. PPO epochs over shuffled global mini-batches (the groups with signal) for actor and
            #    critic (+ the ptx term).
            started = time.time()
            samples = update_samples(scored.scores, group, cfg.rollout.drop_uniform_groups, cfg.ppo.mini_batch_size)
            orders = shuffle_orders(state.shuffle_rng, cfg.ppo.ppo_epochs, samples)
            train_actor = iteration >= cfg.ppo.critic_warmup_iterations
            row.update(roles.update(experience, orders, state.kl_controller.value, train_actor,
                                    iteration * steps_per_iteration(cfg)) if len(samples) else {})
            if state.ema is not None and train_actor:
                state.ema.update(roles.policy.module)
            timings["perf/train_seconds"] = time.time() - started

            # 4. Adapt the KL coefficient to the measured KL of the global batch (Ziegler et al.).
            state.kl_controller.update(row["ppo/kl"], n_steps=cfg.samples_per_iteration)

            # 5. Log, evaluate, check the health alarms, checkpoint.
            row.update(world.all_reduce(timings, op="max"))
            row["perf/generate_tokens_per_s"] = float(scored.rollout.response_mask.sum()) / row["perf/generate_seconds"]
            row["perf/samples_per_s"] = cfg.samples_per_iteration / sum(timings.values())
            if cfg.ppo.sample_every and done % cfg.ppo.sample_every == 0:
                run.log_table("ppo/samples", done, rollout_rows(tokenizer, experience))
            run.end_step(done, row, progress={"reward": row["ppo/reward_raw"], "kl": row["ppo/kl"]})

        # 6. Export the final actor (and its EMA) for use with plain transformers.
        summary = {**{f"initial_{k}": v for k, v in run.initial_eval.items()}, **run.last_eval,
                   "kl_coef": state.kl_controller.value}
        run.export(roles.policy, tokenizer, "model", {"rlhf_summary.json": summary})
        if state.ema is not None:
            state.ema.copy_to(roles.policy.module)
            run.export(roles.policy, tokenizer, "model_ema")
        model = None if uses_role_groups(cfg) else run.strategy.unwrap(roles.policy)
        return run.finish(summary, model, nodes=roles.nodes)
