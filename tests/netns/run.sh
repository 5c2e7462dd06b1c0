#!/usr/bin/env bash
# Namespace scenario: mDNS discovery between three nodes on a private LAN.
#
# Builds a LAN out of network namespaces: one hub namespace holding a bridge, and three node
# namespaces, each joined to the bridge by a veth pair, addressed from 10.231.0.0/24. Nothing is
# created in, or attached to, the root namespace, and no node ever runs there (mDNS must not
# leave this host). Every round starts `hearth up` in each node namespace with mDNS on and fresh
# data dirs, then measures time-to-discover: how long from launching the nodes until every node
# has been connected to both others. Discovery counts a peer once it appears in the node's
# `hearth status --json` peers list, or once the node logs the connection: each node is its own
# home, nodes of different homes may be refused right after hello, and a poll can miss so short
# a connection. The polled figure includes start-up and the polling delay; the figure from the
# nodes' own log timestamps does not include the polling.
#
# Then one home of three devices: changes must reach the other two within CONVERGE_LIMIT, an
# event targeted at one device must reach it and no other device, and
# a device whose link goes down during writes (long enough for ping to drop it) must catch up
# once the link returns, and get the emergency alerts raised while it was away: one from a sender
# that stays up, one from a sender killed with SIGKILL right after it accepted the alert and then
# restarted (its outbox is on disk).
#
# Last, synchronised playback: the three devices run again with mDNS off, two of them with their
# clocks set wrong by Debian's libfaketime (preloaded straight into the node, not through the
# `faketime` wrapper, which forks and does not pass signals on), each behind a userspace proxy
# that delays every byte (tests/netns/delay_proxy.py; `tc netem` is not used: the kernels of
# these machines have no sch_netem). The offsets the nodes estimate by probing must match the skews, and each device's
# local start of a playback must be within 5 ms plus its reported uncertainty of the ideal.
#
# Usage (as root):  tests/netns/run.sh
# Environment:
#   ROUNDS=20              start-up and discovery rounds; every one must succeed
#   DISCOVER_TIMEOUT=30    seconds a round may take to discover before it fails
#   HEARTH_BIN=PATH        binary to run (default: $CARGO_TARGET_DIR or target, /debug/hearth;
#                          built with `cargo build` when absent)
#   KEEP_LOGS=1            keep the work dir (logs, data dirs) instead of deleting it
# Exits non-zero on any failure, after removing every namespace it created.
set -euo pipefail

ROUNDS=${ROUNDS:-20}
DISCOVER_TIMEOUT=${DISCOVER_TIMEOUT:-30}
NODES=3
# How long a node may take to answer its first status after launch.
READY_TIMEOUT=30
# How long a node may take to exit after SIGTERM before it counts as hung.
STOP_TIMEOUT=10
# The nodes' log filter; hearth-net's info lines are what connections are read from.
NODE_LOG="info,hearth_net=info"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${HEARTH_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/hearth}

