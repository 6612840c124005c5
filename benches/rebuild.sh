#!/usr/bin/env bash
# Self-healing on a loopback cluster (issue 10, "Benchmark"): after a backup of SIZE bytes of
# incompressible data to 4 data + 2 parity suppliers, one supplier is killed for good; how long
# until its position is re-hired and every block is back at full redundancy, how many bytes the
# rebuild fetched per byte it placed (ideal: k = 4), and how much traffic the monitor's rounds
# (lists and storage audits) cost per day as a fraction of the data stored.
#
#   bash benches/rebuild.sh [SIZE]          (SIZE defaults to 1G; 256M, 64M, ... for a quick run)
#
# Environment:
#   KEEP=1             keep the temporary directory (homes, node logs, the data, each status)
#   BENCH_TMPDIR=DIR   where the temporary directory goes (default /var/tmp: /tmp may be RAM)
#   BITDUST_BIN=PATH   use this binary instead of building one (`cargo build --release --locked`)
#   HIRE_TIMEOUT=S     seconds to wait for the owner to hire all positions (default 120)
#   BACKUP_TIMEOUT=S   seconds the backup may take (default 3600)
#   REBUILD_TIMEOUT=S  seconds from the loss to full redundancy before giving up (default 3600)
#   AUDIT_WINDOW=S     length of the idle window that measures the monitor's traffic (default 60)
#   AUDIT_INTERVAL=D   the owner's monitor.interval during that window (default 2s)
#   MONITOR_INTERVAL=D the owner's monitor.interval during the rebuild (default 10s)
#   FIRE_AFTER=D       the owner's monitor.fire_after during the rebuild (default 10s)
#
# Prints progress on stderr and the results on stdout. Exits non-zero when a step fails or the
# rebuild does not finish within REBUILD_TIMEOUT.
set -euo pipefail
set -o errtrace

