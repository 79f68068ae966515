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

# Ray token authentication. Ray 2.60 turns it on for a head it starts, and a node or a driver
# in another mode is refused (InvalidAuthToken), so every script exports one mode, token by
# default, and makes sure a token is at hand: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or
# Ray's default file ~/.ray/auth_token. The token itself is never printed.
ray_auth_token_file() { echo "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"; }
ray_auth() {  # ray_auth head|node: export RAY_AUTH_MODE; on the head, make a token when there is none
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
    case "$RAY_AUTH_MODE" in
        token) ;;
        disabled)
            echo "$(basename "$0"): warning: RAY_AUTH_MODE=disabled: anyone who reaches the cluster's ports" \
                "can run code on it" >&2
            return 0 ;;
        *) die "RAY_AUTH_MODE must be token or disabled, got '$RAY_AUTH_MODE'" ;;
    esac
    [[ -z "${RAY_AUTH_TOKEN:-}" ]] || return 0
    local file; file="$(ray_auth_token_file)"
    [[ ! -s "$file" ]] || return 0
    if [[ "$1" == head ]]; then
        if is_dry; then
            echo "$(basename "$0"): (dry run) here it writes a new Ray auth token to $file (mode 600)" >&2
            return 0
        fi
        mkdir -p "$(dirname "$file")"
        # Whole or not at all: a node that read half a token would be refused for good.
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$file.$$" && mv "$file.$$" "$file") \
            || die "cannot write $file"
        echo "$(basename "$0"): wrote a new Ray auth token to $file (not printed): copy it to the same" \
            "path on every node and where the driver runs, or set RAY_AUTH_TOKEN_PATH to a copy on a" \
            "shared filesystem" >&2
    else
        die "token authentication is on and this machine has no Ray auth token: copy the head's" \
            "~/.ray/auth_token to $file (mode 600), or set RAY_AUTH_TOKEN_PATH to a readable copy"
    fi
}