die() {
    printf 'netns: FAIL: %s\n' "$*" >&2
    exit 1
}
log() { printf 'netns: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it creates network namespaces)"
for tool in ip jq awk sort /usr/bin/python3; do
    command -v "$tool" >/dev/null || die "needs '$tool' on PATH"
done
# libfaketime, preloaded into the playback scenario's skewed nodes (Debian's libfaketime).
libfaketime=$(dpkg -L libfaketime 2>/dev/null | grep '/libfaketime\.so\.1$' | head -n 1 || true)
if [ -z "$libfaketime" ]; then
    for candidate in /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1; do
        [ -f "$candidate" ] && { libfaketime=$candidate; break; }
    done
fi
[ -f "$libfaketime" ] || die "needs libfaketime.so.1 (Debian package libfaketime)"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
[[ $DISCOVER_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "DISCOVER_TIMEOUT must be a positive integer"

if [ ! -x "$bin" ]; then
    log "building $bin"
    (cd "$repo" && cargo build --bin hearth) || die "cargo build failed"
    [ -x "$bin" ] || die "cargo build did not produce $bin; set HEARTH_BIN"
fi

# Names carry the PID so concurrent runs, or leftovers of a killed run, never collide.
tag="hn$$"
hub="$tag-hub"
ns=()
for i in $(seq 1 "$NODES"); do ns+=("$tag-n$i"); done
work=$(mktemp -d "${TMPDIR:-/tmp}/hearth-netns.XXXXXX")
pids=()
# The playback scenario's delay proxies.
proxy_pids=()

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${pids[@]}" "${proxy_pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}" "${proxy_pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    # Deleting a namespace removes the veth ends and the bridge inside it.
    for name in "${ns[@]}" "$hub"; do
        ip netns del "$name" 2>/dev/null || true
    done
    if [ "${KEEP_LOGS:-0}" = 1 ]; then
        log "kept $work"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
# A signal ends the run through cleanup too, so no node or proxy outlives it.
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the LAN ------------------------------------------------------------------------------
ip netns add "$hub"
ip -n "$hub" link set lo up
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 up
for i in $(seq 1 "$NODES"); do
    name=${ns[$((i - 1))]}
    ip netns add "$name"
    ip -n "$name" link set lo up
    # Created inside the hub namespace with its peer end placed straight into the node's,
    # so neither end ever exists in the root namespace.
    ip -n "$hub" link add "p$i" type veth peer name eth0 netns "$name"
    ip -n "$hub" link set "p$i" master br0 up
    ip -n "$name" addr add "10.231.0.$((10 + i))/24" dev eth0
    ip -n "$name" link set eth0 up
    # mDNS sends to 224.0.0.251; with no default route the kernel needs this one.
    ip -n "$name" route add 224.0.0.0/4 dev eth0
done
log "LAN up: bridge in $hub, nodes in ${ns[*]} on 10.231.0.0/24"

# Seconds since the epoch with milliseconds.
now() { date +%s.%N | awk '{ printf "%.3f", $1 }'; }

# status NS DIR: the node's status as JSON, or nothing if it does not answer.
status() {
    timeout 5 ip netns exec "$1" "$bin" status --json --data "$2" 2>/dev/null || true
}

# connections LOG: "PEER TIMESTAMP" for each connection the node logged. The log mixes
# tracing's JSON lines with the plain start-up banner on stdout, so only JSON goes to jq.
connections() {
    grep '^{' "$1" 2>/dev/null |
        jq -r 'select(.fields.message == "peer connected"
                      and (.target | startswith("hearth_net::event_loop")))
               | "\(.fields.peer) \(.timestamp)"' 2>/dev/null || true
}

# first_connected LOG...: epoch seconds of the latest among each node's first connection to
# each peer, i.e. when the last pair connected, to the microsecond of the node's own clock.
first_connected() {
    local log latest=""
    for log in "$@"; do
        connections "$log" | sort -k1,1 -k2,2 | awk '!seen[$1]++ { print $2 }'
    done | sort | tail -n 1 | while read -r latest; do date -d "$latest" +%s.%N; done
}

stop_nodes() {
    local pid deadline hung=0
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        deadline=$((SECONDS + STOP_TIMEOUT))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            hung=1
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    pids=()
    return "$hung"
}

# ---- rounds -------------------------------------------------------------------------------
times=()
failures=0
for round in $(seq 1 "$ROUNDS"); do
    dir="$work/round-$round"
    mkdir -p "$dir"
    start=$(now)
    for i in $(seq 1 "$NODES"); do
        data="$dir/node-$i"
        mkdir -p "$data"
        # The log is read for connections, so its level is pinned whatever RUST_LOG says.
        ip netns exec "${ns[$((i - 1))]}" env RUST_LOG="$NODE_LOG" "$bin" up --data "$data" \
            --listen /ip4/0.0.0.0/tcp/0 --api 127.0.0.1:0 --name "node-$i" \
            --log-format json >"$data.log" 2>&1 &
        pids+=("$!")
    done

    # Each node's PeerId, from its first status answer.
    ids=()
    failed=""
    for i in $(seq 1 "$NODES"); do
        data="$dir/node-$i"
        id=""
        deadline=$((SECONDS + READY_TIMEOUT))
        while [ -z "$id" ] && [ "$SECONDS" -lt "$deadline" ]; do
            kill -0 "${pids[$((i - 1))]}" 2>/dev/null || { failed="node-$i exited during start-up"; break; }
            id=$(status "${ns[$((i - 1))]}" "$data" | jq -r '.peer_id // empty' 2>/dev/null || true)
            [ -n "$id" ] || sleep 0.05
        done
        [ -n "$failed" ] && break
        [ -n "$id" ] || { failed="node-$i did not answer status within ${READY_TIMEOUT}s"; break; }
        ids+=("$id")
    done
    ready=$(now)

    # Poll until every node has seen both others, by status or by its log.
    declare -A seen=()
    seen_by_status=0
    deadline=$((SECONDS + DISCOVER_TIMEOUT))
    while [ -z "$failed" ]; do
        missing=0
        for i in $(seq 1 "$NODES"); do
            data="$dir/node-$i"
            listed=$(status "${ns[$((i - 1))]}" "$data" | jq -r '.peers[]?.peer_id' 2>/dev/null || true)
            logged=$(connections "$data.log" | awk '{ print $1 }')
            for j in $(seq 1 "$NODES"); do
                [ "$i" = "$j" ] && continue
                key="$i-$j"
                [ -n "${seen[$key]:-}" ] && continue
                other=${ids[$((j - 1))]}
                if grep -qxF "$other" <<<"$listed"; then
                    seen[$key]=status
                    seen_by_status=$((seen_by_status + 1))
                elif grep -qxF "$other" <<<"$logged"; then
                    seen[$key]=log
                else
                    missing=$((missing + 1))
                fi
            done
        done
        [ "$missing" -eq 0 ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            failed="$missing of $((NODES * (NODES - 1))) node pairs not connected after ${DISCOVER_TIMEOUT}s"
            break
        fi
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || failed="a node exited during discovery"
        done
        sleep 0.05
    done
    done_at=$(now)
    unset seen

    if ! stop_nodes; then
        failed="${failed:+$failed; }a node did not exit within ${STOP_TIMEOUT}s of SIGTERM"
    fi
    if [ -n "$failed" ]; then
        failures=$((failures + 1))
        log "round $round: FAILED: $failed (logs in $dir)"
        # CI shows only this output, so the end of each node's log goes with the failure.
        for i in $(seq 1 "$NODES"); do
            log "--- last lines of node-$i.log"
            tail -n 15 "$dir/node-$i.log" >&2 2>/dev/null || true
        done
        KEEP_LOGS=1
        continue
    fi
    logs=()
    for i in $(seq 1 "$NODES"); do logs+=("$dir/node-$i.log"); done
    connected=$(first_connected "${logs[@]}")
    took=$(awk -v a="$start" -v b="$done_at" 'BEGIN { printf "%.3f", b - a }')
    up=$(awk -v a="$start" -v b="$ready" 'BEGIN { printf "%.3f", b - a }')
    exact=$(awk -v a="$start" -v b="$connected" 'BEGIN { printf "%.3f", b - a }')
    times+=("$took $up $exact")
    log "round $round: all ready after ${up}s, discovered after ${took}s by polling," \
        "${exact}s by the nodes' logs ($seen_by_status of $((NODES * (NODES - 1))) pairs seen" \
        "in status, the rest in logs)"
    rm -rf "$dir"
done

# ---- one home: pairing and convergence -----------------------------------------------------
# Node 1 creates a home; nodes 2 and 3 join it with invite codes (the code carries node 1's
# LAN address), then all three run with mDNS on. A change written on each node in turn must
# reach the other two within CONVERGE_LIMIT seconds.
CONVERGE_LIMIT=${CONVERGE_LIMIT:-2}
CHANGES=${CHANGES:-6}
dir="$work/home"
mkdir -p "$dir"
hearth_in() { # NS ARGS...: run the CLI inside a node namespace
    local name=$1
    shift
    timeout 30 ip netns exec "$name" "$bin" "$@"
}
home_ids=()
start_home_node() { # I [EXTRA UP ARGS...]: start node I (its pid goes to pids[I-1])
    local i=$1 data="$dir/node-$1" id=""
    shift
    # The log is appended to, so a restarted node's first run stays readable.
    ip netns exec "${ns[$((i - 1))]}" env RUST_LOG="$NODE_LOG" "${run_prefix[@]}" "$bin" up \
        --data "$data" --api 127.0.0.1:0 --name "node-$i" --log-format json "$@" \
        >>"$data.log" 2>&1 &
    pids[$((i - 1))]=$!
    local deadline=$((SECONDS + READY_TIMEOUT))
    until [ -n "$id" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "home node-$i did not start (log: $data.log)"
        sleep 0.05
        id=$(status "${ns[$((i - 1))]}" "$data" | jq -r '.peer_id // empty' 2>/dev/null || true)
    done
    # ip netns exec and env exec, so the pid kept is the node's own: stopping it stops the node.
    [ "$(readlink "/proc/${pids[$((i - 1))]}/exe")" = "$(readlink -f "$bin")" ] ||
        die "node-$i's pid ${pids[$((i - 1))]} is not the node's ($(readlink "/proc/${pids[$((i - 1))]}/exe"))"
    home_ids[$((i - 1))]=$id
}
# What runs the node: env with nothing in particular, or with libfaketime's variables.
run_prefix=(env)
home_failed=""
mkdir -p "$dir/node-1"
start_home_node 1 --listen /ip4/0.0.0.0/tcp/0
for i in 2 3; do
    code=$(hearth_in "${ns[0]}" invite --data "$dir/node-1" 2>/dev/null) ||
        { home_failed="invite for node-$i failed"; break; }
    hearth_in "${ns[$((i - 1))]}" join "$code" --data "$dir/node-$i" --name "node-$i" >/dev/null ||
        { home_failed="node-$i could not join"; break; }
    start_home_node "$i" --listen /ip4/0.0.0.0/tcp/0
done
admitted_all() {
    local i
    for i in 1 2 3; do
        n=$(status "${ns[$((i - 1))]}" "$dir/node-$i" | jq '[.peers[]? | select(.admitted)] | length' 2>/dev/null || echo 0)
        [ "${n:-0}" -ge 2 ] || return 1
    done
}
if [ -z "$home_failed" ]; then
    deadline=$((SECONDS + DISCOVER_TIMEOUT))
    until admitted_all; do
        [ "$SECONDS" -lt "$deadline" ] || { home_failed="devices of the home were not admitted within ${DISCOVER_TIMEOUT}s"; break; }
        sleep 0.1
    done
fi
converge_times=()
if [ -z "$home_failed" ]; then
    for k in $(seq 1 "$CHANGES"); do
        src=$(( (k - 1) % 3 + 1 ))
        t0=$(now)
        hearth_in "${ns[$((src - 1))]}" entity set light.netns "v$k" --data "$dir/node-$src" >/dev/null ||
            { home_failed="entity set on node-$src failed"; break; }
        for dst in 1 2 3; do
            [ "$dst" = "$src" ] && continue
            until [ "$(hearth_in "${ns[$((dst - 1))]}" entity get light.netns --json --data "$dir/node-$dst" 2>/dev/null | jq -r '.state // empty')" = "v$k" ]; do
                elapsed=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
                if awk -v e="$elapsed" -v l="$CONVERGE_LIMIT" 'BEGIN { exit !(e > l) }'; then
                    home_failed="change $k from node-$src not on node-$dst after ${CONVERGE_LIMIT}s"
                    break 3
                fi
                sleep 0.02
            done
        done
        converge_times+=("$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')")
    done
fi
# A targeted event: node-1 publishes one for node-2 only. Node-2 must have it (with its
# correlation id) within CONVERGE_LIMIT; node-3 must never see it, nor be sent it: a broadcast
# node-1 publishes after it, on the same stream, reaches node-3, and by then node-3's bus holds
# no trace of the targeted one and its receiver counted nothing dropped (a device drops and
# counts an event that does not name it).
history_in() { # I PATTERN: the bus history of node I, as JSON
    hearth_in "${ns[$(($1 - 1))]}" bus history "$2" --limit 1024 --json --data "$dir/node-$1" 2>/dev/null
}
has_correlation() { # I PATTERN ID
    history_in "$1" "$2" | jq -e --arg c "$3" 'any(.events[]; .correlation_id == $c)' >/dev/null 2>&1
}
wait_correlation() { # I PATTERN ID WHAT
    local t0
    t0=$(now)
    until has_correlation "$1" "$2" "$3"; do
        if awk -v a="$t0" -v b="$(now)" -v l="$CONVERGE_LIMIT" 'BEGIN { exit !(b - a > l) }'; then
            home_failed="$4 not on node-$1 after ${CONVERGE_LIMIT}s"
            return 1
        fi
        sleep 0.02
    done
}
target_event_time=""
if [ -z "$home_failed" ]; then
    t0=$(now)
    sent=$(hearth_in "${ns[0]}" emit coordination.netns_target --to node-2 \
        --payload '{"secret": "for node-2"}' --correlation-id netns-target --json \
        --data "$dir/node-1" 2>/dev/null) || home_failed="emit on node-1 failed"
    if [ -z "$home_failed" ] &&
        ! jq -e '(.sent_to | length) == 1 and .delivered_here == false' \
            <<<"$sent" >/dev/null; then
        home_failed="the targeted event was not sent to exactly one device: $sent"
    fi
    [ -n "$home_failed" ] || wait_correlation 2 'coordination.*' netns-target "the targeted event" || true
    [ -n "$home_failed" ] || target_event_time=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
fi
if [ -z "$home_failed" ]; then
    hearth_in "${ns[0]}" emit coordination.netns_marker --correlation-id netns-marker \
        --data "$dir/node-1" >/dev/null 2>&1 || home_failed="the marker emit on node-1 failed"
    [ -n "$home_failed" ] || wait_correlation 3 'coordination.*' netns-marker "the broadcast marker" || true
fi
if [ -z "$home_failed" ]; then
    for i in 1 3; do
        if has_correlation "$i" '**' netns-target || history_in "$i" '**' | grep -q 'for node-2'; then
            home_failed="node-$i, not a target, has the targeted event"
        fi
    done
    dropped=$(hearth_in "${ns[2]}" bus stats --json --data "$dir/node-3" 2>/dev/null | jq -r '.devices.dropped_malformed')
    [ "$dropped" = 0 ] || home_failed="${home_failed:-node-3 was sent an event not for it (dropped: $dropped)}"
fi
# Partition: node-3 loses its link while node-1 writes, long enough for both sides to notice
# (ping) and drop the connection. When the link returns, node-3 must reconnect and catch up.
PARTITION_WRITES=20
PARTITION_HOLD=6
HEAL_LIMIT=${HEAL_LIMIT:-30}
heal_time=""
if [ -z "$home_failed" ]; then
    ip -n "${ns[2]}" link set eth0 down
    for k in $(seq 1 "$PARTITION_WRITES"); do
        hearth_in "${ns[0]}" entity set "sensor.part_$((k % 10))" "p$k" --data "$dir/node-1" >/dev/null ||
            { home_failed="entity set on node-1 during the partition failed"; break; }
    done
    sleep "$PARTITION_HOLD"
fi
# Alerts for the home while node-3 is away: node-1 raises one and stays up; node-2 raises one and
# is killed with SIGKILL as soon as its API accepted it (the outbox record is stored before the
# answer), then restarted on the same data dir. Node-3 must get both when it returns.
ALERT_TTL=120s
alert_receipt() { # I ID PEER: the state of PEER's receipt on node I's alert ID
    hearth_in "${ns[$(($1 - 1))]}" alerts "$2" --json --data "$dir/node-$1" 2>/dev/null |
        jq -r --arg p "$3" '.receipts[]? | select(.device == $p) | .state' 2>/dev/null || true
}
received_alert() { # I ID: whether node I received alert ID
    hearth_in "${ns[$(($1 - 1))]}" alerts --json --data "$dir/node-$1" 2>/dev/null |
        jq -e --arg id "$2" 'any(.alerts[]; .id == $id and .direction == "received")' >/dev/null 2>&1
}
alert_away="" alert_killed=""
if [ -z "$home_failed" ]; then
    alert_away=$(hearth_in "${ns[0]}" alert "netns: raised while node-3 is away" --ttl "$ALERT_TTL" \
        --json --data "$dir/node-1" 2>/dev/null | jq -r '.id // empty')
    [ -n "$alert_away" ] || home_failed="node-1 could not raise an alert"
fi
if [ -z "$home_failed" ]; then
    alert_killed=$(hearth_in "${ns[1]}" alert "netns: the sender is killed" --ttl "$ALERT_TTL" \
        --severity critical --json --data "$dir/node-2" 2>/dev/null | jq -r '.id // empty')
    kill -KILL "${pids[1]}" 2>/dev/null || true
    wait "${pids[1]}" 2>/dev/null || true
    [ -n "$alert_killed" ] || home_failed="node-2 could not raise an alert"
fi
if [ -z "$home_failed" ]; then
    received_alert 3 "$alert_away" && home_failed="node-3 had an alert while its link was down"
    start_home_node 2 --listen /ip4/0.0.0.0/tcp/0
    state=$(alert_receipt 2 "$alert_killed" "${home_ids[2]}")
    case "$state" in
        pending | delivered) ;;
        *) home_failed="after SIGKILL and restart, node-2's alert shows node-3's receipt as '$state'" ;;
    esac
fi
if [ -z "$home_failed" ]; then
    t0=$(now)
    ip -n "${ns[2]}" link set eth0 up
    # Taking the link down dropped its routes; the multicast one is needed again for mDNS.
    ip -n "${ns[2]}" route replace 224.0.0.0/4 dev eth0
    caught_up() {
        local j want got
        for j in $(seq 0 9); do
            # The last of the writes to sensor.part_j was number 10 + j (20 for j = 0).
            want="p$((j == 0 ? 20 : 10 + j))"
            got=$(hearth_in "${ns[2]}" entity get "sensor.part_$j" --json --data "$dir/node-3" 2>/dev/null | jq -r '.state // empty')
            [ "$got" = "$want" ] || return 1
        done
    }
    until caught_up; do
        elapsed=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
        if awk -v e="$elapsed" -v l="$HEAL_LIMIT" 'BEGIN { exit !(e > l) }'; then
            home_failed="node-3 had not caught up ${HEAL_LIMIT}s after its link returned"
            break
        fi
        sleep 0.1
    done
    [ -n "$home_failed" ] || heal_time=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
fi
# Both alerts reach node-3 and are acknowledged to their senders, within their TTL.
alert_time=""
if [ -z "$home_failed" ]; then
    for want in "1 $alert_away" "2 $alert_killed"; do
        read -r sender id <<<"$want"
        until received_alert 3 "$id" &&
            [ "$(alert_receipt "$sender" "$id" "${home_ids[2]}")" = acknowledged ]; do
            elapsed=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
            if awk -v e="$elapsed" -v l="$HEAL_LIMIT" 'BEGIN { exit !(e > l) }'; then
                home_failed="node-$sender's alert not received and acknowledged by node-3 ${HEAL_LIMIT}s after its link returned (receipt: $(alert_receipt "$sender" "$id" "${home_ids[2]}"))"
                break 2
            fi
            sleep 0.1
        done
    done
    [ -n "$home_failed" ] || alert_time=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
fi
stop_nodes || home_failed="${home_failed:+$home_failed; }a home node did not stop on SIGTERM"
if [ -n "$home_failed" ]; then
    for i in 1 2 3; do
        log "--- last lines of home node-$i.log"
        tail -n 15 "$dir/node-$i.log" >&2 2>/dev/null || true
    done
    KEEP_LOGS=1
    die "one-home scenario: $home_failed (logs in $dir)"
fi
read -r conv_median conv_max <<<"$(printf '%s\n' "${converge_times[@]}" | sort -n | awk '
    { t[NR] = $1 } END { printf "%.3f %.3f", (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2, t[NR] }')"
printf 'netns: one home of 3 devices (paired by invite codes, mDNS on): %d changes, write to visible on both others (CLI polling included): median %ss, max %ss\n' \
    "${#converge_times[@]}" "$conv_median" "$conv_max"

printf 'netns: targeted event from node-1 to node-2 visible on node-2 (CLI polling included) after %ss; node-3 neither saw nor was sent it\n' \
    "$target_event_time"

printf 'netns: partition of node-3 for %s writes (+%ss): caught up on 10 entities %ss after the link returned\n' \
    "$PARTITION_WRITES" "$PARTITION_HOLD" "$heal_time"
printf 'netns: alerts raised while node-3 was away (one by a sender killed with SIGKILL and restarted) received and acknowledged %ss after its link returned\n' \
    "$alert_time"

# ---- synchronised playback: skewed clocks, delayed links -----------------------------------
# Each node listens on its own loopback only, behind a proxy in its namespace that delays
# every byte (PLAYBACK_DELAY_IN ms towards the node, PLAYBACK_DELAY_OUT ms back), so every
# connection between two nodes crosses one proxy. Node-2's clock is 2.5 s fast and node-3's
# 1.7 s slow (libfaketime; the monotonic clock is left alone). Nothing tells a node the skews: the
# offsets must come from its probes.
PLAYBACK_DELAY_IN=${PLAYBACK_DELAY_IN:-15}
PLAYBACK_DELAY_OUT=${PLAYBACK_DELAY_OUT:-5}
PLAYBACK_LIMIT=${PLAYBACK_LIMIT:-30}
skew_ms=(0 2500 -1700)
skew_arg=("" "+2.5" "-1.7")
pb_failed=""
real_ms() { date +%s%3N; }
for i in 1 2 3; do
    ip netns exec "${ns[$((i - 1))]}" /usr/bin/python3 "$repo/tests/netns/delay_proxy.py" \
        "10.231.0.$((10 + i))" 4700 127.0.0.1 "$((4710 + i))" \
        "$PLAYBACK_DELAY_IN" "$PLAYBACK_DELAY_OUT" >"$dir/proxy-$i.log" 2>&1 &
    proxy_pids+=("$!")
done
for i in 1 2 3; do
    deadline=$((SECONDS + READY_TIMEOUT))
    until grep -q ready "$dir/proxy-$i.log" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "the delay proxy of node-$i did not start: $(cat "$dir/proxy-$i.log")"
        sleep 0.05
    done
done
for i in 1 2 3; do
    peers=()
    for j in 1 2 3; do
        [ "$i" = "$j" ] && continue
        peers+=(--peer "/ip4/10.231.0.$((10 + j))/tcp/4700/p2p/${home_ids[$((j - 1))]}")
    done
    if [ -n "${skew_arg[$((i - 1))]}" ]; then
        # LC_ALL=C: libfaketime reads the fraction with the locale's decimal point.
        run_prefix=(env LC_ALL=C LD_PRELOAD="$libfaketime" FAKETIME="${skew_arg[$((i - 1))]}s"
            FAKETIME_DONT_FAKE_MONOTONIC=1)
    else
        run_prefix=(env)
    fi
    start_home_node "$i" --no-mdns --listen "/ip4/127.0.0.1/tcp/$((4710 + i))" "${peers[@]}"
done
run_prefix=(env)
peers_json() { # I: node I's GET /api/peers
    hearth_in "${ns[$(($1 - 1))]}" peers --json --data "$dir/node-$1" 2>/dev/null
}
clocks_ready() { # every node has an estimate of both others from at least 4 probes
    local i
    for i in 1 2 3; do
        peers_json "$i" | jq -e '[.peers[]? | select(.clock.total_samples >= 4)] | length >= 2' \
            >/dev/null 2>&1 || return 1
    done
}
deadline=$((SECONDS + PLAYBACK_LIMIT))
until clocks_ready; do
    [ "$SECONDS" -lt "$deadline" ] || { pb_failed="no clock estimates of both peers on every node after ${PLAYBACK_LIMIT}s"; break; }
    sleep 0.2
done
offsets=()
if [ -z "$pb_failed" ]; then
    for i in 1 2 3; do
        for j in 1 2 3; do
            [ "$i" = "$j" ] && continue
            c=$(peers_json "$i" | jq -c --arg p "${home_ids[$((j - 1))]}" '.peers[] | select(.peer_id == $p) | .clock')
            truth=$((skew_ms[j - 1] - skew_ms[i - 1]))
            # Every byte of a probe and its answer crossed one proxy each way, so the round trip
            # is at least the two delays: proof the probes took the delayed path.
            if ! jq -e --argjson t "$truth" --argjson d "$((PLAYBACK_DELAY_IN + PLAYBACK_DELAY_OUT))" '
                    (.offset_ms - $t | fabs) <= 5 + .uncertainty_ms and .rtt_ms >= $d' <<<"$c" >/dev/null 2>&1; then
                pb_failed="node-$i's estimate of node-$j's clock is $c; the skew is $truth ms"
                break 2
            fi
            offsets+=("$(jq -r --argjson t "$truth" '"\(.offset_ms - $t | fabs | . * 10 | round / 10) ms off (± \(.uncertainty_ms | . * 10 | round / 10), rtt \(.rtt_ms | . * 10 | round / 10))"' <<<"$c")")
        done
    done
fi
# Node-2 starts a playback 3 s ahead by its own (fast) clock. The ideal local start on node I is
# the same real instant on I's clock: start_at - skew(2) + skew(I).
pb_id=""
if [ -z "$pb_failed" ]; then
    start_at=$(($(real_ms) + skew_ms[1] + 3000))
    pb_id=$(hearth_in "${ns[1]}" playback start netns-lullaby --at "$start_at" --json \
        --data "$dir/node-2" 2>/dev/null | jq -r '.id // empty')
    [ -n "$pb_id" ] || pb_failed="node-2 could not start a playback"
fi
if [ -z "$pb_failed" ]; then
    deadline=$((SECONDS + PLAYBACK_LIMIT))
    until shown=$(hearth_in "${ns[1]}" playback show "$pb_id" --json --data "$dir/node-2" 2>/dev/null) &&
        jq -e '(.devices | length) == 3 and all(.devices[]; .state == "scheduled")' <<<"$shown" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || { pb_failed="not every device reported its local start: $shown"; break; }
        sleep 0.1
    done
fi
starts=()
if [ -z "$pb_failed" ]; then
    for i in 1 2 3; do
        ideal=$((start_at - skew_ms[1] + skew_ms[i - 1]))
        d=$(jq -c --arg p "${home_ids[$((i - 1))]}" '.devices[] | select(.device_id == $p)' <<<"$shown")
        if ! jq -e --argjson ideal "$ideal" '(.local_start_at - $ideal | fabs) <= 5 + .uncertainty_ms' \
                <<<"$d" >/dev/null 2>&1; then
            pb_failed="node-$i starts at $(jq -r .local_start_at <<<"$d"), the ideal is $ideal: $d"
            break
        fi
        starts+=("node-$i $(jq -r --argjson ideal "$ideal" '"\(.local_start_at - $ideal) ms from the ideal (± \(.uncertainty_ms | . * 10 | round / 10))"' <<<"$d")")
        # Each device raised coordination.sync_playback with the same local start.
        if ! history_in "$i" 'coordination.*' | jq -e --arg id "$pb_id" --argjson at "$(jq .local_start_at <<<"$d")" '
                any(.events[]; .name == "coordination.sync_playback" and .subject == $id
                    and .data.local_start_at == $at)' >/dev/null 2>&1; then
            pb_failed="node-$i did not raise coordination.sync_playback with its local start"
            break
        fi
    done
fi
stop_nodes || pb_failed="${pb_failed:+$pb_failed; }a node did not stop on SIGTERM"
for pid in "${proxy_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done
proxy_pids=()
if [ -n "$pb_failed" ]; then
    for i in 1 2 3; do
        log "--- last lines of node-$i.log"
        tail -n 15 "$dir/node-$i.log" >&2 2>/dev/null || true
    done
    KEEP_LOGS=1
    die "playback scenario: $pb_failed (logs in $dir)"
fi
printf 'netns: clock offsets by probing through %s+%s ms proxies, skews of +2.5 s and -1.7 s: %s\n' \
    "$PLAYBACK_DELAY_IN" "$PLAYBACK_DELAY_OUT" "$(IFS=';'; echo "${offsets[*]}")"
printf 'netns: playback started on node-2 for 3 devices: %s\n' "$(IFS=';'; echo "${starts[*]}")"

# ---- report -------------------------------------------------------------------------------
# stats COLUMN: the median and the max of one column of the per-round times.
stats() {
    printf '%s\n' "${times[@]}" | awk -v c="$1" '{ print $c }' | sort -n | awk '
        { t[NR] = $1 }
        END { printf "%.3f %.3f", (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2, t[NR] }'
}
if [ "${#times[@]}" -gt 0 ]; then
    read -r discover_median discover_max <<<"$(stats 1)"
    read -r ready_median ready_max <<<"$(stats 2)"
    read -r exact_median exact_max <<<"$(stats 3)"
    printf 'netns: %d rounds, %d failed\n' "$ROUNDS" "$failures"
    printf 'netns: time-to-discover, launch to all %d pairs seen connected by polling: median %ss, max %ss\n' \
        "$((NODES * (NODES - 1)))" "$discover_median" "$discover_max"
    printf 'netns: time-to-discover, launch to the last pair'"'"'s connection in the nodes'"'"' logs: median %ss, max %ss\n' \
        "$exact_median" "$exact_max"
    printf 'netns: start-up, launch to all nodes answering status: median %ss, max %ss\n' \
        "$ready_median" "$ready_max"
fi
[ "$failures" -eq 0 ] || die "$failures of $ROUNDS rounds failed"
# Every node was stopped through its own pid: none of this run's is left.
left=$(pgrep -a -f -- "--data $dir/node-" || true)
[ -z "$left" ] || die "nodes left running after the run: $left"
log "ok"
