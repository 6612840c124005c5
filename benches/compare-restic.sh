#!/usr/bin/env bash
# bitdust against restic on one real tree, in one run on this machine (issue 8, "Benchmark"):
# a first backup to a loopback cluster of 1 owner + 6 suppliers (4 data + 2 parity) beside
# `restic backup` to a local repository, then an unchanged second backup of each, the bytes each
# stores, and the owner's peak RSS; then (issue 9, "Benchmark") `bitdust restore` of the tree from
# the cluster beside `restic restore latest`, each into an empty directory, the bytes bitdust
# fetched per byte restored, and a check that the bitdust restore matches the tree.
#
#   bash benches/compare-restic.sh [TREE]          (TREE defaults to /usr/share)
#
# Environment:
#   KEEP=1            keep the temporary directory (homes, node logs, restic repository)
#   BENCH_TMPDIR=DIR  where the temporary directory goes (default /var/tmp: /tmp may be RAM)
#   BITDUST_BIN=PATH  use this binary instead of building one (`cargo build --release --locked`)
#   HIRE_TIMEOUT=S    seconds to wait for the owner to hire all positions (default 120)
#   BACKUP_TIMEOUT=S  seconds any one backup or restore may take (default 3600)
#   WARM=0            do not read the tree once before the first backups (see below)
#   DROP_CACHES=auto  before each restore: drop the page cache when root (1: insist, 0: never)
#
# Prints progress on stderr and the results table on stdout. Exits non-zero when a step fails
# (a bitdust build without the `backup` command is not a failure: the restic half still runs), and
# when the bitdust restore is not complete or differs from the tree.
set -euo pipefail
set -o errtrace

readonly DATA_SHARDS=4
readonly PARITY_SHARDS=2
readonly SUPPLIERS=6
readonly MIB=$((1024 * 1024))
HIRE_TIMEOUT=${HIRE_TIMEOUT:-120}
BACKUP_TIMEOUT=${BACKUP_TIMEOUT:-3600}
START_TIMEOUT=30
STOP_TIMEOUT=15
KEEP=${KEEP:-0}
WARM=${WARM:-1}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=
NODE_PIDS=()
NODE_HOMES=()
FAILED=0

log() { printf '== %s\n' "$*" >&2; }
warn() { printf 'compare-restic: warning: %s\n' "$*" >&2; }
die() {
    printf 'compare-restic: error: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

trap 'printf "compare-restic: failed at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ------------------------------------------------------------------ cleanup (always runs)

# Stops our nodes (SIGTERM, then SIGKILL past STOP_TIMEOUT) by the pids we started, nothing else.
stop_nodes() {
    local i pid deadline rc
    ((${#NODE_PIDS[@]})) || return 0
    for pid in "${NODE_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    deadline=$((SECONDS + STOP_TIMEOUT))
    for i in "${!NODE_PIDS[@]}"; do
        pid=${NODE_PIDS[$i]}
        while alive "$pid"; do
            if ((SECONDS >= deadline)); then
                warn "node $pid ($(basename "${NODE_HOMES[$i]}")) ignored SIGTERM for ${STOP_TIMEOUT}s: killing it"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
        rc=0
        wait "$pid" 2>/dev/null || rc=$?
        if ((rc != 0)); then
            warn "node $(basename "${NODE_HOMES[$i]}") exited with status $rc (log: ${NODE_HOMES[$i]}/node.log)"
        fi
    done
    NODE_PIDS=()
    log "nodes stopped"
}

cleanup() {
    local rc=$?
    set +e
    trap - ERR
    stop_nodes
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $KEEP == 1 ]]; then
            log "kept $WORK (KEEP=1)"
        else
            rm -rf -- "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ small helpers

# Formats bytes as MB (10^6), or passes "n/a" through.
mb() { awk -v b="$1" 'BEGIN { if (b == "n/a" || b == "") print "n/a"; else printf "%.1f", b / 1e6 }'; }
# MB/s for BYTES over SECONDS.
rate() {
    awk -v b="$1" -v s="$2" 'BEGIN { if (s == "n/a" || s == "" || s <= 0) print "n/a"; else printf "%.1f", b / 1e6 / s }'
}
# A / B with two decimals.
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || a == "" || b == "" || b <= 0) print "n/a"; else printf "%.2f", a / b }'
}
# "ok" when VALUE <= LIMIT, "MISSED" otherwise, "n/a" when unknown.
verdict() {
    awk -v v="$1" -v l="$2" 'BEGIN { if (v == "n/a" || v == "") print "n/a"; else if (v + 0 <= l + 0) print "ok"; else print "MISSED" }'
}