readonly DATA_SHARDS=4
readonly PARITY_SHARDS=2
readonly POSITIONS=$((DATA_SHARDS + PARITY_SHARDS))
# k + m hired and one spare friend to hire in the lost supplier's place.
readonly FRIENDS=$((POSITIONS + 1))
readonly MIB=$((1024 * 1024))
# The default monitor.interval (src/node/config.rs): 600 s, 144 rounds a day.
readonly DEFAULT_INTERVAL_S=600
HIRE_TIMEOUT=${HIRE_TIMEOUT:-120}
BACKUP_TIMEOUT=${BACKUP_TIMEOUT:-3600}
REBUILD_TIMEOUT=${REBUILD_TIMEOUT:-3600}
AUDIT_WINDOW=${AUDIT_WINDOW:-60}
# One audit's bytes on the wire, both ways, for a ~0.9 MB fragment (`cargo bench --bench protocol`).
SLICE_WIRE=${SLICE_WIRE:-1813}
PAIR_WIRE=${PAIR_WIRE:-205}
AUDIT_INTERVAL=${AUDIT_INTERVAL:-2s}
MONITOR_INTERVAL=${MONITOR_INTERVAL:-10s}
FIRE_AFTER=${FIRE_AFTER:-10s}
# The first restore drill runs within a minute of the first backup (drills tick every 60 s);
# the idle window waits for it so that its fetches are not counted as audit traffic.
DRILL_TIMEOUT=150
START_TIMEOUT=30
STOP_TIMEOUT=15
KEEP=${KEEP:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=
NODE_PIDS=()
NODE_HOMES=()

log() { printf '== %s\n' "$*" >&2; }
warn() { printf 'rebuild: warning: %s\n' "$*" >&2; }
die() {
    printf 'rebuild: error: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

trap 'printf "rebuild: failed at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ------------------------------------------------------------------ cleanup (always runs)

# stop_node I [signalled]: SIGTERM to the node started as NODE_PIDS[I] (unless already sent: a
# second signal makes a node exit without its clean stop), SIGKILL past STOP_TIMEOUT; reaped.
stop_node() {
    local i=$1 pid deadline rc=0
    pid=${NODE_PIDS[$i]:-}
    [[ -n $pid ]] || return 0
    [[ ${2:-} == signalled ]] || kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            warn "node $pid ($(basename "${NODE_HOMES[$i]}")) ignored SIGTERM for ${STOP_TIMEOUT}s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    wait "$pid" 2>/dev/null || rc=$?
    ((rc == 0)) || warn "node $(basename "${NODE_HOMES[$i]}") exited with status $rc (log: ${NODE_HOMES[$i]}/node.log)"
    NODE_PIDS[i]=''
}

# Stops our nodes by the pids we started, nothing else (one SIGTERM each, all first, so that
# they stop together).
stop_nodes() {
    local i pid
    for pid in "${NODE_PIDS[@]}"; do
        if [[ -n $pid ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    for i in "${!NODE_PIDS[@]}"; do
        stop_node "$i" signalled
    done
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

mb() { awk -v b="$1" 'BEGIN { if (b == "n/a" || b == "") print "n/a"; else printf "%.1f", b / 1e6 }'; }
now() { date +%s.%N; }
# B - A in seconds with one decimal (A, B from `now`).
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "") print "n/a"; else printf "%.1f", b - a }'; }

# The owner's status as JSON into FILE (false when the node does not answer).
owner_status() { bd "$OWNER" status --json >"$1" 2>/dev/null; }

# N free TCP ports on 127.0.0.1, below the kernel's ephemeral range (so no outgoing connection
# takes one before its node binds it), as the tests do.
free_ports() {
    python3 - "$1" <<'EOF'
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
}

# probe MODE ARGS...: reads the owner's status JSON (files named in ARGS) and prints what MODE
# asks for, one value per line or space-separated (see each mode). Written once to $WORK.
write_probe() {
    cat >"$WORK/probe.py" <<'EOF'
import json, sys

def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}

def positions(s):
    return (s.get("customer") or {}).get("positions") or []

def connected(s, n):
    """The suppliers by position when all n are confirmed, Connected and distinct, else None."""
    p = positions(s)
    ids = [x.get("supplier") for x in p
           if x.get("confirmed") and x.get("contract") == "Connected" and x.get("supplier")]
    return ids if len(p) == n and len(ids) == n and len(set(ids)) == n else None

def fully_redundant(h):
    """Every followed block has all k + m good fragments reachable, and nothing is being rebuilt."""
    by = h.get("by_redundancy") or {}
    r = h.get("rebuild") or {}
    return (int(h.get("blocks") or 0) > 0 and by != {}
            and all(k == str(h.get("m")) for k in by)
            and r.get("in_flight") == 0 and h.get("rebuild_queued") == 0)

def traffic(s):
    return {p.get("node_id"): int(p.get("bytes_in") or 0) + int(p.get("bytes_out") or 0)
            for p in (s.get("network") or {}).get("peers") or []}

def net(s):
    peers = (s.get("network") or {}).get("peers") or []
    return (sum(int(p.get("bytes_in") or 0) for p in peers),
            sum(int(p.get("bytes_out") or 0) for p in peers))

mode, args = sys.argv[1], sys.argv[2:]
if mode == "hired":  # hired FILE N -> exit 0 and the suppliers by position, one a line
    ids = connected(load(args[0]), int(args[1]))
    if ids is None:
        sys.exit(1)
    print("\n".join(ids))
elif mode == "positions":  # positions FILE -> one line per position, for error messages
    for x in positions(load(args[0])):
        print("  position %s: supplier %s, confirmed %s, contract %s" % (
            x.get("position"), x.get("supplier"), x.get("confirmed"), x.get("contract")))
elif mode == "full":  # full FILE -> exit 0 when fully redundant
    sys.exit(0 if fully_redundant(load(args[0]).get("health") or {}) else 1)
elif mode == "drilled":  # drilled FILE -> exit 0 once a restore drill has reported
    s = load(args[0])
    sys.exit(0 if isinstance((s.get("health") or {}).get("last_drill") or s.get("last_drill"), dict) else 1)
elif mode == "audit":  # audit A B SPARE HIRED... -> rounds bytes spare_bytes audits failed total
    a, b = load(args[0]), load(args[1])
    spare, hired = args[2], args[3:]
    ha, hb = a.get("health") or {}, b.get("health") or {}
    ta, tb = traffic(a), traffic(b)
    delta = lambda i: tb.get(i, 0) - ta.get(i, 0)
    audits = sum(int(hb.get(k) or 0) - int(ha.get(k) or 0) for k in ("audits_passed", "audits_failed"))
    print(int(hb.get("rounds") or 0) - int(ha.get("rounds") or 0),
          sum(delta(i) for i in hired), delta(spare), audits,
          int(hb.get("audits_failed") or 0) - int(ha.get("audits_failed") or 0),
          sum(int(hb.get(k) or 0) for k in ("audits_passed", "audits_failed")))
elif mode == "rebuild":  # rebuild FILE VICTIM FIRED0 -> fired replaced full placed ... net_in net_out
    s = load(args[0])
    h = s.get("health") or {}
    r = h.get("rebuild") or {}
    ids = connected(s, len(positions(s)) or 1)
    fired = len(h.get("fired") or []) > int(args[2])
    replaced = ids is not None and args[1] not in ids
    n_in, n_out = net(s)
    print(int(fired), int(replaced), int(fired and replaced and fully_redundant(h)),
          *(int(r.get(k) or 0) for k in ("fragments_placed", "fragments_fetched", "bytes_placed",
                                         "bytes_fetched", "blocks_rebuilt", "blocks_failed")),
          len(h.get("fired") or []), int(h.get("blocks") or 0), n_in, n_out)
elif mode == "drill":  # drill FILE -> files bytes fragments_fetched of the last restore drill
    s = load(args[0])
    d = (s.get("health") or {}).get("last_drill") or s.get("last_drill")
    d = d if isinstance(d, dict) else {}
    print(*(d.get(k, "n/a") for k in ("files", "bytes", "fragments_fetched")))
elif mode == "fired":  # fired FILE -> the number of firings and the last one's reason
    f = (load(args[0]).get("health") or {}).get("fired") or []
    print(len(f), json.dumps(f[-1]) if f else "-")
else:
    sys.exit("unknown mode " + mode)
EOF
}
probe() { python3 "$WORK/probe.py" "$@"; }

# ------------------------------------------------------------------ 0. size and disk

have python3 || die "needs python3 to read JSON"
have numfmt || die "needs numfmt (coreutils)"
SIZE_ARG=${1:-1G}
SIZE=$(numfmt --from=iec "$SIZE_ARG" 2>/dev/null) || die "SIZE '$SIZE_ARG' is not a size (e.g. 1G, 256M, 67108864)"
((SIZE >= MIB)) || die "SIZE must be at least 1M"

# The data once, the suppliers k + m over k (1.5x) padded (up to ~12 %) plus the replacement's
# share once more, 1 GiB of slack for logs and databases.
TMP_PARENT=${BENCH_TMPDIR:-/var/tmp}
[[ -d $TMP_PARENT && -w $TMP_PARENT ]] || die "BENCH_TMPDIR=$TMP_PARENT is not a writable directory"
NEED=$((SIZE + SIZE * 3 * 115 / 200 + SIZE * 3 * 115 / 200 / POSITIONS + 1024 * MIB))
AVAIL=$(df -PB1 "$TMP_PARENT" | awk 'NR == 2 { print $4 }')
((AVAIL >= NEED)) || die "not enough free disk in $TMP_PARENT: $(mb "$AVAIL") MB free, $(mb "$NEED") MB needed; set BENCH_TMPDIR or pick a smaller SIZE"

# ------------------------------------------------------------------ 1. binary

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
BITDUST_VERSION=$("$BIN" --version)
log "$BITDUST_VERSION"

# ------------------------------------------------------------------ 2. the loopback cluster

WORK=$(mktemp -d "$TMP_PARENT/bitdust-rebuild.XXXXXX")
log "working in $WORK"
write_probe

# Each position holds 1/k of the blocks, 1.5x padded and rounded up, plus 256 MiB (the catalog
# and slack); each friend offers more than any one position needs.
SPACE_MIB=$((SIZE * 3 / 2 / DATA_SHARDS / MIB + 256))
DONATE_MIB=$((SIZE * 3 / 2 / MIB + 512))

read -r -a PORTS <<<"$(free_ports $((FRIENDS + 1)))"
((${#PORTS[@]} == FRIENDS + 1)) || die "found only ${#PORTS[@]} free ports between 20000 and 32000"

OWNER="$WORK/owner"
HOMES=("$OWNER")
for ((i = 1; i <= FRIENDS; i++)); do
    HOMES+=("$WORK/friend$i")
done
IDS=()
for i in "${!HOMES[@]}"; do
    home=${HOMES[$i]}
    name=$(basename "$home")
    # The owner donates less than a friend's default ask, so the friends hire no one.
    if ((i == 0)); then donate="64 MiB"; else donate="$DONATE_MIB MiB"; fi
    # `init` prints the new node's id on stdout.
    bd "$home" init --listen "127.0.0.1:${PORTS[$i]}" --name "$name" --donate "$donate" \
        >"$WORK/$name.init.out" 2>"$WORK/$name.init.err" ||
        die "bitdust init $name failed: $(cat "$WORK/$name.init.err")"
    IDS+=("$(tr -d '[:space:]' <"$WORK/$name.init.out")")
done
set_key "$OWNER/config.toml" data_shards "$DATA_SHARDS"
set_key "$OWNER/config.toml" parity_shards "$PARITY_SHARDS"
set_key "$OWNER/config.toml" space_per_supplier "\"$SPACE_MIB MiB\""

OWNER_CARD=$(bd "$OWNER" id)
for ((i = 1; i <= FRIENDS; i++)); do
    home=${HOMES[$i]}
    bd "$home" peer add "$OWNER_CARD" --name owner >/dev/null || die "peer add owner at $(basename "$home") failed"
    bd "$OWNER" peer add "$(bd "$home" id)" --name "$(basename "$home")" >/dev/null ||
        die "peer add $(basename "$home") at the owner failed"
done

# start_node I [VAR=VALUE...]: starts HOMES[I] in a session of its own (a Ctrl-C reaches only this
# script, whose EXIT trap stops the nodes) with the given environment, and waits until it answers
# status. The binary is started directly so that $! is the node's pid (setsid execs in place).
SETSID=()
have setsid && SETSID=(setsid)
start_node() {
    local i=$1 home=${HOMES[$1]} deadline lock_pid
    shift
    env "$@" "${SETSID[@]}" "$BIN" --home "$home" run --log-format json >>"$home/node.log" 2>&1 &
    NODE_PIDS[i]=$!
    NODE_HOMES[i]=$home
    deadline=$((SECONDS + START_TIMEOUT))
    until bd "$home" status --json >/dev/null 2>&1; do
        alive "${NODE_PIDS[$i]}" ||
            die "$(basename "$home") exited at start; its log ends:"$'\n'"$(tail -n 5 "$home/node.log")"
        ((SECONDS < deadline)) || die "$(basename "$home") does not answer status after ${START_TIMEOUT}s (log: $home/node.log)"
        sleep 0.2
    done
    lock_pid=$(tr -dc '0-9' <"$home/node.lock" 2>/dev/null || true)
    [[ $lock_pid == "${NODE_PIDS[$i]}" ]] ||
        die "$(basename "$home"): node.lock names pid '$lock_pid', not the bitdust started as ${NODE_PIDS[$i]}"
}

# wait_hired LABEL: waits until all positions are confirmed and Connected on distinct suppliers;
# sets HIRED (the suppliers by position).
wait_hired() {
    local deadline=$((SECONDS + HIRE_TIMEOUT)) t0=$SECONDS
    # (The probe's output goes through a file: a failing command in a process substitution
    # would set off the ERR trap there.)
    until owner_status "$WORK/status.json" && probe hired "$WORK/status.json" "$POSITIONS" >"$WORK/hired.txt"; do
        if ((SECONDS >= deadline)); then
            printf 'rebuild: error: %s: the owner has not hired all %d positions after %ss:\n' \
                "$1" "$POSITIONS" "$HIRE_TIMEOUT" >&2
            probe positions "$WORK/status.json" >&2
            exit 1
        fi
        alive "${NODE_PIDS[0]}" || die "the owner exited; its log ends:"$'\n'"$(tail -n 5 "$OWNER/node.log")"
        sleep 0.5
    done
    mapfile -t HIRED <"$WORK/hired.txt"
    log "$1: all $POSITIONS positions confirmed after $((SECONDS - t0))s"
}

# wait_until LABEL TIMEOUT MODE: polls the owner's status until `probe MODE` succeeds.
wait_until() {
    local label=$1 timeout=$2 mode=$3 deadline=$((SECONDS + $2))
    until owner_status "$WORK/status.json" && probe "$mode" "$WORK/status.json"; do
        if ((SECONDS >= deadline)); then
            warn "$label: not after ${timeout}s; the owner's health:"
            python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get("health"), indent=1))' \
                "$WORK/status.json" >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

# Phase one (backup and the idle window): fast rounds, no firing.
for i in "${!HOMES[@]}"; do
    if ((i == 0)); then
        start_node 0 "BITDUST_MONITOR__INTERVAL=$AUDIT_INTERVAL"
    else
        start_node "$i"
    fi
done
log "all $((FRIENDS + 1)) nodes running (owner: monitor.interval $AUDIT_INTERVAL)"
wait_hired "start"

# ------------------------------------------------------------------ 3. data and backup

# Incompressible (random) files of 64 MiB at most, so that a restore drill samples whole files.
DATA="$WORK/data"
mkdir -p "$DATA"
log "writing $(mb "$SIZE") MB of random data to $DATA"
left=$SIZE n=0
while ((left > 0)); do
    chunk=$((left < 64 * MIB ? left : 64 * MIB))
    head -c "$chunk" /dev/urandom >"$DATA/$(printf 'part%04d.bin' "$n")"
    left=$((left - chunk))
    n=$((n + 1))
done

log "bitdust backup $DATA --wait --json"
t0=$(now)
rc=0
timeout --foreground -k 30 "$BACKUP_TIMEOUT" "$BIN" --home "$OWNER" backup "$DATA" --wait --json \
    >"$WORK/backup.json" 2>"$WORK/backup.err" || rc=$?
BACKUP_S=$(elapsed "$t0" "$(now)")
((rc == 0)) || die "backup failed (status $rc): $(tail -n 5 "$WORK/backup.err") $(cat "$WORK/backup.json")"
log "backup: ${BACKUP_S}s: $(tr -d '\n' <"$WORK/backup.json" | cut -c1-300)"

wait_until "full redundancy after the backup" 300 full || die "no full redundancy after the backup"
log "full redundancy after the backup"

# ------------------------------------------------------------------ 4. audit traffic, idle

# The bytes the owner holds on its suppliers: their store/<owner id>/ directories.
stored_bytes() {
    local total=0 id i
    for id in "$@"; do
        for i in "${!IDS[@]}"; do
            [[ ${IDS[$i]} == "$id" ]] && total=$((total + $(dir_bytes "${HOMES[$i]}/store/${IDS[0]}")))
        done
    done
    echo "$total"
}
STORED=$(stored_bytes "${HIRED[@]}")
SPARE=
for id in "${IDS[@]:1}"; do
    [[ " ${HIRED[*]} " == *" $id "* ]] || SPARE=$id
done
[[ -n $SPARE ]] || die "no spare friend left after hiring"

log "waiting (at most ${DRILL_TIMEOUT}s) for the first restore drill, so that the idle window holds none"
wait_until "the first restore drill" "$DRILL_TIMEOUT" drilled || warn "no drill reported: the window may hold one"

log "idle window: ${AUDIT_WINDOW}s at monitor.interval $AUDIT_INTERVAL"
owner_status "$WORK/audit-a.json" || die "the owner does not answer status"
sleep "$AUDIT_WINDOW"
owner_status "$WORK/audit-b.json" || die "the owner does not answer status"
read -r DRILL_FILES DRILL_BYTES DRILL_FRAGMENTS < <(probe drill "$WORK/audit-a.json")
read -r A_ROUNDS A_BYTES A_SPARE A_AUDITS A_FAILED A_TOTAL < <(probe audit "$WORK/audit-a.json" "$WORK/audit-b.json" "$SPARE" "${HIRED[@]}")
((A_ROUNDS > 0)) || die "no monitor round in the ${AUDIT_WINDOW}s window"
((A_FAILED == 0)) || warn "$A_FAILED audits failed in the idle window"
# The spare friend gets keep-alives and nothing from the monitor: its traffic is what each
# supplier's session costs anyway, whatever the monitor does.
read -r PER_ROUND PER_ROUND_RAW PER_DAY KEEPALIVE_DAY < <(awk -v r="$A_ROUNDS" -v b="$A_BYTES" \
    -v s="$A_SPARE" -v n="$POSITIONS" -v w="$AUDIT_WINDOW" -v iv="$DEFAULT_INTERVAL_S" 'BEGIN {
        per = (b - n * s) / r; if (per < 0) per = 0
        day = per * 86400 / iv
        printf "%.0f %.0f %.0f %.0f\n", per, b / r, day, n * s / w * 86400 }')
# Each fragment's audits use precomputed challenge/response pairs, AUDIT_PAIRS of them
# (src/data/audit.rs), made when its bytes were in hand; with none left the next audits are slices
# (PROTOCOL.md 8.10: a KiB and its hashes). The window sees slices only once some fragment has had
# AUDIT_PAIRS audits: with fewer audits so far than AUDIT_PAIRS x fragments it holds (almost
# surely) none, and the steady state is computed below by replacing each pair audit's wire cost
# with a slice's (both measured by `cargo bench --bench protocol`: SLICE_WIRE, PAIR_WIRE).
AUDIT_PAIRS=$(sed -n 's/^pub const AUDIT_PAIRS: usize = \([0-9]*\);.*/\1/p' "$ROOT/src/data/audit.rs" 2>/dev/null || true)
[[ -n $AUDIT_PAIRS ]] || {
    AUDIT_PAIRS=8
    warn "AUDIT_PAIRS not found in src/data/audit.rs: assuming $AUDIT_PAIRS"
}
log "idle: $A_ROUNDS rounds, $A_BYTES bytes with the suppliers ($A_SPARE with the spare), $A_AUDITS audits"

# ------------------------------------------------------------------ 5. loss and rebuild

# Phase two: the owner restarts with the rebuild's settings (its peak RSS then covers the rebuild).
log "restarting the owner with monitor.interval $MONITOR_INTERVAL, fire_after $FIRE_AFTER"
stop_node 0
start_node 0 "BITDUST_MONITOR__INTERVAL=$MONITOR_INTERVAL" "BITDUST_MONITOR__FIRE_AFTER=$FIRE_AFTER"
wait_hired "restart"
wait_until "full redundancy after the restart" 300 full || die "no full redundancy after the restart"

owner_status "$WORK/before.json" || die "the owner does not answer status"
read -r FIRED0 _ < <(probe fired "$WORK/before.json")
read -r _ _ _ B_PLACED B_FETCHED B_BYTES_PLACED B_BYTES_FETCHED B_BLOCKS B_FAILED _ BLOCKS B_IN B_OUT \
    < <(probe rebuild "$WORK/before.json" none "$FIRED0")

VICTIM=${HIRED[0]}
for i in "${!IDS[@]}"; do
    [[ ${IDS[$i]} == "$VICTIM" ]] && VICTIM_I=$i
done
VICTIM_STORED=$(dir_bytes "${HOMES[$VICTIM_I]}/store/${IDS[0]}")
log "SIGKILL $(basename "${HOMES[$VICTIM_I]}"), the supplier of position 0 ($(mb "$VICTIM_STORED") MB of the owner's)"
T_LOSS=$(now)
kill -KILL "${NODE_PIDS[$VICTIM_I]}"
wait "${NODE_PIDS[$VICTIM_I]}" 2>/dev/null || true
NODE_PIDS[VICTIM_I]=''

T_FIRE='' T_REHIRED='' T_FULL=''
deadline=$((SECONDS + REBUILD_TIMEOUT))
while :; do
    if owner_status "$WORK/status.json"; then
        read -r FIRED REPLACED FULL PLACED FETCHED BYTES_PLACED BYTES_FETCHED BLOCKS_REBUILT BLOCKS_FAILED \
            _ _ NET_IN NET_OUT < <(probe rebuild "$WORK/status.json" "$VICTIM" "$FIRED0")
        t=$(now)
        if [[ -z $T_FIRE ]] && ((FIRED)); then
            T_FIRE=$t
            log "fired after $(elapsed "$T_LOSS" "$t")s: $(probe fired "$WORK/status.json" | cut -d' ' -f2-)"
        fi
        if [[ -z $T_REHIRED ]] && ((REPLACED)); then
            T_REHIRED=$t
            log "position re-hired after $(elapsed "$T_LOSS" "$t")s"
        fi
        if ((FULL)); then
            T_FULL=$t
            break
        fi
    fi
    alive "${NODE_PIDS[0]}" || die "the owner exited; its log ends:"$'\n'"$(tail -n 5 "$OWNER/node.log")"
    if ((SECONDS >= deadline)); then
        warn "no full redundancy ${REBUILD_TIMEOUT}s after the loss; the owner's health:"
        python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get("health"), indent=1))' \
            "$WORK/status.json" >&2 || true
        exit 1
    fi
    sleep 0.5
done
OWNER_HWM_KB=$(awk '/^VmHWM:/ { print $2 }' "/proc/${NODE_PIDS[0]}/status" 2>/dev/null || echo n/a)
log "full redundancy $(elapsed "$T_LOSS" "$T_FULL")s after the loss"

# ------------------------------------------------------------------ 6. results

mapfile -t NOW_HIRED < <(probe hired "$WORK/status.json" "$POSITIONS")
NEW_STORED=$(stored_bytes "${NOW_HIRED[0]}")
D_PLACED=$((PLACED - B_PLACED))
D_FETCHED=$((FETCHED - B_FETCHED))
D_BYTES_PLACED=$((BYTES_PLACED - B_BYTES_PLACED))
D_BYTES_FETCHED=$((BYTES_FETCHED - B_BYTES_FETCHED))
D_BLOCKS=$((BLOCKS_REBUILT - B_BLOCKS))
D_FAILED=$((BLOCKS_FAILED - B_FAILED))
D_IN=$((NET_IN - B_IN))
D_OUT=$((NET_OUT - B_OUT))
REBUILD_S=$(elapsed "$T_FIRE" "$T_FULL")
div() { awk -v a="$1" -v b="$2" -v f="${3:-%.2f}" 'BEGIN { if (b + 0 <= 0) print "n/a"; else printf f, a / b }'; }
percent() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b + 0 <= 0) print "n/a"; else printf "%.3f %%", 100 * a / b }'; }
ROUNDS_PER_DAY=$((86400 / DEFAULT_INTERVAL_S))
FRAGMENTS=$((BLOCKS * POSITIONS))
# The mean fragment as stored (the rebuild placed a sample of every block's).
FRAGMENT_BYTES=$(div "$D_BYTES_PLACED" "$D_PLACED" "%.0f")
[[ $FRAGMENT_BYTES != n/a ]] || FRAGMENT_BYTES=$(div "$STORED" "$FRAGMENTS" "%.0f")
AUDITS_PER_ROUND=$(div "$A_AUDITS" "$A_ROUNDS" "%.1f")
# Steady state: every audit a slice instead of a pair, on top of the window's lists. The monitor's cursor walks each position's blocks in turn, so no fragment
# has had more than ceil(audits so far / fragments) audits: while that is at most AUDIT_PAIRS, the
# window held challenges only. Otherwise (a small SIZE: fragments run out of pairs in step, and a
# window may or may not hold their whole fetches) the steady state is not computed.
MAX_PER_FRAGMENT=$(((A_TOTAL + FRAGMENTS - 1) / FRAGMENTS))
if ((MAX_PER_FRAGMENT <= AUDIT_PAIRS)); then
    WHOLE_NOTE="none in the window (at most $MAX_PER_FRAGMENT audits of any fragment so far, $AUDIT_PAIRS pairs each)"
    STEADY_DAY=$(awk -v d="$PER_DAY" -v a="$AUDITS_PER_ROUND" -v r="$ROUNDS_PER_DAY" \
        -v sw="$SLICE_WIRE" -v pw="$PAIR_WIRE" 'BEGIN { printf "%.0f", d + a * r * (sw - pw) }')
