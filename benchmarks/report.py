"""Summarise benchmarks/results/*.json into the tables BENCHMARKS.md quotes, with each
target of issues 9 and 23 marked met or missed.

    python benchmarks/report.py
"""

from __future__ import annotations

import json

import common

TARGETS = {  # (what, ratio it needs)
    "ppo": ("PPO samples/s vs TRL PPOTrainer", 2.0),
    "sft": ("SFT tokens/s vs TRL SFTTrainer", 1.2),
    "rm_k4": ("RM pairs/s at K=4 vs TRL RewardTrainer", 2.0),
    "rm_k2": ("RM pairs/s at K=2 vs TRL RewardTrainer", 1.2),
    "rollout_b8": ("rollout new-tokens/s at batch 8 vs model.generate", 2.0),
    "grpo": ("GRPO samples/s vs TRL GRPOTrainer", 2.0),
    "dpo": ("DPO pairs/s vs TRL DPOTrainer", 1.5),
}


def load(name: str) -> dict | None:
    path = common.HERE / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    peak = load("matmul_peak")
    if peak:
        print("Matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak["peak_flops"].items())
              + " (" + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak.get("peak_flops_by_kernel", {}).items()) + ")")
        print()
    checks = []
    for model in common.SCALES:
        print(f"## {model}\n")
        for name in (f"sft_{model}", f"sft_{model}_logits", f"sft_{model}_padded", f"sft_{model}_packed",
                     f"sft_{model}_grouped",
                     f"rm_{model}", f"rm_{model}_rows",
                     f"ppo_{model}", f"ppo_{model}_generate", f"rollout_{model}",
                     f"grpo_{model}", f"dpo_{model}", f"dpo_{model}_rows"):
            result = load(name)
            if not result:
                continue
            columns = [c for c in result["rows"][0] if c not in ("model",)]
            for row in result["rows"][1:]:
                columns += [c for c in row if c not in columns and c != "model"]
            print(f"### {name}\n")
            print(common.markdown_table(result["rows"], columns))
            print()
            for row in result["rows"]:
                if row.get("ratio") is None:
                    continue
                if name.startswith("rollout") and row["batch"] == 8:
                    checks.append((model, *TARGETS["rollout_b8"], row["ratio"]))
                elif name.startswith("rm"):
                    checks.append((model, *TARGETS[f"rm_k{row['k']}"], row["ratio"]))
                elif name in (f"sft_{model}", f"ppo_{model}", f"grpo_{model}", f"dpo_{model}"):
                    checks.append((model, *TARGETS[name.split("_")[0]], row["ratio"]))
            if name == f"sft_{model}" and model == "smollm2":
                mfu = result["rows"][0]["mfu"]
                checks.append((model, "training MFU vs measured matmul peak", 0.70, mfu))
    print("## Targets\n")
    print(common.markdown_table([{"model": m, "target": what, "needed": need, "measured": got,
                                  "met": "yes" if got >= need else "no"} for m, what, need, got in checks],
                                ["model", "target", "needed", "measured", "met"]))


if __name__ == "__main__":
    main()
