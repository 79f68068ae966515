"""DPO pairs/s: our DPO stage against TRL's DPOTrainer (the current release, from its own venv).

    python benchmarks/dpo.py --model tiny|smollm2 [--no-peer] [--rounds 2]
                             [--label rows --overrides data.share_prompt=false]

Each step trains on the same `dpo_pairs` (prompt, chosen, rejected) records of the scale on
both sides (K=2: one pair per prompt), with a live frozen reference (ours
`reference.precompute=false`, TRL's `precompute_ref_log_probs=False`, both defaults), the
sigmoid loss with β = 0.1, the same learning rate, max length 256 and precision
(`--precision fp32|bf16`: ours strategy.mixed_precision=no|bf16, TRL's bf16=False|True; bf16
results in dpo_<model>_bf16.json); TRL's gradient checkpointing off. Each side in its default layout: ours forwards each prompt once
for its two answers (`data.share_prompt`; `--overrides data.share_prompt=false` gives one row
per answer) and takes the output layer only at answer positions; TRL forwards [chosen rows;
rejected rows] padded. A pair is one comparison in the loss. Per-step rates are medians over
the timed steps after the warm-up; the two sides run `--rounds` times in ABBA order and the
ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common

BETA = 0.1
LR = 1e-6


def main() -> None:
    parser = common.stage_parser(__doc__)
    args = parser.parse_args()
    scale = common.SCALES[args.model]
    steps = args.steps or scale.steps
    directory = common.model_dir(args.model)
    pairs = scale.dpo_pairs
    records = common.make_records("rank", pairs * (scale.warmup + steps) + 8, scale, seed=1, k=2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dpo-data-") as tmp:
        data = common.write_jsonl(records[8:], Path(tmp) / "rank.jsonl")
        eval_data = common.write_jsonl(records[:4], Path(tmp) / "eval.jsonl")

        def run_ours() -> list[dict]:
            return common.run_stage("dpo", [
                f"model.path={directory}", f"data.train.path={data}", f"data.eval.path={eval_data}",
                f"data.max_length={scale.max_length}", f"data.max_prompt_length={scale.max_prompt_length}",
                f"train.micro_batch_size={pairs}", f"train.global_batch_size={pairs}",
                f"train.max_steps={scale.warmup + steps}", f"train.lr={LR}", "train.lr_scheduler=constant",
                "train.warmup_ratio=0", "train.save_every=0", "train.eval_every=0", f"loss.beta={BETA}",
                "loss.loss_type=sigmoid", *common.precision_overrides(args.precision), *args.overrides], scale.warmup)

        def run_peer() -> dict:
            return common.run_peer("trl", "trl_dpo.py", {
                "model_dir": str(directory), "data": str(data), "pairs_per_step": pairs, "max_length": scale.max_length,
                "beta": BETA, "warmup": scale.warmup, "steps": steps, "seed": 0, "lr": LR,
                "bf16": args.precision == "bf16"})

        ours_runs, peer_runs = common.alternate(args.rounds, run_ours, None if args.no_peer else run_peer)
        ours_rates = [common.median([r["perf/pairs_per_s"] for r in run]) for run in ours_runs]
        ours_row = {"side": args.label, "model": args.model, "pairs_per_s": common.median(ours_rates),
                    "pairs_per_step": pairs, "step_s": common.median([r["perf/step_seconds"] for run in ours_runs for r in run])}
        rows.append(ours_row)
        if peer_runs:
            peer_rates = [common.median([p["pairs_per_step"] / s for s in p["step_seconds"]]) for p in peer_runs]
            rows.append({"side": peer_runs[0]["peer"], "model": args.model, "pairs_per_s": common.median(peer_rates),
                         "pairs_per_step": pairs, "step_s": common.median([s for p in peer_runs for s in p["step_seconds"]]),
                         "truncated_pairs": max(p["truncated_pairs"] for p in peer_runs)})
            ours_row["ratio"] = common.paired_ratio(ours_rates, peer_rates)
            ours_row["round_ratios"] = [round(o / p, 3) for o, p in zip(ours_rates, peer_rates)]
    common.emit(common.result_name("dpo", args), rows,
                ["side", "model", "pairs_per_s", "pairs_per_step", "step_s", "truncated_pairs", "ratio", "round_ratios"],
                {"steps": steps, "warmup": scale.warmup, "beta": BETA, "max_length": scale.max_length,
                 "rounds": args.rounds, "overrides": args.overrides, "precision": args.precision})


if __name__ == "__main__":
    main()
