#!/usr/bin/env bash
# Every benchmark, ours and the peers, on the tiny model and on SmolLM2-135M, one after the
# other (never two at once: they would share the cores). Results land in benchmarks/results/;
# benchmarks/report.py prints the summary that BENCHMARKS.md quotes.
#   benchmarks/run_all.sh [tiny] [smollm2]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
models=${*:-tiny smollm2}
bash benchmarks/peers/setup_venvs.sh
$python benchmarks/matmul_peak.py
for model in $models; do
  $python benchmarks/rollout.py --model "$model"
  $python benchmarks/sft.py --model "$model"
  $python benchmarks/sft.py --model "$model" --no-peer --label logits --overrides kernels.fused_lm_loss=false
  $python benchmarks/sft.py --model "$model" --no-peer --label padded --overrides data.padding_free=false
  $python benchmarks/sft.py --model "$model" --no-peer --label packed --overrides data.packing=true
  $python benchmarks/sft.py --model "$model" --no-peer --label grouped --overrides data.padding_free=false data.group_by_length=true
  $python benchmarks/rm.py --model "$model"
  $python benchmarks/rm.py --model "$model" --no-peer --label rows --overrides data.share_prompt=false
  $python benchmarks/ppo.py --model "$model"
  $python benchmarks/ppo.py --model "$model" --no-peer --label generate \
    --overrides rollout.engine=hf rollout.reuse_logprobs=false
  $python benchmarks/grpo.py --model "$model"
  $python benchmarks/dpo.py --model "$model"
  $python benchmarks/dpo.py --model "$model" --no-peer --label rows --overrides data.share_prompt=false
done
$python benchmarks/report.py
