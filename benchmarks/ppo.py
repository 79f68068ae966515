"""PPO samples/s, split into generation, scoring and training: our PPO stage against TRL's
PPOTrainer (TRL 1.12, the last release that ships it, from its own venv).

    python benchmarks/ppo.py --model tiny|smollm2 [--no-peer] [--overrides key=value ...]

With `--overrides rollout.engine=vllm` the result also holds `vllm_startup`: the engine's
import, construction and first rollout, measured before the stage, apart from its timed steps
(benchmarks/vllm_side.py).

One sample is one prompt's rollout taken through a whole PPO iteration: generate, score
(reference log-probs, values, reward; ours also reuses the sampler's log-probs instead of
an actor forward unless rollout.reuse_logprobs=false) and train (actor and critic over the
same mini-batches and epochs). Same policy, reward model (critic initialised from it),
prompts, rollout batch, mini-batch, PPO epochs, response length, temperature 1 and KL
coefficient and precision on both sides (`--precision fp32|bf16`: ours
strategy.mixed_precision=no|bf16, TRL's bf16=False|True; bf16 results in ppo_<model>_bf16.json);
no reward normalisation on either. Our rows also split the training phase (train_s) into the
actor's and critic's forward+backward, the ptx loss and the optimizer steps (perf/train_*). Rates are medians over the
timed iterations after the warm-up; with a peer, the two sides run `--rounds` times in ABBA
order and the ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common
import vllm_side

PPO_EPOCHS = 2
KL_COEF = 0.05


def main() -> None:
    parser = common.stage_parser(__doc__)
    args = parser.parse_args()
    scale = common.SCALES[args.model]
    steps = args.steps or scale.steps
    policy, reward = common.model_dir(args.model), common.reward_model_dir(args.model)
    batch, mini = scale.ppo_batch, scale.ppo_batch // 2
    records = common.make_records("prompt", batch * (scale.warmup + steps) + 8, scale)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ppo-data-") as tmp:
        prompts = common.write_jsonl(records[8:], Path(tmp) / "prompts.jsonl")
        eval_prompts = common.write_jsonl(records[:2], Path(tmp) / "eval.jsonl")
        def run_ours() -> list[dict]:
            return common.run_stage("ppo", [
                f"model.path={policy}", f"reward_model.path={reward}", f"data.prompts.path={prompts}",
                f"data.eval_prompts.path={eval_prompts}", f"data.max_prompt_length={scale.max_prompt_length}",
                f"rollout.max_new_tokens={scale.ppo_new_tokens}", "rollout.temperature=1.0",
                f"rollout.batch_size={batch}", "reward.normalize=none", "reward.clip=0", f"kl.coef={KL_COEF}",
                "kl.estimator=k1", f"ppo.iterations={scale.warmup + steps}", f"ppo.rollout_batch_size={batch}",
                f"ppo.mini_batch_size={mini}", f"ppo.micro_batch_size={mini}", f"ppo.ppo_epochs={PPO_EPOCHS}",
                "ppo.actor_lr=1e-6", "ppo.critic_lr=5e-6", f"ppo.eval_every={scale.warmup + steps}",
                "eval.max_prompts=2", "eval.samples_per_prompt=1", "train.save_every=0",
                *common.precision_overrides(args.precision), *args.overrides],
                scale.warmup)

        def run_peer() -> dict:
            return common.run_peer("trl-ppo", "trl_ppo.py", {
                "policy_dir": str(policy), "reward_dir": str(reward), "prompts": str(prompts), "batch_size": batch,
                "mini_batch_size": mini, "ppo_epochs": PPO_EPOCHS, "response_length": scale.ppo_new_tokens,
                "temperature": 1.0, "kl_coef": KL_COEF, "warmup": scale.warmup, "steps": steps, "seed": 0, "lr": 1e-6,
                "bf16": args.precision == "bf16"})

        startup = vllm_side.stage_startup([*common.precision_overrides(args.precision), *args.overrides],
                                          policy, records[8 : 8 + batch], 1,
                                          scale.ppo_new_tokens, scale.max_prompt_length)
        ours_runs, peer_runs = common.alternate(args.rounds, run_ours, None if args.no_peer else run_peer)
        ours_rates, fields = common.rl_step_rates(ours_runs, batch)
        ours_row = {"side": args.label, "model": args.model, **fields}
        rows.append(ours_row)
        if peer_runs:
            peer_rates = [common.median([p["rollouts_per_step"] / s for s in p["step_seconds"]]) for p in peer_runs]
            rows.append({"side": peer_runs[0]["peer"], "model": args.model, "samples_per_s": common.median(peer_rates),
                         "step_s": common.median([s for p in peer_runs for s in p["step_seconds"]]),
                         **{f"{k}_s": common.median([s for p in peer_runs for s in p[f"{k}_seconds"]])
                            for k in ("generate", "score", "train")},
                         "new_tokens": common.median([p.get("new_tokens_per_step", 0) / batch for p in peer_runs])
                         or None})
            ours_row["ratio"] = common.paired_ratio(ours_rates, peer_rates)
            ours_row["round_ratios"] = [round(o / p, 3) for o, p in zip(ours_rates, peer_rates)]
    phases = [key for key in ours_row if key.startswith("train_") and key != "train_s"]
    common.emit(common.result_name("ppo", args), rows,
                ["side", "model", "samples_per_s", "step_s", "generate_s", "score_s", "train_s", *phases, "new_tokens",
                 "ratio", "round_ratios"],
                {"steps": steps, "warmup": scale.warmup, "batch": batch, "mini_batch": mini, "ppo_epochs": PPO_EPOCHS,
                 "overrides": args.overrides, "vllm_startup": startup, "rounds": args.rounds, "precision": args.precision})


if __name__ == "__main__":
    main()
