#!/usr/bin/env bash
# Build the two peer venvs the benchmarks compare against, beside the project's own:
#   benchmarks/.venvs/trl      TRL's current release (SFTTrainer, RewardTrainer)
#   benchmarks/.venvs/trl-ppo  TRL 1.12, the last release that ships PPOTrainer (trl.experimental.ppo)
# torch and transformers are pinned to the versions in the project's venv so that only the
# trainer differs between the two sides.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
project_python=${PROJECT_PYTHON:-$root/.venv/bin/python}
base_python=${PYTHON:-python3}
TRL_CURRENT=${TRL_CURRENT:-1.16.0}
TRL_PPO=${TRL_PPO:-1.12.0}

pin() { "$project_python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
transformers_version=$(pin transformers)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
cat "$root/constraints.txt" > "$constraints"
echo "transformers==$transformers_version" >> "$constraints"

make_venv() {  # name trl_version
  local dir="$root/benchmarks/.venvs/$1" stamp="$root/benchmarks/.venvs/$1/.installed-trl-$2"
  [[ -f "$stamp" ]] && { echo "$1: trl $2 already installed"; return; }
  rm -rf "$dir"
  "$base_python" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip
  "$dir/bin/python" -m pip install --quiet -c "$constraints" "torch" "trl==$2" "transformers" accelerate datasets safetensors
  touch "$stamp"
  echo "$1: $("$dir/bin/python" -c 'import trl, transformers, torch; print("trl", trl.__version__, "transformers", transformers.__version__, "torch", torch.__version__)')"
}

make_venv trl "$TRL_CURRENT"
make_venv trl-ppo "$TRL_PPO"
