"""GRPO samples/s, split into generation, scoring and training: our PPO stage with
`ppo.advantage=grpo` against TRL's GRPOTrainer (the current release, from its own venv).

    python benchmarks/grpo.py --model tiny|smollm2 [--no-peer] [--overrides key=value ...]

With `--overrides rollout.engine=vllm` the result also holds `vllm_startup`: the engine's
import, construction and first rollout, measured before the stage, apart from its timed steps
(benchmarks/vllm_side.py).

One sample is one answer taken through a whole GRPO step: generate (each prompt's group of
answers), score (the reward rule of benchmarks/reward_rule.py on every answer, the frozen
reference's log-probs) and train (one optimizer step over all the step's answers). Both sides
have no reward model and no critic; the reward is the same Python function, run by ours in
its reward workers (`reward.functions`) and by TRL in-process. Same policy, prompts (chat
template), prompts per step and answers per prompt, response length, temperature 1, one
update per generation (TRL's `num_iterations=1`, ours `ppo.ppo_epochs=1` with one mini-batch),
clip 0.2, group-normalised advantages ((r - mean) / std), KL to the reference in the loss with
β = 0.04 and the k3 estimator (TRL's `beta`), the loss averaged over all the step's answer
tokens (TRL's default `dapo`, ours `token_mean`), learning rate and precision (`--precision
fp32|bf16`: ours strategy.mixed_precision=no|bf16, TRL's bf16=False|True; bf16 results in
grpo_<model>_bf16.json). Rates are medians over
the timed steps after the warm-up; with a peer, the two sides run `--rounds` times in ABBA order
and the ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common
import vllm_side

KL_COEF = 0.04
LR = 1e-6
REWARD = "reward_rule:prompt_overlap"


def main() -> None:
    parser = common.stage_parser(__doc__)
    args = parser.parse_args()
    scale = common.SCALES[args.model]
    steps = args.steps or scale.steps
    policy = common.model_dir(args.model)
    prompts_per_step, group = scale.grpo_prompts, scale.grpo_samples
    samples = prompts_per_step * group
    records = common.make_records("prompt", prompts_per_step * (scale.warmup + steps) + 8, scale)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-grpo-data-") as tmp:
        prompts = common.write_jsonl(records[8:], Path(tmp) / "prompts.jsonl")
        eval_prompts = common.write_jsonl(records[:2], Path(tmp) / "eval.jsonl")

        def run_ours() -> list[dict]:
            return common.run_stage("ppo", [
                f"model.path={policy}", f"data.prompts.path={prompts}", f"data.eval_prompts.path={eval_prompts}",
                f"data.max_prompt_length={scale.max_prompt_length}", f"rollout.max_new_tokens={scale.ppo_new_tokens}",
                "rollout.temperature=1.0", f"rollout.batch_size={samples}", f"rollout.n_samples_per_prompt={group}",
                f"reward.functions=[{REWARD}]", "reward.normalize=none", "reward.clip=0",
                "ppo.advantage=grpo", f"kl.coef={KL_COEF}", "kl.estimator=k3", "kl.in_loss=true",
                f"ppo.iterations={scale.warmup + steps}", f"ppo.rollout_batch_size={prompts_per_step}",
                f"ppo.mini_batch_size={samples}", f"ppo.micro_batch_size={samples}", "ppo.ppo_epochs=1",
                "ppo.clip_eps=0.2", "ppo.loss_aggregation=token_mean", f"ppo.actor_lr={LR}",
                f"ppo.eval_every={scale.warmup + steps}", "eval.max_prompts=2", "eval.samples_per_prompt=1",
                "train.save_every=0", *common.precision_overrides(args.precision), *args.overrides], scale.warmup)

        def run_peer() -> dict:
            return common.run_peer("trl", "trl_grpo.py", {
                "policy_dir": str(policy), "prompts": str(prompts), "prompts_per_step": prompts_per_step,
                "num_generations": group, "max_completion_length": scale.ppo_new_tokens, "temperature": 1.0,
                "beta": KL_COEF, "warmup": scale.warmup, "steps": steps, "seed": 0, "lr": LR,
                "reward_dir": str(common.HERE), "reward": REWARD, "bf16": args.precision == "bf16"})

        startup = vllm_side.stage_startup([*common.precision_overrides(args.precision), *args.overrides],
                                          policy, records[8 : 8 + prompts_per_step], group,
                                          scale.ppo_new_tokens, scale.max_prompt_length)
        ours_runs, peer_runs = common.alternate(args.rounds, run_ours, None if args.no_peer else run_peer)
        ours_rates, fields = common.rl_step_rates(ours_runs, samples)
        ours_row = {"side": args.label, "model": args.model, **fields,
                    "reward": common.median([r["ppo/reward_raw"] for run in ours_runs for r in run])}
        rows.append(ours_row)
        if peer_runs:
            peer_rates = [common.median([p["samples_per_step"] / s for s in p["step_seconds"]]) for p in peer_runs]
            rows.append({"side": peer_runs[0]["peer"], "model": args.model, "samples_per_s": common.median(peer_rates),
                         "step_s": common.median([s for p in peer_runs for s in p["step_seconds"]]),
                         **{f"{k}_s": common.median([s for p in peer_runs for s in p[f"{k}_seconds"]])
                            for k in ("generate", "score", "train")},
                         "new_tokens": common.median([x for p in peer_runs for x in p["mean_lengths"]]),
                         "reward": common.median([x for p in peer_runs for x in p["rewards"]])})
            ours_row["ratio"] = common.paired_ratio(ours_rates, peer_rates)
            ours_row["round_ratios"] = [round(o / p, 3) for o, p in zip(ours_rates, peer_rates)]
    common.emit(common.result_name("grpo", args), rows,
                ["side", "model", "samples_per_s", "step_s", "generate_s", "score_s", "train_s", "new_tokens", "reward",
                 "ratio", "round_ratios"],
                {"steps": steps, "warmup": scale.warmup, "prompts_per_step": prompts_per_step, "samples_per_prompt": group,
                 "max_new_tokens": scale.ppo_new_tokens, "kl_coef": KL_COEF, "overrides": args.overrides, "vllm_startup": startup,
                 "rounds": args.rounds, "precision": args.precision})


if __name__ == "__main__":
    main()
