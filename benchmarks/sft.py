"""SFT tokens/s and MFU: our SFT stage against TRL's SFTTrainer on the same model and data.

    python benchmarks/sft.py --model tiny|smollm2 [--no-peer]

Same records, batch size (rows per optimizer step), max length, learning rate and precision on
both sides (`--precision fp32`, the default: ours strategy.mixed_precision=no, TRL bf16=False;
`--precision bf16`: ours bf16 products over fp32 master weights, TRL's bf16=True, results in
sft_<model>_bf16.json), each in its default batch layout: ours padding-free (each micro-batch's examples in
one row, no padding), TRL's padded rows (its `padding_free` is off by default); TRL's gradient
checkpointing off. `--label padded --overrides data.padding_free=false` measures ours
with padded rows, `--label packed --overrides data.packing=true` with examples packed into rows.
Tokens are the examples' own tokens, padding excluded; MFU = 6·N·tokens/s over the matmul
peak that matmul_peak.py measured in the dtype the run computed in (bf16 runs against the
bf16 peak), the faster of its kernels (N:
parameters in matrix products, head included); `mfu_torch_mm` takes it against `torch.mm`'s
peak alone.
Per-step rates are medians over the timed steps after the warm-up steps; with a peer, the two
sides run `--rounds` times in ABBA order and the ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common

common.add_project_to_path()

from transformers import AutoModelForCausalLM  # noqa: E402

from rlhf.logging.perf import matmul_parameters  # noqa: E402


def main() -> None:
    parser = common.stage_parser(__doc__)
    args = parser.parse_args()
    scale = common.SCALES[args.model]
    steps = args.steps or scale.steps
    directory = common.model_dir(args.model)
    params = matmul_parameters(AutoModelForCausalLM.from_pretrained(directory))
    records = common.make_records("sft", scale.sft_batch * (scale.warmup + steps) * 2 + 16, scale)

    with tempfile.TemporaryDirectory(prefix="bench-sft-data-") as tmp:
        data = common.write_jsonl(records, Path(tmp) / "sft.jsonl")
        eval_data = common.write_jsonl(records[:8], Path(tmp) / "eval.jsonl")
        def run_ours() -> list[dict]:
            return common.run_stage("sft", [
                f"model.path={directory}", f"data.train.path={data}", f"data.eval.path={eval_data}",
                f"data.max_length={scale.max_length}", f"data.max_prompt_length={scale.max_prompt_length}",
                f"train.micro_batch_size={scale.sft_batch}",
                f"train.global_batch_size={scale.sft_batch}", f"train.max_steps={scale.warmup + steps}",
                "train.lr=1e-5", "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.save_every=0",
                "train.eval_every=0", *common.precision_overrides(args.precision), *args.overrides], scale.warmup)

        def run_peer() -> dict:
            return common.run_peer("trl", "trl_sft.py", {
                "model_dir": str(directory), "data": str(data), "batch_size": scale.sft_batch,
                "max_length": scale.max_length, "warmup": scale.warmup, "steps": steps, "seed": 0, "lr": 1e-5,
                "bf16": args.precision == "bf16"})

        ours_runs, peer_runs = common.alternate(args.rounds, run_ours, None if args.no_peer else run_peer)
        ours_rates = [common.median([r["sft/tokens"] / r["perf/step_seconds"] for r in run]) for run in ours_runs]
        ours_rate = common.median(ours_rates)
        first = ours_runs[0]
        dtype = common.PRECISION_DTYPES[first[0]["precision"]]
        peak, mm_peak = common.peak_flops(dtype), common.peak_flops(dtype, "torch.mm")
        peer_dtype = common.PRECISION_DTYPES[args.precision]
        peer_peak, peer_mm_peak = common.peak_flops(peer_dtype), common.peak_flops(peer_dtype, "torch.mm")
        ours_row = {"side": args.label, "model": args.model, "precision": dtype, "tokens_per_s": ours_rate,
                    "mfu": 6 * params * ours_rate / peak, "mfu_torch_mm": 6 * params * ours_rate / mm_peak,
                    "step_s": common.median([r["perf/step_seconds"] for run in ours_runs for r in run]),
                    "tokens_per_step": common.median([r["sft/tokens"] for r in first]),
                    "loss_first": first[0]["sft/loss"], "loss_last": first[-1]["sft/loss"]}
        rows = [ours_row]
        if peer_runs:
            tokens_per_step = peer_runs[0]["samples_per_step"] * peer_runs[0]["tokens_per_sample"]
            peer_rates = [common.median([tokens_per_step / s for s in p["step_seconds"]]) for p in peer_runs]
            peer_rate = common.median(peer_rates)
            rows.append({"side": peer_runs[0]["peer"], "model": args.model, "precision": peer_dtype,
                         "tokens_per_s": peer_rate, "mfu": 6 * params * peer_rate / peer_peak,
                         "mfu_torch_mm": 6 * params * peer_rate / peer_mm_peak,
                         "step_s": common.median([s for p in peer_runs for s in p["step_seconds"]]),
                         "tokens_per_step": tokens_per_step})
            ours_row["ratio"] = common.paired_ratio(ours_rates, peer_rates)
            ours_row["round_ratios"] = [round(o / p, 3) for o, p in zip(ours_rates, peer_rates)]
    common.emit(common.result_name("sft", args), rows,
                ["side", "model", "precision", "tokens_per_s", "mfu", "mfu_torch_mm", "step_s", "tokens_per_step", "ratio", "round_ratios"],
                {"steps": steps, "warmup": scale.warmup, "batch": scale.sft_batch, "max_length": scale.max_length,
                 "matmul_params": params, "peak_flops": peak, "torch_mm_peak_flops": mm_peak, "overrides": args.overrides, "rounds": args.rounds,
                 "precision": args.precision})


if __name__ == "__main__":
    main()
