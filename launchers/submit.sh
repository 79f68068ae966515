#!/usr/bin/env bash
# submit.sh - submit an rlhf stage to a running Ray cluster as a Ray job (`ray job submit`).
#
# Usage: launchers/submit.sh STAGE [rlhf args...]
#   STAGE          sft | rm | ppo | pipeline
#   rlhf args      passed on to `rlhf STAGE` (--config FILE, key=value overrides, ...)
# The repository (this script's parent folder) is uploaded as the job's working directory,
# leaving out .venv, runs, data, wandb (top-level folders), .git and *.safetensors; the job runs
#   rlhf STAGE [rlhf args...] [ray.enabled=true] ray.address=auto
# on the head node (ray.enabled=true is added for sft, rm and ppo so that they train as Ray
# actors on the cluster rather than inside the job's driver process).
# Relative paths in the rlhf args are read from the repository root (the job's working dir).
# The cluster needs the dashboard (launchers/ray_head.sh with RAY_DASHBOARD=1), and the head's
# environment must have rlhf installed (the same Python environment on every node).
#
# Environment:
#   RAY_JOB_ADDRESS   the cluster's dashboard / Job API (default http://127.0.0.1:8265; from
#                     another machine, tunnel it: ssh -L 8265:127.0.0.1:8265 HEAD)
#   RAY_JOB_ID        submission id to give the job (default: Ray makes one)
#   RAY_JOB_NO_WAIT   1: return once submitted instead of following the job's logs
#   RLHF_CMD          the command that runs rlhf on the cluster (default rlhf)
#   RAY_AUTH_MODE     token (default) or disabled, as on the head; with token the head's token
#                     must be here: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
#   DRY_RUN           1: print the command (prefixed "+ ") instead of running it
#
# Example (PPO on 2 nodes x 8 GPUs, ZeRO-2):
#   launchers/submit.sh ppo --config configs/ppo.yaml --config configs/strategy/zero2.yaml \
#       resources.num_nodes=2 resources.workers_per_node=8 resources.gpus_per_worker=1
set -euo pipefail

STAGES="sft rm ppo pipeline"

# shellcheck source=launchers/_common.sh
source "$(dirname "$0")/_common.sh"

if [[ $# -lt 1 ]]; then
    echo "submit.sh: missing STAGE (one of: $STAGES)" >&2
    usage 2
fi
STAGE="$1"
shift
case "$STAGE" in
    sft|rm|ppo|pipeline) ;;
    -h|--help) usage 0 ;;
    *) echo "submit.sh: error: unknown stage '$STAGE' (expected one of: $STAGES)" >&2; exit 2 ;;
esac

# Upload the repository, whatever the caller's current directory.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# gitignore-style patterns relative to the working directory. The folders are anchored with a
# leading "/": a bare "data" would also drop the rlhf/data package.
EXCLUDES='["/.venv", "/runs", "/data", "/wandb", ".git", "*.safetensors"]'
RUNTIME_ENV="{\"excludes\": $EXCLUDES}"

read -r -a RLHF <<< "${RLHF_CMD:-rlhf}"
[[ ${#RLHF[@]} -gt 0 ]] || { echo "submit.sh: error: RLHF_CMD is empty" >&2; exit 2; }
entrypoint=("${RLHF[@]}" "$STAGE" "$@")
if [[ "$STAGE" != pipeline ]]; then entrypoint+=(ray.enabled=true); fi
entrypoint+=(ray.address=auto)

ray_auth node   # the Job API checks the cluster's token too
cmd=(ray job submit --address "${RAY_JOB_ADDRESS:-http://127.0.0.1:8265}"
     --working-dir . --runtime-env-json "$RUNTIME_ENV")
if [[ -n "${RAY_JOB_ID:-}" ]]; then cmd+=(--submission-id "$RAY_JOB_ID"); fi
if [[ -n "${RAY_JOB_NO_WAIT:-}" && "${RAY_JOB_NO_WAIT}" != 0 ]]; then cmd+=(--no-wait); fi

if is_dry; then run "${cmd[@]}" -- "${entrypoint[@]}"; else exec "${cmd[@]}" -- "${entrypoint[@]}"; fi