else
    WHOLE_NOTE="unknown: up to $MAX_PER_FRAGMENT audits of a fragment before the window end (> $AUDIT_PAIRS pairs); use a larger SIZE"
    STEADY_DAY=n/a
fi
# Days before the first fragment runs out of pairs at the default interval.
PAIRS_LAST_DAYS=$(awk -v p="$AUDIT_PAIRS" -v n="$FRAGMENTS" -v a="$AUDITS_PER_ROUND" -v r="$ROUNDS_PER_DAY" \
    'BEGIN { if (a <= 0) print "n/a"; else printf "%.1f", p * n / (a * r) }')
OWNER_RSS_MB=$(awk -v k="$OWNER_HWM_KB" 'BEGIN { if (k == "n/a") print k; else printf "%.1f", k * 1024 / 1e6 }')

echo
echo "rebuild after the loss of one supplier: $(mb "$SIZE") MB of random data (MB = 10^6 bytes)"
echo "  $BITDUST_VERSION, owner + $FRIENDS loopback friends ($DATA_SHARDS data + $PARITY_SHARDS parity hired, 1 spare), $(nproc) cores"
echo "  owner: monitor.interval $MONITOR_INTERVAL (a tenth while a supplier is unreachable), fire_after $FIRE_AFTER"
echo
row() { printf '%-46s %s\n' "$@"; }
row "data, MB" "$(mb "$SIZE") in $n files, backed up in ${BACKUP_S}s; $BLOCKS blocks followed"
row "stored on the suppliers, MB" "$(mb "$STORED") ($(div "$STORED" "$SIZE") x the data); the lost one held $(mb "$VICTIM_STORED")"
row "time from the loss to firing, s" "$(elapsed "$T_LOSS" "$T_FIRE") (fire_after $FIRE_AFTER)"
row "time from the loss to the re-hire, s" "$(elapsed "$T_LOSS" "$T_REHIRED")"
row "time from firing to full redundancy, s" "$REBUILD_S"
row "time from the loss to full redundancy, s" "$(elapsed "$T_LOSS" "$T_FULL")"
row "blocks rebuilt (failed)" "$D_BLOCKS ($D_FAILED)"
row "fragments placed / fetched" "$D_PLACED / $D_FETCHED: $(div "$D_FETCHED" "$D_PLACED") fetched per placed (ideal k = $DATA_SHARDS)"
row "bytes placed / fetched, MB" "$(mb "$D_BYTES_PLACED") / $(mb "$D_BYTES_FETCHED")"
row "bytes fetched per byte rebuilt" "$(div "$D_BYTES_FETCHED" "$D_BYTES_PLACED") (ideal k = $DATA_SHARDS)"
row "owner's network in / out meanwhile, MB" "$(mb "$D_IN") / $(mb "$D_OUT") (all peers: rebuild, rounds, catalog; framing and Noise included)"
row "the replacement holds, MB" "$(mb "$NEW_STORED")"
row "rebuild throughput, MB/s" "$(div "$D_BYTES_PLACED" "$(awk -v s="$REBUILD_S" 'BEGIN { print s * 1e6 }')" "%.1f") placed, $(div "$D_BYTES_FETCHED" "$(awk -v s="$REBUILD_S" 'BEGIN { print s * 1e6 }')" "%.1f") fetched (from firing to full redundancy)"
row "owner's peak RSS since its restart, MB" "$OWNER_RSS_MB (VmHWM: the rounds and the rebuild)"
echo
echo "monitor traffic, idle: ${AUDIT_WINDOW}s at monitor.interval $AUDIT_INTERVAL, $A_ROUNDS rounds, $A_AUDITS audits ($AUDITS_PER_ROUND a round, all suppliers)"
row "bytes a round, measured" "$PER_ROUND ($PER_ROUND_RAW with keep-alives; the spare's $A_SPARE B in the window taken as a session's keep-alives)"
row "a day at the default interval, as measured" "$(mb "$PER_DAY") MB ($ROUNDS_PER_DAY rounds) = $(percent "$PER_DAY" "$STORED") of the $(mb "$STORED") MB stored"
row "whole-fragment audits (pairs used up)" "$WHOLE_NOTE"
if [[ $STEADY_DAY == n/a ]]; then
    row "steady state, a day (slices, pairs used up)" "n/a (see the line above)"
else
    row "steady state, a day (slices, pairs used up)" "$(mb "$STEADY_DAY") MB = $(percent "$STEADY_DAY" "$STORED") of the data stored (mean fragment $(mb "$FRAGMENT_BYTES") MB; from ~$PAIRS_LAST_DAYS days on at the defaults)"
fi
DRILL_FETCHED=n/a
[[ $DRILL_FRAGMENTS == n/a ]] || DRILL_FETCHED=$(awk -v n="$DRILL_FRAGMENTS" -v f="$FRAGMENT_BYTES" 'BEGIN { printf "%.0f", n * f }')
row "restore drill (monitor.drill_interval, 1 day)" "$DRILL_FILES files, $(mb "$DRILL_BYTES") MB checked: $DRILL_FRAGMENTS fragments, ~$(mb "$DRILL_FETCHED") MB fetched = $(percent "$DRILL_FETCHED" "$STORED") of the data stored (not in the window)"
row "keep-alives, a day, all suppliers" "$(mb "$KEEPALIVE_DAY") MB (whatever the monitor does)"
echo
