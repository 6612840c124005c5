# Helpers shared by the benchmark scripts (sourced; they set BIN before calling `bd`).
# shellcheck shell=bash

# True while PID runs (an exited child stays a zombie, and kill -0 succeeds, until waited for).
alive() {
    local state
    state=$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true)
    [[ -n $state && $state != Z ]]
}

bd() {
    local home=$1
    shift
    "$BIN" --home "$home" "$@"
}

# Apparent bytes under DIR (0 when it does not exist).
dir_bytes() {
    if [[ -d $1 ]]; then du -sb -- "$1" | awk '{ print $1 }'; else echo 0; fi
}

# Sets KEY = VALUE in a config.toml written by `bitdust init` (each key used here appears once).
set_key() {
    local file=$1 key=$2 value=$3
    sed -i -E "s|^${key} = .*|${key} = ${value}|" "$file"
    grep -qxF "${key} = ${value}" "$file" || die "could not set ${key} in ${file}"
}
