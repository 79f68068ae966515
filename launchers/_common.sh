# Shared by the launcher scripts (sourced, not run): errors, --help from the calling
# script's header comment, and DRY_RUN=1, which prints each command instead of running it.

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
usage() {  # the caller's header; to stdout for --help, to stderr after a mistake
    local text; text=$(sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0")
    if [[ "${1:-2}" == 0 ]]; then echo "$text"; else echo "$text" >&2; fi
    exit "${1:-2}"
}
is_dry() { [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; }
run() {  # run a command, or with DRY_RUN print it shell-quoted on one line prefixed "+ "
    if is_dry; then
        local a line="+" safe='^[A-Za-z0-9_./:=,@%+-]+$' q="'\\''"
        for a in "$@"; do
            if [[ "$a" =~ $safe ]]; then line+=" $a"; else line+=" '${a//\'/$q}'"; fi
        done
        printf '%s\n' "$line"
    else
        "$@"
    fi
}
