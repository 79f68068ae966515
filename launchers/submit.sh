#!/usr/bin/env bash
# submit.sh - submit an rlhf stage to a running Ray cluster as a Ray job (`ray job submit`).
#
# Usage: launchers/submit.sh STAGE [rlhf args...]
#   STAGE          sft | rm | ppo | pipeline
#   rlhf args      passed on to `rlhf STAGE` (--config FILE, key=value overrides, ...)
# The repository (this script's parent folder) is uploaded as the job's working directory,
# leaving out .venv, runs, data, wandb (top-level folders), .git and *.safetensors; the job runs
#   rlhf STAGE [resources of the cluster...] [rlhf args...] [ray.enabled=true] ray.address=auto
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
#   NUM_NODES, GPUS_PER_NODE   the allocation the stage runs on, one worker per GPU: it gets
#                     resources.num_nodes, resources.workers_per_node and resources.gpus_per_worker
#                     (every stage section for `pipeline`) before your arguments, so a resources.*
#                     you pass wins. Unset: a SLURM job's own (SLURM_JOB_NUM_NODES and its GPUs per
#                     node) when run inside one, else the cluster's alive nodes and their GPUs as
#                     `ray list nodes` reports them (PYTHON reads its output)
#   WORKERS_PER_NODE  workers per node when not one per GPU; on GPU-less nodes the workers per node
#   FIT_ALLOCATION    0: pass no resources (the config decides)
#   DRY_RUN           1: print the commands (prefixed "+ ") instead of running them (the cluster is
#                     not asked, so give NUM_NODES and GPUS_PER_NODE to see those overrides)
#
# Example (PPO on every GPU of the cluster, ZeRO-2):
#   launchers/submit.sh ppo --config configs/ppo.yaml --config configs/strategy/zero2.yaml
set -euo pipefail

STAGES="sft rm ppo pipeline"

# shellcheck source=launchers/_common.sh
source "$(dirname "$0")/_common.sh"
# shellcheck source=launchers/_allocation.sh
source "$(dirname "$0")/_allocation.sh"

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
ray_auth node   # the Job API (and the query of the cluster's nodes) check the cluster's token too

# The allocation: given, this SLURM job's, or what the cluster reports.
RESOURCES=()
if [[ "${FIT_ALLOCATION:-1}" != 0 ]]; then
    nodes="${NUM_NODES:-}" gpus="${GPUS_PER_NODE:-}"
    if [[ -z "$nodes" && -n "${SLURM_JOB_NUM_NODES:-}" ]]; then
        nodes="$SLURM_JOB_NUM_NODES"
        gpus="${gpus:-$(slurm_gpus_per_node)}"
    fi
    if [[ -z "$nodes" ]]; then
        # "NODES GPUS_PER_NODE" of the alive nodes; nothing (and a warning) when it cannot tell.
        query=(ray list nodes --detail --format json --address "${RAY_JOB_ADDRESS:-http://127.0.0.1:8265}")
        if is_dry; then
            run "${query[@]}"
        else
            read -r nodes gpus < <("${query[@]}" 2>/dev/null | "${PYTHON:-python}" -m rlhf.ray.allocation 2>/dev/null) \
                || true
        fi
        if [[ -z "$nodes" ]] && ! is_dry; then
            echo "submit.sh: warning: could not read the cluster's nodes (ray list nodes): the config's" \
                "resources are used; set NUM_NODES and GPUS_PER_NODE to size the stage" >&2
        fi
    fi
    if [[ -n "$nodes" ]]; then
        overrides="$(allocation_overrides "$STAGE" "$nodes" "$gpus" "${WORKERS_PER_NODE:-}" 2>&1)" \
            || die "$overrides"
        while IFS= read -r line; do
            if [[ -n "$line" ]]; then RESOURCES+=("$line"); fi
        done <<< "$overrides"
    fi
fi

entrypoint=("${RLHF[@]}" "$STAGE" ${RESOURCES[@]+"${RESOURCES[@]}"} "$@")
if [[ "$STAGE" != pipeline ]]; then entrypoint+=(ray.enabled=true); fi
entrypoint+=(ray.address=auto)

cmd=(ray job submit --address "${RAY_JOB_ADDRESS:-http://127.0.0.1:8265}"
     --working-dir . --runtime-env-json "$RUNTIME_ENV")
if [[ -n "${RAY_JOB_ID:-}" ]]; then cmd+=(--submission-id "$RAY_JOB_ID"); fi
if [[ -n "${RAY_JOB_NO_WAIT:-}" && "${RAY_JOB_NO_WAIT}" != 0 ]]; then cmd+=(--no-wait); fi

if is_dry; then run "${cmd[@]}" -- "${entrypoint[@]}"; else exec "${cmd[@]}" -- "${entrypoint[@]}"; fi
