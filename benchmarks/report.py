"""Summarise benchmarks/results/*.json into the tables BENCHMARKS.md quotes, with each
target of issues 9, 23 and 26 marked met or missed.

    python benchmarks/report.py

Results are grouped by the processor they were measured on (vendor, model, the flags that
decide matmul speed; `common.processor_key`): numbers from two machines never share a table,
and each processor gets its own targets table. Within a processor, fp32 and bf16 results
(`*_bf16.json`, `--precision bf16`) are listed per model.
"""

from __future__ import annotations

import json
from pathlib import Path

import common

TARGETS = {  # key: (issue, what, the ratio or fraction it needs)
    "ppo": ("9", "PPO samples/s vs TRL PPOTrainer", 2.0),
    "sft": ("9", "SFT tokens/s vs TRL SFTTrainer", 1.2),
    "sft_bf16": ("26", "SFT tokens/s vs TRL SFTTrainer, both bf16", 3.0),
    "rm_k4": ("9", "RM pairs/s at K=4 vs TRL RewardTrainer", 2.0),
    "rm_k2": ("26", "RM pairs/s at K=2 vs TRL RewardTrainer", 1.5),
    "rollout_b8": ("26", "rollout new-tokens/s at batch 8 vs model.generate (ours or vLLM, the faster)", 2.0),
    "grpo": ("23", "GRPO samples/s vs TRL GRPOTrainer", 2.0),
    "dpo": ("23", "DPO pairs/s vs TRL DPOTrainer", 1.5),
    "mfu": ("9", "SFT MFU vs the measured fp32 matmul peak", 0.70),
    "mfu_bf16": ("26", "SFT MFU vs the measured bf16 matmul peak", 0.30),
}
VARIANTS = ("", "_logits", "_padded", "_packed", "_grouped", "_rows", "_generate", "_decode", "_vllm")
KINDS = ("sft", "rm", "ppo", "rollout", "grpo", "dpo")


def load_all(directory: Path | None = None) -> dict[str, dict]:
    """Every result file by name (the file's stem)."""
    directory = directory or common.HERE / "results"
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def by_processor(results: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{processor key: {result name: result}}, in the order the processors first appear."""
    groups: dict[str, dict[str, dict]] = {}
    for name, result in results.items():
        groups.setdefault(common.processor_key(result), {})[name] = result
    return groups


def ordered_names(model: str, precision: str) -> list[str]:
    suffix = "" if precision == "fp32" else f"_{precision}"
    return [f"{kind}_{model}{variant}{suffix}" for kind in KINDS for variant in VARIANTS]


def checks(name: str, result: dict, model: str, precision: str) -> list[tuple]:
    """(model, precision, issue, target, needed, measured) of each target `result` measures."""
    found = []
    main = {f"{kind}_{model}" + ("" if precision == "fp32" else f"_{precision}"): kind
            for kind in ("sft", "ppo", "grpo", "dpo", "rm", "rollout")}
    main[f"rollout_{model}_vllm" + ("" if precision == "fp32" else f"_{precision}")] = "rollout"
    kind = main.get(name)
    if kind is None:
        return found
    for row in result["rows"]:
        if kind == "rollout":
            if row.get("batch") != 8 or not row.get("generate_tokens_per_s"):
                continue
            best = max(row.get("ours_tokens_per_s") or 0, row.get("vllm_tokens_per_s") or 0)
            found.append((model, precision, *TARGETS["rollout_b8"], best / row["generate_tokens_per_s"]))
        elif row.get("ratio") is None:
            continue
        elif kind == "rm":
            key = f"rm_k{row['k']}"
            if key in TARGETS:
                found.append((model, precision, *TARGETS[key], row["ratio"]))
        else:
            key = "sft_bf16" if kind == "sft" and precision == "bf16" else kind
            found.append((model, precision, *TARGETS[key], row["ratio"]))
    if kind == "sft" and model == "smollm2":
        found.append((model, precision, *TARGETS["mfu" if precision == "fp32" else "mfu_bf16"],
                      result["rows"][0]["mfu"]))
    return found


def print_group(results: dict[str, dict]) -> list[tuple]:
    peak = results.get("matmul_peak")
    if peak:
        print("Matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak["peak_flops"].items())
              + " (" + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak.get("peak_flops_by_kernel", {}).items()) + ")")
        print()
    found = []
    for model in common.SCALES:
        for precision in common.PRECISIONS:
            names = [name for name in ordered_names(model, precision) if name in results]
            if not names:
                continue
            print(f"### {model}, {precision}\n")
            for name in names:
                result = results[name]
                columns = [c for c in result["rows"][0] if c not in ("model",)]
                for row in result["rows"][1:]:
                    columns += [c for c in row if c not in columns and c != "model"]
                print(f"#### {name}\n")
                print(common.markdown_table(result["rows"], columns))
                print()
                found += checks(name, result, model, precision)
    return found


def main(directory: Path | None = None) -> None:
    for processor, results in by_processor(load_all(directory)).items():
        print(f"## {processor}\n")
        found = print_group(results)
        if found:
            vendor = processor.split(" ", 1)[0]
            print(f"### Targets on {vendor} ({processor})\n")
            print(common.markdown_table(
                [{"model": m, "precision": p, "issue": issue, "target": what, "needed": need, "measured": got,
                  "met": "yes" if got >= need else "no"} for m, p, issue, what, need, got in found],
                ["model", "precision", "issue", "target", "needed", "measured", "met"]))
            print()


if __name__ == "__main__":
    main()
