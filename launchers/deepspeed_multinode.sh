#!/usr/bin/env bash
# deepspeed_multinode.sh - run SFT or RM on several nodes with the DeepSpeed launcher (no Ray).
#
# Usage: launchers/deepspeed_multinode.sh sft|rm [rlhf args...]
#   rlhf args   passed on to `rlhf sft|rm` after the stage config and the strategy preset
#               (more --config files, key=value overrides)
# Runs, from the repository root:
#   deepspeed --hostfile HOSTFILE [--num_gpus N] ... --module rlhf STAGE \
#       --config CONFIG --config STRATEGY [rlhf args...]
# on every host of the hostfile (format: launchers/hostfile.example). Needs passwordless SSH
# between the nodes and the repository + .venv at the same path on all of them. PPO and the
# pipeline run on Ray instead: launchers/slurm_ray.sbatch or launchers/submit.sh.
#
# Environment:
#   HOSTFILE      DeepSpeed hostfile (default launchers/hostfile)
#   NUM_GPUS      GPUs (training processes) per node (default: each host's slots)
#   NUM_NODES     use only the first N hosts of the hostfile (default: all)
#   STRATEGY      strategy preset (default configs/strategy/zero2.yaml; also
#                 configs/strategy/zero3_offload.yaml, configs/strategy/fsdp.yaml)
#   CONFIG        stage config (default configs/STAGE.yaml)
#   MASTER_ADDR   rendezvous host (default: the first host); MASTER_PORT (default 29500)
#   DS_LAUNCHER   multi-node backend of the deepspeed launcher (default pdsh; openmpi, mvapich,
#                 slurm, ...)
#   DRY_RUN       1: print the command (prefixed "+ ") instead of running it; skips file checks
# Relative paths (HOSTFILE, STRATEGY, CONFIG, --config FILE) are read from the repository root.
#
# Example (SFT with ZeRO-3 + CPU offload on the hosts of launchers/hostfile, 8 GPUs each):
#   NUM_GPUS=8 STRATEGY=configs/strategy/zero3_offload.yaml \
#       launchers/deepspeed_multinode.sh sft train.lr=1e-5
set -euo pipefail

# shellcheck source=launchers/_common.sh
source "$(dirname "$0")/_common.sh"
need_uint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive whole number, got '$2'"; }

if [[ $# -lt 1 ]]; then
    echo "deepspeed_multinode.sh: missing the stage (sft or rm)" >&2
    usage 2
fi
STAGE="$1"
shift
case "$STAGE" in
    sft|rm) ;;
    -h|--help) usage 0 ;;
    ppo|pipeline)
        die "$STAGE runs on Ray, not under the deepspeed launcher: use launchers/slurm_ray.sbatch or launchers/submit.sh" ;;
    *) die "unknown stage '$STAGE' (expected sft or rm)" ;;
esac

# Config paths are relative to the repository root, on every node.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HOSTFILE="${HOSTFILE:-launchers/hostfile}"
STRATEGY="${STRATEGY:-configs/strategy/zero2.yaml}"
CONFIG="${CONFIG:-configs/$STAGE.yaml}"

if ! is_dry; then
    [[ -f "$HOSTFILE" ]] || die "no hostfile at '$HOSTFILE': copy launchers/hostfile.example to launchers/hostfile and list your nodes, or set HOSTFILE"
    grep -Eq '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" \
        || die "'$HOSTFILE' lists no host (lines 'HOSTNAME slots=N')"
    [[ -f "$CONFIG" ]] || die "no stage config at '$CONFIG'"
    [[ -f "$STRATEGY" ]] || die "no strategy preset at '$STRATEGY'"
fi

cmd=(deepspeed --hostfile "$HOSTFILE")
if [[ -n "${NUM_GPUS:-}" ]]; then need_uint NUM_GPUS "$NUM_GPUS"; cmd+=(--num_gpus "$NUM_GPUS"); fi
if [[ -n "${NUM_NODES:-}" ]]; then need_uint NUM_NODES "$NUM_NODES"; cmd+=(--num_nodes "$NUM_NODES"); fi
if [[ -n "${MASTER_ADDR:-}" ]]; then cmd+=(--master_addr "$MASTER_ADDR"); fi
if [[ -n "${MASTER_PORT:-}" ]]; then need_uint MASTER_PORT "$MASTER_PORT"; cmd+=(--master_port "$MASTER_PORT"); fi
if [[ -n "${DS_LAUNCHER:-}" ]]; then cmd+=(--launcher "$DS_LAUNCHER"); fi
# `python -m rlhf` drops the --local_rank argument the launcher adds.
cmd+=(--module rlhf "$STAGE" --config "$CONFIG" --config "$STRATEGY" "$@")

if is_dry; then run "${cmd[@]}"; else exec "${cmd[@]}"; fi
