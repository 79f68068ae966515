"""PPO's training phase alone, per role and phase, on one fixed experience: where the two thirds
of a PPO step go (actor forward+backward, actor optimizer step, critic forward+backward, critic
step, the ptx term) and what a change to them buys.

    python benchmarks/ppo_train.py --model tiny|smollm2 [--repeats 5] [--variants A B ...]

The roles are built as the PPO stage builds them (same settings as benchmarks/ppo.py: rollout
batch 8 (smollm2) or 16 (tiny), mini- and micro-batch half of it, 2 PPO epochs); one rollout is
generated and scored once (seed 0), then each repeat scores it again (`score_s`: reference,
critic and reward model, the actor's too with rollout.reuse_logprobs=false) and runs
`Actor.update` and `Critic.update` on that same experience, keeping their `perf/train_*` seconds. The learning rates
are tiny, so the weights barely move and every repeat does the same work.

`--variants` names settings from VARIANTS (`padded`, `padding_free`: ppo.padding_free); the variants of one run share the process and
the experience, and run in turn (A B B A ...), so drift falls on all of them alike. The median
over repeats per variant and phase is printed and kept in benchmarks/results/ppo_train_<model>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common

PPO_EPOCHS = 2

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "padded": {"padding_free": False},
    "padding_free": {"padding_free": True},
}
"""Named settings for `--variants`: fields of every role's `RoleForwards` (rlhf/roles/roles.py),
which say how its training and scoring forwards lay out the rows."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(common.SCALES), default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--overrides", nargs="*", default=[], help="extra key=value for every variant")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="a prompt file (e.g. data/hh_rlhf/prompts.jsonl from `rlhf data fetch hh-rlhf`) "
                             "instead of the synthetic prompts; its first rollout-batch prompts are used")
    parser.add_argument("--max-prompt-length", type=int, default=None)
    args = parser.parse_args()
    common.add_project_to_path()
    import torch

    from rlhf.config import PPOConfig, load_config
    from rlhf.data.prompt_dataset import PromptStream, prompt_batch
    from rlhf.data.splits import load_split
    from rlhf.models.loading import load_tokenizer
    from rlhf.roles.build import reward_stats_for
    from rlhf.roles.team import LocalRoles
    from rlhf.roles.update import mini_batch_shares
    from rlhf.rollout.engine import SamplingParams
    from rlhf.training.ppo import PPOState, make_experience, shuffle_orders, update_samples
    from rlhf.training.run import Run

    scale = common.SCALES[args.model]
    batch, mini = scale.ppo_batch, scale.ppo_batch // 2
    results: dict[str, dict[str, list[float]]] = {name: {} for name in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench-ppo-train-") as tmp:
        prompts = args.prompts.resolve() if args.prompts else common.write_jsonl(
            common.make_records("prompt", batch, scale), Path(tmp) / "prompts.jsonl")
        max_prompt_length = args.max_prompt_length or scale.max_prompt_length
        base = [f"model.path={common.model_dir(args.model)}", f"reward_model.path={common.reward_model_dir(args.model)}",
                f"data.prompts.path={prompts}", "data.eval_fraction=0", f"data.max_prompt_length={max_prompt_length}",
                f"rollout.max_new_tokens={scale.ppo_new_tokens}", "rollout.temperature=1.0",
                f"rollout.batch_size={batch}", "reward.normalize=none", "reward.clip=0", "kl.coef=0.05",
                f"ppo.rollout_batch_size={batch}", f"ppo.mini_batch_size={mini}", f"ppo.micro_batch_size={mini}",
                f"ppo.ppo_epochs={PPO_EPOCHS}", "ppo.actor_lr=1e-9", "ppo.critic_lr=1e-9", "logging.progress=false",
                f"output_dir={tmp}/run", *args.overrides]
        cfg = load_config(PPOConfig, overrides=base)
        with Run.start("ppo", cfg) as run:
            data = load_split("prompt", cfg.data.prompts, cfg.data.eval_prompts, 0.0, cfg.data.on_error, cfg.seed)
            tokenizer = load_tokenizer(cfg.model)
            stream = PromptStream(prompt_batch(tokenizer, data.train, cfg.data.max_prompt_length), batch, cfg.seed)
            roles = run.own(LocalRoles(cfg, run.strategy, tokenizer))
            prompts_batch = stream.take(0, 0, 1)  # the first `batch` prompts of the seeded order
            sample = cfg.rollout
            rollout = roles.generate(prompts_batch.ids, SamplingParams(sample.max_new_tokens, sample.temperature,
                                                                       sample.top_k, sample.top_p), seed=0)
            scored = roles.score(rollout, prompts_batch)
            state = PPOState.from_config(cfg, reward_stats_for(cfg), None)
            experience, _ = make_experience(scored, state.normalizer, cfg.kl.coef, cfg.kl.estimator, cfg.kl.in_loss,
                                            cfg.ppo.gamma, cfg.ppo.lam, cfg.ppo.whiten_advantages)
            samples = update_samples(scored.scores, 1, False, mini)
            orders = shuffle_orders(torch.Generator().manual_seed(0), PPO_EPOCHS, samples)
            mask = rollout.response_mask
            shape = {"rows": int(mask.shape[0]), "sequence_columns": int(rollout.sequences.shape[1]),
                     "response_tokens": int(mask.sum()), "real_tokens": int(rollout.attention_mask.sum())}
            shares = [1.0 - float(part.attention_mask.sum()) / part.attention_mask.numel()
                      for step in mini_batch_shares(orders, mini, mini, 0, 1) for index in step.micro_batches
                      for part in [rollout.select(index).trimmed()]]
            shape["micro_batch_padding_share"] = round(sum(shares) / len(shares), 3)
            apply = variant_switch(roles)
            for repeat in range(args.repeats + 1):  # the first repeat warms up
                order = args.variants if repeat % 2 == 0 else args.variants[::-1]
                for name in order:
                    apply(name)
                    started = time.perf_counter()
                    roles.score(rollout, prompts_batch)
                    scoring = time.perf_counter() - started
                    metrics = roles.update(experience, orders, cfg.kl.coef, True, 0)
                    if repeat == 0:
                        continue
                    results[name].setdefault("score", []).append(scoring)
                    for key, value in metrics.items():
                        if key.startswith("perf/train_"):
                            results[name].setdefault(key.removeprefix("perf/").removesuffix("_seconds"), []).append(value)
    rows = []
    for name, phases in results.items():
        row = {"variant": name, **{phase: round(common.median(values), 4) for phase, values in sorted(phases.items())}}
        row["train_s"] = round(row.get("train_actor", 0.0) + row.get("train_critic", 0.0), 4)
        row["score_s"] = row.pop("score")
        rows.append(row)
    columns = ["variant", "score_s", "train_s", *sorted({k for r in rows for k in r} - {"variant", "score_s", "train_s"})]
    common.emit(f"ppo_train_{args.model}", rows, columns,
                {"repeats": args.repeats, "experience": shape, "variants": {n: VARIANTS[n] for n in args.variants},
                 "overrides": args.overrides, "prompts": str(args.prompts or "synthetic"),
                 "max_prompt_length": max_prompt_length, "per_repeat": results})


def variant_switch(roles):
    """A function that puts the roles in a named variant's settings (`default`: as built)."""
    from dataclasses import replace

    built = {role: role.forwards for role in (roles.actor, roles.critic, roles.reference, roles.reward_model)
             if role is not None}

    def apply(name: str) -> None:
        for role, forwards in built.items():
            role.forwards = replace(forwards, **VARIANTS[name])
    return apply


if __name__ == "__main__":
    main()
