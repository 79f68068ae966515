"""RM pairs/s at K=2 and K=4: our RM stage against TRL's RewardTrainer.

    python benchmarks/rm.py --model tiny|smollm2 [--ks 2,4] [--rounds 2] [--no-peer]
                            [--label rows --overrides data.share_prompt=false]

Each step forwards the same number of sequences on both sides (`rm_sequences` of the
scale): ours as prompts x K answers, every C(K,2) pair of a prompt compared from its K
scores (InstructGPT's layout), by default with each prompt forwarded once for its K answers
(`data.share_prompt`; `--overrides data.share_prompt=false` gives one row per answer); TRL as (chosen, rejected) pairs, the C(K,2) pairs of a
prompt expanded into separate rows as its data format requires. A pair is one comparison
in the loss. Same records, lengths, learning rate and precision (`--precision fp32|bf16`:
ours strategy.mixed_precision=no|bf16, TRL's bf16=False|True; bf16 results in
rm_<model>_bf16.json); TRL's gradient checkpointing off. Per-step rates are medians over the timed steps after the warm-up; the
two sides run `--rounds` times in ABBA order and the ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import common


def main() -> None:
    parser = common.stage_parser(__doc__)
    parser.add_argument("--ks", default="2,4")
    args = parser.parse_args()
    scale = common.SCALES[args.model]
    steps = args.steps or scale.steps
    directory = common.model_dir(args.model)
    rows = []
    for k in (int(k) for k in args.ks.split(",")):
        prompts_per_step = scale.rm_sequences // k
        pairs_per_step_peer = scale.rm_sequences // 2
        records = common.make_records("rank", prompts_per_step * (scale.warmup + steps) * 2 + 8, scale, k=k)
        with tempfile.TemporaryDirectory(prefix="bench-rm-data-") as tmp:
            data = common.write_jsonl(records, Path(tmp) / "rank.jsonl")
            eval_data = common.write_jsonl(records[:4], Path(tmp) / "eval.jsonl")

            def run_ours() -> list[dict]:
                return common.run_stage("rm", [
                    f"model.path={directory}", f"data.train.path={data}", f"data.eval.path={eval_data}",
                    f"data.max_length={scale.max_length}", f"data.max_prompt_length={scale.max_prompt_length}",
                    f"train.micro_batch_size={prompts_per_step}", f"train.global_batch_size={prompts_per_step}",
                    f"train.max_steps={scale.warmup + steps}", "train.lr=1e-5", "train.lr_scheduler=constant",
                    "train.warmup_ratio=0", "train.save_every=0", "train.eval_every=0",
                    *common.precision_overrides(args.precision), *args.overrides], scale.warmup)

            def run_peer() -> dict:
                return common.run_peer("trl", "trl_rm.py", {
                    "model_dir": str(directory), "data": str(data), "pairs_per_step": pairs_per_step_peer,
                    "max_length": scale.max_length, "warmup": scale.warmup, "steps": steps, "seed": 0, "lr": 1e-5,
                    "bf16": args.precision == "bf16"})

            ours_runs, peer_runs = common.alternate(args.rounds, run_ours, None if args.no_peer else run_peer)
            ours_rates = [common.median([r["perf/pairs_per_s"] for r in run]) for run in ours_runs]
            ours_row = {"side": args.label, "model": args.model, "k": k, "pairs_per_s": common.median(ours_rates),
                        "pairs_per_step": prompts_per_step * math.comb(k, 2), "sequences_per_step": scale.rm_sequences,
                        "step_s": common.median([r["perf/step_seconds"] for run in ours_runs for r in run])}
            rows.append(ours_row)
            if peer_runs:
                peer_rates = [common.median([p["pairs_per_step"] / s for s in p["step_seconds"]]) for p in peer_runs]
                rows.append({"side": peer_runs[0]["peer"], "model": args.model, "k": k,
                             "pairs_per_s": common.median(peer_rates), "pairs_per_step": pairs_per_step_peer,
                             "sequences_per_step": 2 * pairs_per_step_peer,
                             "step_s": common.median([s for p in peer_runs for s in p["step_seconds"]]),
                             "dropped_pairs": max(p["dropped_pairs"] for p in peer_runs)})
                ours_row["ratio"] = common.paired_ratio(ours_rates, peer_rates)
                ours_row["round_ratios"] = [round(o / p, 3) for o, p in zip(ours_rates, peer_rates)]
    common.emit(common.result_name("rm", args), rows, ["side", "model", "k", "pairs_per_s", "pairs_per_step", "sequences_per_step",
                                           "step_s", "dropped_pairs", "ratio", "round_ratios"],
                {"steps": steps, "warmup": scale.warmup, "rounds": args.rounds, "overrides": args.overrides,
                 "precision": args.precision})


if __name__ == "__main__":
    main()
