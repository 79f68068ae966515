#!/usr/bin/env bash
# Every benchmark, ours and the peers, on the tiny model and on SmolLM2-135M, one after the
# other (never two at once: they would share the cores). Results land in benchmarks/results/;
# benchmarks/report.py prints the summary that BENCHMARKS.md quotes, per processor.
#   benchmarks/run_all.sh [tiny] [smollm2]
#   PRECISION=bf16 benchmarks/run_all.sh [tiny] [smollm2]
# PRECISION (fp32, the default, or bf16) is both sides' compute in the stage benchmarks (ours
# strategy.mixed_precision=no|bf16, TRL's bf16=False|True); bf16 results are named *_bf16 and
# sit beside the fp32 ones. The rollout benchmark has no precision: it runs in the fp32 set.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
models=${*:-tiny smollm2}
precision=${PRECISION:-fp32}
case $precision in fp32|bf16) ;; *) echo "PRECISION=$precision: fp32 or bf16" >&2; exit 2 ;; esac
p=(--precision "$precision")
bash benchmarks/peers/setup_venvs.sh
$python benchmarks/matmul_peak.py
for model in $models; do
  if [ "$precision" = fp32 ]; then
    $python benchmarks/rollout.py --model "$model"
  fi
  $python benchmarks/sft.py --model "$model" "${p[@]}"
  $python benchmarks/sft.py --model "$model" "${p[@]}" --no-peer --label logits --overrides kernels.fused_lm_loss=false
  $python benchmarks/sft.py --model "$model" "${p[@]}" --no-peer --label padded --overrides data.padding_free=false
  $python benchmarks/sft.py --model "$model" "${p[@]}" --no-peer --label packed --overrides data.packing=true
  $python benchmarks/sft.py --model "$model" "${p[@]}" --no-peer --label grouped --overrides data.padding_free=false data.group_by_length=true
  $python benchmarks/rm.py --model "$model" "${p[@]}"
  $python benchmarks/rm.py --model "$model" "${p[@]}" --no-peer --label rows --overrides data.share_prompt=false
  $python benchmarks/ppo.py --model "$model" "${p[@]}"
  $python benchmarks/ppo.py --model "$model" "${p[@]}" --no-peer --label generate \
    --overrides rollout.engine=hf rollout.reuse_logprobs=false
  $python benchmarks/grpo.py --model "$model" "${p[@]}"
  $python benchmarks/dpo.py --model "$model" "${p[@]}"
  $python benchmarks/dpo.py --model "$model" "${p[@]}" --no-peer --label rows --overrides data.share_prompt=false
done
$python benchmarks/report.py
