"""RM pairs/s at K=2 and K=4: our RM stage against TRL's RewardTrainer.

    python benchmarks/rm.py --model tiny|smollm2 [--ks 2,4] [--no-peer]

Each step forwards the same number of sequences on both sides (`rm_sequences` of the
scale): ours as prompts x K answers, every C(K,2) pair of a prompt compared from its K
scores (InstructGPT's layout); TRL as (chosen, rejected) pairs, the C(K,2) pairs of a
prompt expanded into separate rows as its data format requires. A pair is one comparison
in the loss. Same records, lengths, learning rate and fp32; TRL's bf16 and gradient
checkpointing off. Per-step rates are medians over the timed steps after the warm-up.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import common


def main() -> None:
    parser = common.stage_parser(__doc__, overrides=False)
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
            ours = common.run_stage("rm", [
                f"model.path={directory}", f"data.train.path={data}", f"data.eval.path={eval_data}",
                f"data.max_length={scale.max_length}", f"data.max_prompt_length={scale.max_prompt_length}",
                f"train.micro_batch_size={prompts_per_step}", f"train.global_batch_size={prompts_per_step}",
                f"train.max_steps={scale.warmup + steps}", "train.lr=1e-5", "train.lr_scheduler=constant",
                "train.warmup_ratio=0", "train.save_every=0", "train.eval_every=0"], scale.warmup)
            ours_rate = common.median([r["perf/pairs_per_s"] for r in ours])
            ours_row = {"side": "ours", "model": args.model, "k": k, "pairs_per_s": ours_rate,
                        "pairs_per_step": prompts_per_step * math.comb(k, 2), "sequences_per_step": scale.rm_sequences,
                        "step_s": common.median([r["perf/step_seconds"] for r in ours])}
            rows.append(ours_row)
            if not args.no_peer:
                peer = common.run_peer("trl", "trl_rm.py", {
                    "model_dir": str(directory), "data": str(data), "pairs_per_step": pairs_per_step_peer,
                    "max_length": scale.max_length, "warmup": scale.warmup, "steps": steps, "seed": 0, "lr": 1e-5})
                peer_rate = common.median([peer["pairs_per_step"] / s for s in peer["step_seconds"]])
                rows.append({"side": peer["peer"], "model": args.model, "k": k, "pairs_per_s": peer_rate,
                             "pairs_per_step": peer["pairs_per_step"], "sequences_per_step": 2 * peer["pairs_per_step"],
                             "step_s": common.median(peer["step_seconds"]), "dropped_pairs": peer["dropped_pairs"]})
                ours_row["ratio"] = common.ratio(ours_rate, peer_rate)
    common.emit(f"rm_{args.model}", rows, ["side", "model", "k", "pairs_per_s", "pairs_per_step", "sequences_per_step",
                                           "step_s", "dropped_pairs", "ratio"], {"steps": steps, "warmup": scale.warmup})


if __name__ == "__main__":
    main()
