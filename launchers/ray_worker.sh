#!/usr/bin/env bash
# ray_worker.sh - join this machine to a running Ray cluster as a worker node.
#
# Usage: launchers/ray_worker.sh HEAD_IP:PORT [--block]
#   HEAD_IP:PORT  the address launchers/ray_head.sh printed (RAY_HEAD_IP:RAY_PORT of the head)
#   --block       stay in the foreground until stopped (Ctrl-C / SIGTERM stops Ray); without it
#                 `ray start` returns once the node has joined (leave with `ray stop`).
#
# Environment:
#   RAY_NODE_IP    this node's address on the cluster network (default: Ray picks the address
#                  of the interface that reaches the head)
#   RAY_NUM_CPUS   CPUs this node offers Ray (default: Ray counts them)
#   RAY_NUM_GPUS   GPUs this node offers Ray (default: Ray counts the visible ones)
#   RAY_AUTH_MODE  token (default) or disabled, as on the head; with token this node needs the
#                  head's token: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
#   DRY_RUN        1: print the command (prefixed "+ ") instead of running it
# Usage statistics are never sent (--disable-usage-stats).
#
# Example (second node of a 2-node cluster whose head is 10.0.0.1):
#   RAY_NODE_IP=10.0.0.2 launchers/ray_worker.sh 10.0.0.1:6379
set -euo pipefail

# shellcheck source=launchers/_common.sh
source "$(dirname "$0")/_common.sh"
need_uint() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"; }

ADDRESS=""
BLOCK=0
for arg in "$@"; do
    case "$arg" in
        --block) BLOCK=1 ;;
        -h|--help) usage 0 ;;
        -*) echo "ray_worker.sh: unknown option '$arg'" >&2; usage 2 ;;
        *)
            [[ -z "$ADDRESS" ]] || { echo "ray_worker.sh: one head address only" >&2; usage 2; }
            ADDRESS="$arg"
            ;;
    esac
done
if [[ -z "$ADDRESS" ]]; then
    echo "ray_worker.sh: missing the head address HEAD_IP:PORT" >&2
    usage 2
fi
[[ "$ADDRESS" =~ ^[^:[:space:]]+:[0-9]+$ ]] \
    || die "the head address must look like HEAD_IP:PORT (e.g. 10.0.0.1:6379), got '$ADDRESS'"

ray_auth node
cmd=(ray start --address "$ADDRESS")
if [[ -n "${RAY_NODE_IP:-}" ]]; then cmd+=(--node-ip-address "$RAY_NODE_IP"); fi
cmd+=(--disable-usage-stats)
if [[ -n "${RAY_NUM_CPUS:-}" ]]; then need_uint RAY_NUM_CPUS "$RAY_NUM_CPUS"; cmd+=(--num-cpus "$RAY_NUM_CPUS"); fi
if [[ -n "${RAY_NUM_GPUS:-}" ]]; then need_uint RAY_NUM_GPUS "$RAY_NUM_GPUS"; cmd+=(--num-gpus "$RAY_NUM_GPUS"); fi
if [[ "$BLOCK" == 1 ]]; then cmd+=(--block); fi

if [[ "$BLOCK" == 1 ]]; then
    echo "Joining the Ray cluster at $ADDRESS (foreground; Ctrl-C leaves it)"
    if is_dry; then run "${cmd[@]}"; exit 0; fi
    exec "${cmd[@]}"   # exec: signals reach Ray
fi
run "${cmd[@]}"
if ! is_dry; then echo "Joined the Ray cluster at $ADDRESS (leave it with: ray stop)"; fi