# "key=value key=value ..." from two arrays named KEYS and VALUES; "(failed)" when VALUES is empty.
pairs() {
    local -n keys_=$1 values_=$2
    local i joined=()
    ((${#values_[@]})) || {
        echo "(failed)"
        return 0
    }
    for i in "${!keys_[@]}"; do
        joined+=("${keys_[$i]}=${values_[$i]:-n/a}")
    done
    echo "${joined[*]}"
}

# N free TCP ports on 127.0.0.1, below the kernel's ephemeral range (so no outgoing connection
# takes one before its node binds it), as the tests do.
free_ports() {
    local n=$1
    if have python3; then
        python3 - "$n" <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
start, found = random.randrange(12000), []
for off in range(12000):
    port = 20000 + (start + off) % 12000
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    found.append(port)
    if len(found) == n:
        break
print(" ".join(map(str, found)))
EOF
    else
        local port found=() start=$((RANDOM % 12000)) off
        for ((off = 0; off < 12000 && ${#found[@]} < n; off++)); do
            port=$((20000 + (start + off) % 12000))
            [[ -z $(ss -Htan "sport = :$port" 2>/dev/null) ]] && found+=("$port")
        done
        echo "${found[*]}"
    fi
}

# True when the status JSON on stdin shows N positions, each confirmed and Connected, held by N
# distinct suppliers.
all_hired() {
    local n=$1
    if have python3; then
        python3 -c '
import json, sys
try:
    s = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
p = (s.get("customer") or {}).get("positions") or []
n = int(sys.argv[1])
ok = (len(p) == n
      and all(x.get("confirmed") and x.get("contract") == "Connected" and x.get("supplier") for x in p)
      and len({x["supplier"] for x in p}) == n)
sys.exit(0 if ok else 1)' "$n"
    else
        jq -e --argjson n "$n" '(.customer.positions // []) as $p
            | ($p | length) == $n
              and all($p[]; .confirmed == true and .contract == "Connected" and .supplier != null)
              and ([$p[].supplier] | unique | length) == $n' >/dev/null 2>&1
    fi
}

# One line per position from the status JSON on stdin, for error messages.
positions_summary() {
    if have python3; then
        python3 -c '
import json, sys
try:
    s = json.load(sys.stdin)
except ValueError:
    print("  (status is not JSON)"); sys.exit(0)
for x in (s.get("customer") or {}).get("positions") or []:
    print("  position %s: supplier %s, confirmed %s, contract %s" % tuple(json.dumps(v) for v in (
        x.get("position"), x.get("supplier"), x.get("confirmed"), x.get("contract"))))' || true
    else
        jq -r '.customer.positions[]? | "  position \(.position): supplier \(.supplier), confirmed \(.confirmed), contract \(.contract)"' || true
    fi
}

# Prints the values of KEYS (one per line, "n/a" when absent) from the last JSON object in FILE
# whose keys include the first KEY: the output may carry other lines (progress, warnings) or
# other JSON objects (restic --json prints status lines before its summary).
json_fields() {
    local file=$1
    shift
    if have python3; then
        python3 - "$file" "$@" <<'EOF'
import json, sys
path, keys = sys.argv[1], sys.argv[2:]
try:
    text = open(path, encoding="utf-8", errors="replace").read()
except OSError:
    text = ""
found = None
for line in reversed(text.splitlines()):
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        v = json.loads(line)
    except ValueError:
        continue
    if isinstance(v, dict) and keys[0] in v:
        found = v
        break
if found is None:  # one pretty-printed document
    try:
        v = json.loads(text)
        found = v if isinstance(v, dict) else None
    except ValueError:
        pass
for k in keys:
    v = (found or {}).get(k)
    if v is None or isinstance(v, (dict, list)):
        v = "n/a"
    print(json.dumps(v) if isinstance(v, bool) else v)
EOF
    else
        local obj key
        obj=$(jq -cR --arg k "$1" 'fromjson? | objects | select(has($k))' "$file" 2>/dev/null | tail -n 1)
        [[ -n $obj ]] || obj=$(jq -c 'objects' "$file" 2>/dev/null | tail -n 1) || true
        [[ -n $obj ]] || obj='{}'
        for key in "$@"; do
            jq -r --arg k "$key" '.[$k] // "n/a" | if type == "object" or type == "array" then "n/a" else . end' <<<"$obj"
        done
    fi
}

# run_timed LABEL OUT ERR CMD... runs CMD under BACKUP_TIMEOUT with stdout/stderr to files and
# sets T_SECS (wall seconds) and T_RSS_KB (the command's peak RSS, "n/a" when unknown); returns
# CMD's exit status (124 on time-out).
run_timed() {
    local label=$1 out=$2 err=$3 rc=0 t0 t1 rss_file
    shift 3
    rss_file="$WORK/$label.rusage"
    # --foreground: the command stays in our process group, so Ctrl-C reaches it at once (and
    # then our INT trap stops the nodes); it has no children of its own to time out. The peak
    # RSS that time/wait4 reports covers timeout's reaped children, i.e. the command.
    local bounded=(timeout --foreground -k 30 "$BACKUP_TIMEOUT" "$@")
    t0=$(date +%s%N)
    if [[ -x /usr/bin/time ]]; then
        /usr/bin/time -v -o "$rss_file" "${bounded[@]}" >"$out" 2>"$err" || rc=$?
    elif have python3; then
        # The wrapper: the children's peak RSS as the kernel counted it.
        python3 -c '
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write("Maximum resident set size (kbytes): %d\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc if rc >= 0 else 128 - rc)' "$rss_file" "${bounded[@]}" >"$out" 2>"$err" || rc=$?
    else
        "${bounded[@]}" >"$out" 2>"$err" || rc=$?
    fi
    t1=$(date +%s%N)
    T_SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
    T_RSS_KB=$(awk -F': *' '/Maximum resident set size/ { print $2 }' "$rss_file" 2>/dev/null || true)
    [[ -n $T_RSS_KB ]] || T_RSS_KB=n/a
    if ((rc == 124)); then
        warn "$label: timed out after ${BACKUP_TIMEOUT}s (BACKUP_TIMEOUT)"
    fi
    # Ctrl-C: restic (and time, timeout) catch SIGINT and exit 130 rather than die of it, so
    # bash does not act on the signal itself; stop here (the EXIT trap stops the nodes).
    if ((rc == 130)); then
        warn "$label: interrupted"
        exit 130
    fi
    return "$rc"
}

# ------------------------------------------------------------------ 0. the tree and the disk

TREE=${1:-/usr/share}
[[ -d $TREE && -r $TREE ]] || die "$TREE is not a readable directory"
TREE=$(cd "$TREE" && pwd -P)
have python3 || have jq || die "needs python3 or jq to read JSON"
have timeout || die "needs timeout (coreutils)"

log "measuring $TREE"
read -r TREE_FILES TREE_BYTES < <(find "$TREE" -type f -printf '%s\n' 2>/dev/null |
    awk '{ n++; b += $1 } END { printf "%d %d\n", n, b }')
((TREE_FILES > 0)) || die "$TREE holds no regular files"

# Suppliers hold every block k + m times over k (1.5x), padded (Padmé adds up to ~12%), with no
# credit taken for compression; restic's repository holds up to the tree once; the owner's
# catalog and outbox are small; each of the two restores writes the tree once more. 1 GiB on top
# for logs, databases and slack.
TMP_PARENT=${BENCH_TMPDIR:-/var/tmp}
[[ -d $TMP_PARENT && -w $TMP_PARENT ]] || die "BENCH_TMPDIR=$TMP_PARENT is not a writable directory"
NEED=$((TREE_BYTES * 3 * 115 / 200 + TREE_BYTES + 2 * TREE_BYTES + 1024 * MIB))
AVAIL=$(df -PB1 "$TMP_PARENT" | awk 'NR == 2 { print $4 }')
if ((AVAIL < NEED)); then
    die "not enough free disk in $TMP_PARENT: $(mb "$AVAIL") MB free, $(mb "$NEED") MB needed for a tree of $(mb "$TREE_BYTES") MB (suppliers ~1.7x, restic up to 1x, two restores 2x, 1 GiB slack); set BENCH_TMPDIR or pick a smaller TREE"
fi
log "tree: $(mb "$TREE_BYTES") MB in $TREE_FILES files; disk: $(mb "$AVAIL") MB free, $(mb "$NEED") MB needed"

# ------------------------------------------------------------------ 1. binaries

if [[ -n ${BITDUST_BIN:-} ]]; then
    BIN=$BITDUST_BIN
    log "using BITDUST_BIN=$BIN (no build)"
else
    have cargo || die "cargo not found (or set BITDUST_BIN to a built binary)"
    log "cargo build --release --locked (in $ROOT${CARGO_TARGET_DIR:+, CARGO_TARGET_DIR=$CARGO_TARGET_DIR})"
    (cd "$ROOT" && cargo build --release --locked) >&2 || die "cargo build --release --locked failed"
    target=${CARGO_TARGET_DIR:-target}
    [[ $target == /* ]] || target="$ROOT/$target"
    BIN="$target/release/bitdust"
fi
[[ -x $BIN ]] || die "no bitdust binary at $BIN"

if ! have restic; then
    ((EUID == 0)) || die "restic is not installed: run 'sudo apt-get install -y restic'"
    log "installing restic (apt-get install -y restic)"
    if ! apt-get install -y restic >&2; then
        { apt-get update >&2 && apt-get install -y restic >&2; } || die "apt-get could not install restic"
    fi
fi
BITDUST_VERSION=$("$BIN" --version)
RESTIC_VERSION=$(restic version)
log "$BITDUST_VERSION"
log "$RESTIC_VERSION"

# ------------------------------------------------------------------ 2. the loopback cluster

WORK=$(mktemp -d "$TMP_PARENT/bitdust-bench.XXXXXX")
log "working in $WORK"

# Each position holds 1/k of what is stored; ask for 1.5x that plus 256 MiB (padding, the
# catalog, blocks that do not compress). Each supplier offers the whole tree x 1.5 plus margin,
# so no grant is ever the limit; grants are capped by the disk anyway.
SPACE_MIB=$((TREE_BYTES * 3 / 2 / DATA_SHARDS / MIB + 256))
DONATE_MIB=$((TREE_BYTES * 3 / 2 / MIB + 512))

read -r -a PORTS <<<"$(free_ports $((SUPPLIERS + 1)))"
((${#PORTS[@]} == SUPPLIERS + 1)) || die "found only ${#PORTS[@]} free ports between 20000 and 32000"

OWNER="$WORK/owner"
HOMES=("$OWNER")
for ((i = 1; i <= SUPPLIERS; i++)); do
    HOMES+=("$WORK/supplier$i")
done
for i in "${!HOMES[@]}"; do
    home=${HOMES[$i]}
    name=$(basename "$home")
    if ((i == 0)); then donate="64 MiB"; else donate="$DONATE_MIB MiB"; fi
    bd "$home" init --listen "127.0.0.1:${PORTS[$i]}" --name "$name" --donate "$donate" \
        >"$WORK/$name.init.out" 2>&1 || die "bitdust init $name failed: $(cat "$WORK/$name.init.out")"
done
set_key "$OWNER/config.toml" data_shards "$DATA_SHARDS"
set_key "$OWNER/config.toml" parity_shards "$PARITY_SHARDS"
set_key "$OWNER/config.toml" space_per_supplier "\"$SPACE_MIB MiB\""

# A star: the owner trusts every supplier and each trusts the owner. (Suppliers are customers
# too; with the owner's 64 MiB donation below their default 1 GiB ask, they hire no one.)
OWNER_CARD=$(bd "$OWNER" id)
for ((i = 1; i <= SUPPLIERS; i++)); do
    home=${HOMES[$i]}
    bd "$home" peer add "$OWNER_CARD" --name owner >/dev/null || die "peer add owner at $(basename "$home") failed"
    bd "$OWNER" peer add "$(bd "$home" id)" --name "$(basename "$home")" >/dev/null ||
        die "peer add $(basename "$home") at the owner failed"
done
log "owner asks ${DATA_SHARDS} + ${PARITY_SHARDS} positions of $SPACE_MIB MiB; each supplier donates $DONATE_MIB MiB"

# Each node in a session of its own, so a Ctrl-C reaches only this script, whose EXIT trap then
# stops them (one SIGTERM each, a clean stop) rather than the node seeing SIGINT and then our
# SIGTERM as a second signal. The binary itself is started, not a function, so $! is the
# node's pid (a function would run in a subshell, and SIGTERM would reach only that); setsid
# execs without forking here (a background job is no process group leader), which the
# node.lock check below confirms.
SETSID=()
have setsid && SETSID=(setsid)
for home in "${HOMES[@]}"; do
    "${SETSID[@]}" "$BIN" --home "$home" run --log-format json >"$home/node.log" 2>&1 &
    NODE_PIDS+=("$!")
    NODE_HOMES+=("$home")
done
OWNER_PID=${NODE_PIDS[0]}

deadline=$((SECONDS + START_TIMEOUT))
for i in "${!HOMES[@]}"; do
    home=${HOMES[$i]}
    until bd "$home" status --json >/dev/null 2>&1; do
        alive "${NODE_PIDS[$i]}" ||
            die "$(basename "$home") exited at start; its log ends:"$'\n'"$(tail -n 5 "$home/node.log")"
        ((SECONDS < deadline)) || die "$(basename "$home") does not answer status after ${START_TIMEOUT}s (log: $home/node.log)"
        sleep 0.2
    done
    lock_pid=$(tr -dc '0-9' <"$home/node.lock" 2>/dev/null || true)
    [[ $lock_pid == "${NODE_PIDS[$i]}" ]] ||
        die "$(basename "$home"): node.lock names pid '$lock_pid', not the $(basename "$BIN") started as ${NODE_PIDS[$i]}"
done
log "all $((SUPPLIERS + 1)) nodes running; waiting up to ${HIRE_TIMEOUT}s for the owner to hire every position"

hire_start=$SECONDS
deadline=$((SECONDS + HIRE_TIMEOUT))
until bd "$OWNER" status --json 2>/dev/null | all_hired $((DATA_SHARDS + PARITY_SHARDS)); do
    if ((SECONDS >= deadline)); then
        printf 'compare-restic: error: the owner has not hired all %d positions after %ss:\n' \
            $((DATA_SHARDS + PARITY_SHARDS)) "$HIRE_TIMEOUT" >&2
        bd "$OWNER" status --json 2>/dev/null | positions_summary >&2
        exit 1
    fi
    alive "$OWNER_PID" || die "the owner exited; its log ends:"$'\n'"$(tail -n 5 "$OWNER/node.log")"
    sleep 0.5
done
log "all $((DATA_SHARDS + PARITY_SHARDS)) positions confirmed after $((SECONDS - hire_start))s"

# ------------------------------------------------------------------ 3. the backups

# Both tools read the same tree; read it once first so neither pays for a cold page cache that
# the other then finds warm (dropping caches would need root and touch the whole machine).
if [[ $WARM == 1 ]]; then
    log "reading $TREE once (page cache)"
    find "$TREE" -type f -readable -print0 2>/dev/null | xargs -0 -r cat >/dev/null 2>&1 || true
fi

BD_AVAILABLE=1
if ! "$BIN" backup --help >/dev/null 2>&1; then
    BD_AVAILABLE=0
    printf 'bitdust backup not available in this build: measuring restic only\n' >&2
fi

# `bitdust backup --json` prints one JobResult (src/actors/status.rs); the first key picks it out.
BD_KEYS=(snapshot outcome files bytes bytes_read new_bytes new_blocks seconds catalog_stored)
BD1_S=n/a BD2_S=n/a
BD1=() BD2=()

# bitdust_backup N: the Nth bitdust backup; sets BD<N>_S and BD<N> (the JSON fields).
bitdust_backup() {
    local n=$1 rc=0 fields
    log "bitdust backup #$n of $TREE"
    run_timed "bitdust-$n" "$WORK/bitdust-$n.json" "$WORK/bitdust-$n.err" \
        "$BIN" --home "$OWNER" backup "$TREE" --wait --json || rc=$?
    if ((rc != 0)); then
        # It prints its result before exiting non-zero on an outcome other than committed.
        mapfile -t fields < <(json_fields "$WORK/bitdust-$n.json" outcome error)
        warn "bitdust backup #$n failed (status $rc, outcome ${fields[0]:-n/a}: ${fields[1]:-n/a}); its stderr ends:"
        tail -n 5 "$WORK/bitdust-$n.err" >&2 || true
        FAILED=1
        return 0
    fi
    mapfile -t fields < <(json_fields "$WORK/bitdust-$n.json" "${BD_KEYS[@]}")
    printf -v "BD${n}_S" '%s' "$T_SECS"
    # shellcheck disable=SC2034 # read through pairs' nameref
    if ((n == 1)); then BD1=("${fields[@]}"); elif ((n == 2)); then BD2=("${fields[@]}"); else BD3=("${fields[@]}"); fi
    log "bitdust #$n: ${T_SECS}s; $(pairs BD_KEYS fields)"
}

RESTIC_KEYS=(total_files_processed total_bytes_processed files_new data_added snapshot_id)
R1_S=n/a R2_S=n/a R1_RSS_KB=n/a R2_RSS_KB=n/a
R1=() R2=()

# restic_backup N: the Nth restic backup; sets R<N>_S, R<N>_RSS_KB and R<N> (its summary).
restic_backup() {
    local n=$1 rc=0 fields
    log "restic backup #$n of $TREE"
    run_timed "restic-$n" "$WORK/restic-$n.json" "$WORK/restic-$n.err" \
        restic backup --json "$TREE" || rc=$?
    # 3: some files could not be read; the snapshot exists and the timing stands.
    if ((rc == 3)); then
        warn "restic backup #$n could not read some files (see $WORK/restic-$n.err with KEEP=1)"
    elif ((rc != 0)); then
        warn "restic backup #$n failed (status $rc); its stderr ends:"
        tail -n 5 "$WORK/restic-$n.err" >&2 || true
        FAILED=1
        return 0
    fi
    mapfile -t fields < <(json_fields "$WORK/restic-$n.json" "${RESTIC_KEYS[@]}")
    printf -v "R${n}_S" '%s' "$T_SECS"
    printf -v "R${n}_RSS_KB" '%s' "$T_RSS_KB"
    # shellcheck disable=SC2034 # read through pairs' nameref
    if ((n == 1)); then R1=("${fields[@]}"); elif ((n == 2)); then R2=("${fields[@]}"); else R3=("${fields[@]}"); fi
    log "restic #$n: ${T_SECS}s; $(pairs RESTIC_KEYS fields)"
}

# The password lives only in this process's environment (restic reads it from there).
RESTIC_PASSWORD=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
export RESTIC_PASSWORD
export RESTIC_REPOSITORY="$WORK/restic-repo"
export RESTIC_CACHE_DIR="$WORK/restic-cache"
restic init >"$WORK/restic-init.out" 2>&1 || die "restic init failed: $(tail -n 3 "$WORK/restic-init.out")"
# Version 2 repositories compress (restic >= 0.14 creates them by default); say which it is.
restic cat config >"$WORK/restic-config.json" 2>/dev/null || true
RESTIC_REPO_VERSION=$(json_fields "$WORK/restic-config.json" version)

# First backups, then the unchanged second ones.
if ((BD_AVAILABLE)); then bitdust_backup 1; fi
restic_backup 1
if ((BD_AVAILABLE)); then bitdust_backup 2; fi
restic_backup 2

# CHANGE_PERCENT=N (issue 20): then append 64 bytes to N % of the files (small-files.py --touch,
# the same files for the same seed: this changes TREE) and back up a third time; what the
# suppliers' store/ and the repository grew by, over the bytes of the changed files.
CHANGE_PERCENT=${CHANGE_PERCENT:-0}
BD3_S=n/a R3_S=n/a BD3=() R3=() CHANGED_FILES=n/a CHANGED_BYTES=n/a BD_ADDED=n/a R_ADDED=n/a
suppliers_bytes() {
    local i total=0
    for ((i = 1; i <= SUPPLIERS; i++)); do total=$((total + $(dir_bytes "${HOMES[$i]}/store"))); done
    echo "$total"
}
if ((CHANGE_PERCENT > 0)); then
    sync
    before_bd=$(suppliers_bytes)
    before_r=$(dir_bytes "$RESTIC_REPOSITORY")
    read -r CHANGED_FILES CHANGED_BYTES < <(python3 "$ROOT/benches/small-files.py" --touch "$TREE" "$CHANGE_PERCENT")
    log "changed $CHANGED_FILES files ($(mb "$CHANGED_BYTES") MB) of $TREE"
    if ((BD_AVAILABLE)); then
        bitdust_backup 3
        sync
        BD_ADDED=$(($(suppliers_bytes) - before_bd))
    fi
    restic_backup 3
    R_ADDED=$(($(dir_bytes "$RESTIC_REPOSITORY") - before_r))
fi

# ------------------------------------------------------------------ 4. the restores (issue 9)

# The owner's peak RSS so far (VmHWM only grows): the backups' share of the final figure.
OWNER_HWM_BACKUP_KB=$(awk '/^VmHWM:/ { print $2 }' "/proc/$OWNER_PID/status" 2>/dev/null || true)
[[ -n $OWNER_HWM_BACKUP_KB ]] || OWNER_HWM_BACKUP_KB=n/a

# Fairness: restic reads its repository, bitdust the suppliers' store/ directories, both just
# written and so in the page cache as far as memory allowed. As root (DROP_CACHES=auto, the
# default) the page cache is dropped before each restore, so both read their data from the disk;
# otherwise only `sync` runs, and the table says "as left by the backups". Dropping is a
# machine-wide act (other programs re-read their files), hence DROP_CACHES=0 to skip it.
DROP_CACHES=${DROP_CACHES:-auto}
CACHE_NOTE="as left by the backups (sync only; DROP_CACHES=1 as root drops it)"
can_drop=0
if [[ $DROP_CACHES != 0 ]] && ((EUID == 0)) && [[ -w /proc/sys/vm/drop_caches ]]; then
    can_drop=1
    CACHE_NOTE="dropped before each (sync; echo 3 > /proc/sys/vm/drop_caches)"
elif [[ $DROP_CACHES == 1 ]]; then
    die "DROP_CACHES=1 needs root and a writable /proc/sys/vm/drop_caches"
elif [[ $DROP_CACHES == 0 ]]; then
    CACHE_NOTE="as left by the backups (sync only, DROP_CACHES=0)"
fi

# Flushes the previous step's dirty pages (untimed, so one restore's writeback does not slow
# the next) and drops the page cache when allowed.
settle() {
    sync
    if ((can_drop)); then
        echo 3 >/proc/sys/vm/drop_caches || warn "could not drop the page cache"
    fi
}

# Seconds a `sync` right after a restore takes: bitdust fsyncs every file before renaming it
# into place (a restored file is complete or absent), restic leaves its writes to the kernel.
timed_sync() {
    local t0 t1
    t0=$(date +%s%N)
    sync
    t1=$(date +%s%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'
}

top_names() { find "$1" -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | LC_ALL=C sort; }

# The directory under a restore target that holds the tree: the target itself (bitdust writes
# paths relative to the source), TARGET/<tree's absolute path> (restic) or TARGET/<tree's
# name>; the first whose top-level names are the tree's, else the target.
restored_root() {
    local to=$1 cand want
    want=$(top_names "$TREE")
    for cand in "$to" "$to/${TREE#/}" "$to/$(basename "$TREE")"; do
        if [[ -d $cand && $(top_names "$cand") == "$want" ]]; then
            echo "$cand"
            return 0
        fi
    done
    echo "$to"
}

# verify LABEL TARGET: compares the restored tree with $TREE (contents and symlink targets;
# modes and mtimes are not compared) and prints the number of differences; the list goes to
# $WORK/verify-LABEL.diff.
verify() {
    local label=$1 root rc=0
    root=$(restored_root "$2")
    diff -r --no-dereference -q -- "$TREE" "$root" >"$WORK/verify-$label.diff" 2>&1 || rc=$?
    if ((rc > 1)); then
        warn "$label: diff had trouble (status $rc); see $WORK/verify-$label.diff"
    fi
    wc -l <"$WORK/verify-$label.diff" | tr -d ' '
}

# `bitdust restore --wait --json` prints one RestoreResult (src/actors/status.rs).
BDR_KEYS=(outcome files dirs symlinks bytes seconds fetched_bytes extra_fragments skipped_existing error)
BDR_S=n/a BDR_SYNC_S=n/a BDR_DIFFS=n/a BDR_PER_BYTE=n/a
BDR=()
RR_S=n/a RR_SYNC_S=n/a RR_DIFFS=n/a RR_RSS_KB=n/a

BD_RESTORE=0
if ((BD_AVAILABLE)) && [[ ${BD1[1]:-} == committed ]]; then
    if "$BIN" restore --help >/dev/null 2>&1; then
        BD_RESTORE=1
    else
        printf 'bitdust restore not available in this build: restoring with restic only\n' >&2
    fi
fi

if ((BD_RESTORE)); then
    mkdir -p "$WORK/restore-bitdust"
    settle
    log "bitdust restore --to $WORK/restore-bitdust"
    rc=0
    run_timed "bitdust-restore" "$WORK/bitdust-restore.json" "$WORK/bitdust-restore.err" \
        "$BIN" --home "$OWNER" restore --to "$WORK/restore-bitdust" --wait --json || rc=$?
    BDR_S=$T_SECS
    BDR_SYNC_S=$(awk -v a="$T_SECS" -v b="$(timed_sync)" 'BEGIN { printf "%.3f", a + b }')
    mapfile -t BDR < <(json_fields "$WORK/bitdust-restore.json" "${BDR_KEYS[@]}")
    if ((rc != 0)) || [[ ${BDR[0]:-} != complete ]]; then
        warn "bitdust restore did not complete (status $rc, outcome ${BDR[0]:-n/a}: ${BDR[9]:-n/a}); its stderr ends:"
        tail -n 5 "$WORK/bitdust-restore.err" >&2 || true
        FAILED=1
    fi
    BDR_PER_BYTE=$(awk -v f="${BDR[6]:-n/a}" -v b="${BDR[4]:-n/a}" \
        'BEGIN { if (f == "n/a" || b == "n/a" || b <= 0) print "n/a"; else printf "%.3f", f / b }')
    log "bitdust restore: ${BDR_S}s (${BDR_SYNC_S}s with a final sync); $(pairs BDR_KEYS BDR)"
    log "verifying the bitdust restore against $TREE"
    BDR_DIFFS=$(verify bitdust "$WORK/restore-bitdust")
    if ((BDR_DIFFS != 0)); then
        warn "the bitdust restore differs from $TREE in $BDR_DIFFS places; the first:"
        head -n 10 "$WORK/verify-bitdust.diff" >&2
        FAILED=1
    fi
fi

if [[ $R1_S != n/a ]]; then
    mkdir -p "$WORK/restore-restic"
    settle
    log "restic restore latest --target $WORK/restore-restic"
    rc=0
    run_timed "restic-restore" "$WORK/restic-restore.out" "$WORK/restic-restore.err" \
        restic restore latest --target "$WORK/restore-restic" || rc=$?
    if ((rc != 0)); then
        warn "restic restore failed (status $rc); its stderr ends:"
        tail -n 5 "$WORK/restic-restore.err" >&2 || true
        FAILED=1
    else
        RR_S=$T_SECS
        RR_RSS_KB=$T_RSS_KB
        RR_SYNC_S=$(awk -v a="$T_SECS" -v b="$(timed_sync)" 'BEGIN { printf "%.3f", a + b }')
        log "restic restore: ${RR_S}s (${RR_SYNC_S}s with a final sync)"
        log "verifying the restic restore against $TREE"
        RR_DIFFS=$(verify restic "$WORK/restore-restic")
        # The reference, not the subject: a difference here is reported, not a failure.
        ((RR_DIFFS == 0)) || warn "the restic restore differs from $TREE in $RR_DIFFS places (see $WORK/verify-restic.diff with KEEP=1)"
    fi
fi

# ------------------------------------------------------------------ 5. memory and storage

OWNER_HWM_KB=$(awk '/^VmHWM:/ { print $2 }' "/proc/$OWNER_PID/status" 2>/dev/null || true)
[[ -n $OWNER_HWM_KB ]] || {
    warn "cannot read the owner's VmHWM (did it exit?)"
    OWNER_HWM_KB=n/a
}
STORED=0
PER_SUPPLIER=()
for ((i = 1; i <= SUPPLIERS; i++)); do
    b=$(dir_bytes "${HOMES[$i]}/store")
    PER_SUPPLIER+=("$(mb "$b")")
    STORED=$((STORED + b))
done
REPO_BYTES=$(dir_bytes "$RESTIC_REPOSITORY")
OWNER_DB=$(dir_bytes "$OWNER/db")

kb_to_mb() { awk -v k="$1" 'BEGIN { if (k == "n/a" || k == "") print "n/a"; else printf "%.1f", k * 1024 / 1e6 }'; }
R_RSS_KB=$(awk -v a="$R1_RSS_KB" -v b="$R2_RSS_KB" 'BEGIN { if (a == "n/a") print b; else if (b == "n/a" || a + 0 >= b + 0) print a; else print b }')

# ------------------------------------------------------------------ 6. the table

if ((BD_AVAILABLE)); then
    BD_STORED=$STORED
else
    BD_STORED=n/a
fi
row() { printf '%-32s %12s %12s %10s  %s\n' "$@"; }
OWNER_RSS_MB=$(kb_to_mb "$OWNER_HWM_KB")
FIRST_RATIO=$(ratio "$BD1_S" "$R1_S")
RESTORE_RATIO=$(ratio "$BDR_S" "$RR_S")
KM_RATIO=$(awk -v k=$DATA_SHARDS -v m=$PARITY_SHARDS 'BEGIN { printf "%.2f", (k + m) / k }')
# What fetching exactly k fragments of every block costs per byte of the tree: the suppliers'
# store / (k + m) * k over the tree (compression below 1, padding above).
DATA_ONLY=$(awk -v s="$BD_STORED" -v t="$TREE_BYTES" -v k=$DATA_SHARDS -v m=$PARITY_SHARDS \
    'BEGIN { if (s == "n/a" || t <= 0) print "n/a"; else printf "%.3f", s * k / (k + m) / t }')
SECOND_RATIO=$(ratio "$BD2_S" "$R2_S")

echo
echo "bitdust vs restic on $TREE: $(mb "$TREE_BYTES") MB in $TREE_FILES files (MB = 10^6 bytes)"
echo "  $BITDUST_VERSION, owner + $SUPPLIERS loopback suppliers, $DATA_SHARDS data + $PARITY_SHARDS parity"
echo "  $RESTIC_VERSION, local repository v$RESTIC_REPO_VERSION; both on $(nproc) cores, same run, page cache $([[ $WARM == 1 ]] && echo warm || echo as found)"
echo "  restores into empty directories on the same disk; page cache $CACHE_NOTE"
((BD_AVAILABLE)) || echo "  bitdust backup not available in this build: its columns are n/a"
echo
row "" bitdust restic "bd/restic" target
row "first backup, seconds" "$BD1_S" "$R1_S" "$FIRST_RATIO" "<= 1.00 $(verdict "$FIRST_RATIO" 1.0)"
row "first backup, MB/s" "$(rate "$TREE_BYTES" "$BD1_S")" "$(rate "$TREE_BYTES" "$R1_S")" "" ""
row "second (unchanged), seconds" "$BD2_S" "$R2_S" "$SECOND_RATIO" "<= 1.00 $(verdict "$SECOND_RATIO" 1.0)"
row "second (unchanged), MB/s" "$(rate "$TREE_BYTES" "$BD2_S")" "$(rate "$TREE_BYTES" "$R2_S")" "" ""
if ((CHANGE_PERCENT > 0)); then
    row "re-backup, $CHANGE_PERCENT % changed, s" "$BD3_S" "$R3_S" "$(ratio "$BD3_S" "$R3_S")" \
        "$CHANGED_FILES files of $(mb "$CHANGED_BYTES") MB changed"
    row "re-backup added, MB" "$(mb "$BD_ADDED")" "$(mb "$R_ADDED")" "$(ratio "$BD_ADDED" "$CHANGED_BYTES")" \
        "suppliers' store/ growth over the changed files' bytes (target <= 2 x compressed + constant)"
fi
row "stored, MB" "$(mb "$BD_STORED")" "$(mb "$REPO_BYTES")" "$(ratio "$BD_STORED" "$REPO_BYTES")" \
    "suppliers' store/ in total (k+m)/k = $KM_RATIO vs repository"
row "restore, seconds" "$BDR_S" "$RR_S" "$RESTORE_RATIO" \
    "<= 1.00 $(verdict "$RESTORE_RATIO" 1.0), 2x faster (<= 0.50) $(verdict "$RESTORE_RATIO" 0.5)"
row "restore, MB/s" "$(rate "$TREE_BYTES" "$BDR_S")" "$(rate "$TREE_BYTES" "$RR_S")" "" ""
row "restore + final sync, seconds" "$BDR_SYNC_S" "$RR_SYNC_S" "$(ratio "$BDR_SYNC_S" "$RR_SYNC_S")" \
    "bitdust syncs before it reports complete, restic does not"
row "restore fetched / restored" "$BDR_PER_BYTE" "-" "" \
    "<= (k+m)/k = $KM_RATIO $(verdict "$BDR_PER_BYTE" "$KM_RATIO"); k data fragments alone: $DATA_ONLY"
row "restore differs from tree, paths" "$BDR_DIFFS" "$RR_DIFFS" "" "0 $(verdict "$BDR_DIFFS" 0) (diff -r --no-dereference)"
row "peak RSS, MB" "$OWNER_RSS_MB" "$(kb_to_mb "$R_RSS_KB")" "" \
    "owner after backups + restore < 256 $(verdict "$OWNER_RSS_MB" 256) (backups alone: $(kb_to_mb "$OWNER_HWM_BACKUP_KB"))"
echo
echo "  per supplier, MB: ${PER_SUPPLIER[*]}; owner's db: $(mb "$OWNER_DB") MB"
if ((BD_AVAILABLE)); then
    echo "  bitdust #1: $(pairs BD_KEYS BD1)"
    echo "  bitdust #2: $(pairs BD_KEYS BD2)"
    if ((CHANGE_PERCENT > 0)); then echo "  bitdust #3: $(pairs BD_KEYS BD3)"; fi
fi
echo "  restic #1:  $(pairs RESTIC_KEYS R1)"
echo "  restic #2:  $(pairs RESTIC_KEYS R2)"
if ((CHANGE_PERCENT > 0)); then echo "  restic #3:  $(pairs RESTIC_KEYS R3)"; fi
if ((BD_RESTORE)); then
    echo "  bitdust restore: $(pairs BDR_KEYS BDR)"
fi
echo "  restic restore: peak RSS $(kb_to_mb "$RR_RSS_KB") MB"
echo

if ((FAILED)); then
    die "a backup or restore failed, or the restore differs from the tree (see the warnings above; KEEP=1 keeps $WORK for a look)"
fi
