#!/usr/bin/env bash
# ray_head.sh - start the head node of a Ray cluster for rlhf.
#
# Usage: launchers/ray_head.sh [--block]
#   --block   stay in the foreground until stopped (Ctrl-C / SIGTERM stops Ray); without it
#             `ray start` returns once the head is up and Ray runs on in the background
#             (stop it with `ray stop`).
#
# Environment:
#   RAY_HEAD_IP         address the head binds and advertises. Default 127.0.0.1: only this
#                       machine can join. For a multi-node cluster set this node's IP on the
#                       cluster network (not a public one).
#   RAY_PORT            port of the head (GCS) that workers join (default 6379)
#   RAY_NUM_CPUS        CPUs this node offers Ray (default: Ray counts them)
#   RAY_NUM_GPUS        GPUs this node offers Ray (default: Ray counts the visible ones)
#   RAY_DASHBOARD       1: start the dashboard and its Job API (needed by `ray job submit`
#                       and launchers/submit.sh); default 0 (off)
#   RAY_DASHBOARD_HOST  address the dashboard binds (default 127.0.0.1; reach it through an
#                       SSH tunnel rather than opening it: the Job API runs any command)
#   RAY_DASHBOARD_PORT  dashboard port (default 8265)
#   RAY_AUTH_MODE       token (default) or disabled. With token every node and every driver
#                       needs the cluster's token: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH or
#                       ~/.ray/auth_token; the head writes a new one there when none exists
#                       (never printed): copy it to the other nodes, or share it on a common
#                       filesystem through RAY_AUTH_TOKEN_PATH
#   DRY_RUN             1: print the command (prefixed "+ ") instead of running it
# Usage statistics are never sent (--disable-usage-stats).
#
# Example (head of a 2-node cluster whose cluster-network IP is 10.0.0.1, Job API on):
#   RAY_HEAD_IP=10.0.0.1 RAY_DASHBOARD=1 launchers/ray_head.sh
#   # on the other node:  RAY_NODE_IP=10.0.0.2 launchers/ray_worker.sh 10.0.0.1:6379
#   # on this node:       rlhf pipeline --config configs/pipeline.yaml ray.address=auto
set -euo pipefail

# shellcheck source=launchers/_common.sh
source "$(dirname "$0")/_common.sh"
need_uint() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"; }

BLOCK=0
for arg in "$@"; do
    case "$arg" in
        --block) BLOCK=1 ;;
        -h|--help) usage 0 ;;
        *) echo "ray_head.sh: unknown argument '$arg'" >&2; usage 2 ;;
    esac
done

HEAD_IP="${RAY_HEAD_IP:-127.0.0.1}"
PORT="${RAY_PORT:-6379}"
DASHBOARD="${RAY_DASHBOARD:-0}"
DASHBOARD_HOST="${RAY_DASHBOARD_HOST:-127.0.0.1}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"

[[ -n "$HEAD_IP" && "$HEAD_IP" != *[[:space:]]* ]] || die "RAY_HEAD_IP must be one address, got '$HEAD_IP'"
need_uint RAY_PORT "$PORT"

ray_auth head
cmd=(ray start --head --node-ip-address "$HEAD_IP" --port "$PORT" --disable-usage-stats)
if [[ -n "${RAY_NUM_CPUS:-}" ]]; then need_uint RAY_NUM_CPUS "$RAY_NUM_CPUS"; cmd+=(--num-cpus "$RAY_NUM_CPUS"); fi
if [[ -n "${RAY_NUM_GPUS:-}" ]]; then need_uint RAY_NUM_GPUS "$RAY_NUM_GPUS"; cmd+=(--num-gpus "$RAY_NUM_GPUS"); fi
case "$DASHBOARD" in
    1)
        need_uint RAY_DASHBOARD_PORT "$DASHBOARD_PORT"
        cmd+=(--include-dashboard true --dashboard-host "$DASHBOARD_HOST" --dashboard-port "$DASHBOARD_PORT")
        ;;
    0) cmd+=(--include-dashboard false) ;;
    *) die "RAY_DASHBOARD must be 0 or 1, got '$DASHBOARD'" ;;
esac
if [[ "$BLOCK" == 1 ]]; then cmd+=(--block); fi

if [[ "$HEAD_IP" == 127.* || "$HEAD_IP" == localhost ]]; then
    echo "ray_head.sh: note: bound to $HEAD_IP, so only this machine can join; for a multi-node" \
        "cluster set RAY_HEAD_IP to this node's cluster-network IP" >&2
fi

print_join() {
    echo "Ray head: ${HEAD_IP}:${PORT}"
    echo "  join a worker node:   launchers/ray_worker.sh ${HEAD_IP}:${PORT}"
    echo "  run a stage here:     rlhf pipeline --config configs/pipeline.yaml ray.address=auto"
    if [[ "$DASHBOARD" == 1 ]]; then
        echo "  dashboard / Job API:  http://${DASHBOARD_HOST}:${DASHBOARD_PORT} (RAY_JOB_ADDRESS for launchers/submit.sh)"
    fi
}

if [[ "$BLOCK" == 1 ]]; then
    print_join   # `ray start --block` does not return while Ray runs
    if is_dry; then run "${cmd[@]}"; else exec "${cmd[@]}"; fi   # exec: signals reach Ray
else
    run "${cmd[@]}"
    print_join
fi
