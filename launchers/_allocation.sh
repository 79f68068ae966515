# Shared by slurm_ray.sbatch and submit.sh (sourced, not run): the `resources.*` overrides that
# map a stage onto an allocation. One training worker per GPU, each its own Ray bundle of whole
# GPUs (rlhf/ray/placement.py); on CPU-only nodes the workers per node stay the config's unless
# WORKERS_PER_NODE says otherwise. The callers put the user's arguments after these overrides,
# so a resources.* given by hand wins (the last value of a key is the one used).

# allocation_overrides STAGE NODES GPUS_PER_NODE [WORKERS_PER_NODE]: one override per line.
# GPUS_PER_NODE empty: unknown (gpus_per_worker is left to the config, whose default asks Ray);
# 0: CPU-only nodes. STAGE pipeline: every stage section (sft, rm, dpo, ppo) gets them.
allocation_overrides() {
    local stage="$1" nodes="$2" gpus="$3" workers="${4:-}" per_worker="" section
    [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || { echo "the allocation's node count must be >= 1, got '$nodes'" >&2; return 2; }
    [[ -z "$gpus" || "$gpus" =~ ^[0-9]+$ ]] || { echo "GPUs per node must be a whole number, got '$gpus'" >&2; return 2; }
    [[ -z "$workers" || "$workers" =~ ^[1-9][0-9]*$ ]] \
        || { echo "WORKERS_PER_NODE must be a whole number >= 1, got '$workers'" >&2; return 2; }
    if [[ -n "$gpus" && "$gpus" -gt 0 ]]; then
        workers="${workers:-$gpus}"
        if ((gpus % workers)); then
            echo "the $gpus GPUs of a node do not split evenly over WORKERS_PER_NODE=$workers workers" >&2
            return 2
        fi
        per_worker=$((gpus / workers))
    elif [[ "$gpus" == 0 ]]; then
        per_worker=0
    fi
    local sections=("")
    if [[ "$stage" == pipeline ]]; then sections=(sft. rm. dpo. ppo.); fi
    for section in "${sections[@]}"; do
        echo "${section}resources.num_nodes=$nodes"
        if [[ -n "$workers" ]]; then echo "${section}resources.workers_per_node=$workers"; fi
        if [[ -n "$per_worker" ]]; then echo "${section}resources.gpus_per_worker=$per_worker"; fi
    done
}

# slurm_gpus_per_node: this job's GPUs per node from SLURM's variables, empty when it does not
# say ("8" or "a100:8" in SLURM_GPUS_PER_NODE; SLURM_GPUS_ON_NODE inside a step).
slurm_gpus_per_node() {
    local gpus="${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
    echo "${gpus##*:}"
}
