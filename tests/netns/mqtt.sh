#!/usr/bin/env bash
# Namespace scenario: the MQTT bridge against Debian's mosquitto, checked the way Home
# Assistant sees it.
#
# Two network namespaces joined by a veth pair: one runs mosquitto (with a password file,
# no persistence), the other a `hearth up` whose `[mqtt]` section in hearth.toml names the
# broker, a password file, the node id `netns` and an export filter. Nothing is created in
# the root namespace and mDNS stays off. Then, with `mosquitto_sub`:
#   - the exact retained topics and payloads HA expects (discovery configs, states,
#     attributes, availability), and nothing for the entity the filter leaves out;
#   - a command published on a command topic is written (read back with the CLI) and its
#     new state is retained;
#   - mosquitto restarted (its retained messages gone): the bridge reconnects and publishes
#     everything again;
#   - the node killed: the broker publishes its last will, `offline`; started again:
#     `online`; stopped cleanly: `offline`.
#
# Usage (as root):  tests/netns/mqtt.sh
# Environment:
#   HEARTH_BIN=PATH   binary to run (default: $CARGO_TARGET_DIR or target, /debug/hearth)
#   KEEP_LOGS=1       keep the work dir
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${HEARTH_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/hearth}
# How long the bridge may take to (re)publish after the broker or the node (re)starts.
LIMIT=${LIMIT:-45}

die() {
    printf 'netns mqtt: FAIL: %s\n' "$*" >&2
    exit 1
}
log() { printf 'netns mqtt: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it creates network namespaces)"
for tool in ip jq mosquitto mosquitto_sub mosquitto_pub mosquitto_passwd; do
    command -v "$tool" >/dev/null || die "needs '$tool' on PATH (apt-get install mosquitto mosquitto-clients jq iproute2)"
done
[ -x "$bin" ] || (cd "$repo" && cargo build --bin hearth) || die "cargo build failed"

tag="hm$$"
broker_ns="$tag-broker"
node_ns="$tag-node"
work=$(mktemp -d "${TMPDIR:-/tmp}/hearth-mqtt.XXXXXX")
data="$work/node"
broker_pid=""
node_pid=""

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in $node_pid $broker_pid; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    ip netns del "$node_ns" 2>/dev/null || true
    ip netns del "$broker_ns" 2>/dev/null || true
    if [ "$status" -ne 0 ]; then
        log "--- end of the node's log"
        tail -n 30 "$data.log" >&2 2>/dev/null || true
        log "--- end of mosquitto's log"
        tail -n 15 "$work/mosquitto.log" >&2 2>/dev/null || true
    fi
    if [ "${KEEP_LOGS:-0}" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the link and the broker ----------------------------------------------------------------
ip netns add "$broker_ns"
ip netns add "$node_ns"
ip -n "$broker_ns" link set lo up
ip -n "$node_ns" link set lo up
ip -n "$broker_ns" link add eth0 type veth peer name eth0 netns "$node_ns"
ip -n "$broker_ns" addr add 10.232.0.1/24 dev eth0
ip -n "$node_ns" addr add 10.232.0.2/24 dev eth0
ip -n "$broker_ns" link set eth0 up
ip -n "$node_ns" link set eth0 up

broker=10.232.0.1
mosquitto_passwd -b -c "$work/passwd" hearth node-secret >/dev/null 2>&1
mosquitto_passwd -b "$work/passwd" ha ha-secret >/dev/null 2>&1
cat >"$work/mosquitto.conf" <<EOF
listener 1883 $broker
allow_anonymous false
password_file $work/passwd
persistence false
user root
EOF
start_broker() {
    ip netns exec "$broker_ns" mosquitto -c "$work/mosquitto.conf" >>"$work/mosquitto.log" 2>&1 &
    broker_pid=$!
    local deadline=$((SECONDS + 10))
    until ip netns exec "$broker_ns" mosquitto_pub -h "$broker" -u ha -P ha-secret -t probe -n 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "mosquitto did not start"
        sleep 0.1
    done
}
start_broker

# HA's view: every retained message under the two prefixes, one `topic payload` line each,
# sorted. --retained-only stops at the first live message; -W bounds the wait.
retained() {
    ip netns exec "$broker_ns" mosquitto_sub -h "$broker" -u ha -P ha-secret \
        -t 'homeassistant/#' -t 'hearth/#' -v --retained-only -W 2 2>/dev/null | sort || true
}
# payload TOPIC: the retained payload of one topic (empty when there is none).
payload() {
    ip netns exec "$broker_ns" mosquitto_sub -h "$broker" -u ha -P ha-secret \
        -t "$1" --retained-only -C 1 -W 2 2>/dev/null || true
}
wait_payload() { # TOPIC PAYLOAD WHAT
    local deadline=$((SECONDS + LIMIT))
    until [ "$(payload "$1")" = "$2" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "$3: $1 is '$(payload "$1")', not '$2' after ${LIMIT}s"
        sleep 0.2
    done
}

# ---- the node -----------------------------------------------------------------------------
mkdir -p "$data"
printf 'node-secret\n' >"$data/mqtt.password"
cat >"$data/hearth.toml" <<EOF
[mqtt]
url = "mqtt://$broker:1883"
user = "hearth"
password_file = "mqtt.password"
node_id = "netns"
export = ["light.*", "switch.*", "sensor.*"]
EOF
start_node() {
    ip netns exec "$node_ns" env RUST_LOG=info,hearth=debug "$bin" up --data "$data" \
        --no-mdns --listen /ip4/127.0.0.1/tcp/0 --api 127.0.0.1:0 --name netns \
        --log-format json >>"$data.log" 2>&1 &
    node_pid=$!
    local deadline=$((SECONDS + 30))
    until hearth status --json >/dev/null 2>&1; do
        kill -0 "$node_pid" 2>/dev/null || die "the node exited during start-up"
        [ "$SECONDS" -lt "$deadline" ] || die "the node did not answer status"
        sleep 0.1
    done
}
hearth() { timeout 30 ip netns exec "$node_ns" "$bin" "$@" --data "$data"; }
start_node
hearth entity set light.porch on --attr friendly_name=Porch >/dev/null
hearth entity set switch.fan off >/dev/null
hearth entity set sensor.hall_temp 21.5 --attr 'unit_of_measurement="°C"' \
    --attr device_class=temperature >/dev/null
# Left out by the export filter.
hearth entity set climate.hall heat >/dev/null

deadline=$((SECONDS + LIMIT))
until [ "$(retained | wc -l)" -ge 10 ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "only $(retained | wc -l) retained topics after ${LIMIT}s: $(retained)"
    sleep 0.2
done

# ---- exactly what HA reads ---------------------------------------------------------------
got_topics=$(retained | awk '{ print $1 }')
want_topics=$(sort <<'EOF'
hearth/netns/availability
hearth/netns/light/porch/attributes
hearth/netns/light/porch/state
hearth/netns/sensor/hall_temp/attributes
hearth/netns/sensor/hall_temp/state
hearth/netns/switch/fan/attributes
hearth/netns/switch/fan/state
homeassistant/light/netns/porch/config
homeassistant/sensor/netns/hall_temp/config
homeassistant/switch/netns/fan/config
EOF
)
[ "$got_topics" = "$want_topics" ] || die "retained topics differ:
--- got
$got_topics
--- want
$want_topics"

check() { # TOPIC PAYLOAD
    local got
    got=$(payload "$1")
    [ "$got" = "$2" ] || die "$1 is '$got', not '$2'"
}
check hearth/netns/availability online
check hearth/netns/light/porch/state ON
check hearth/netns/switch/fan/state OFF
check hearth/netns/sensor/hall_temp/state 21.5
check hearth/netns/light/porch/attributes '{"friendly_name":"Porch"}'
check hearth/netns/switch/fan/attributes '{}'
jq -e '. == {"device_class": "temperature", "unit_of_measurement": "°C"}' \
    <<<"$(payload hearth/netns/sensor/hall_temp/attributes)" >/dev/null ||
    die "sensor attributes: $(payload hearth/netns/sensor/hall_temp/attributes)"

# config TOPIC JSON: the discovery config is one line, and equals JSON once the software
# version (which moves) is set aside.
config() {
    local got
    got=$(payload "$1")
    [ "$(printf '%s' "$got" | wc -l)" -eq 0 ] || die "$1 is more than one line"
    jq -e --argjson want "$2" 'del(.dev.sw) == $want' <<<"$got" >/dev/null ||
        die "$1 is $got, not $2 (besides dev.sw)"
    jq -e '.dev.sw | type == "string"' <<<"$got" >/dev/null || die "$1 has no dev.sw"
}
dev='{"ids": ["hearth_netns"], "name": "Hearth netns", "mf": "Hearth"}'
config homeassistant/light/netns/porch/config "{
  \"~\": \"hearth/netns/light/porch\", \"name\": \"Porch\", \"unique_id\": \"hearth_netns_light_porch\",
  \"default_entity_id\": \"light.porch\", \"avty_t\": \"hearth/netns/availability\",
  \"json_attr_t\": \"~/attributes\", \"stat_t\": \"~/state\", \"cmd_t\": \"~/set\", \"dev\": $dev }"
config homeassistant/switch/netns/fan/config "{
  \"~\": \"hearth/netns/switch/fan\", \"name\": \"fan\", \"unique_id\": \"hearth_netns_switch_fan\",
  \"default_entity_id\": \"switch.fan\", \"avty_t\": \"hearth/netns/availability\",
  \"json_attr_t\": \"~/attributes\", \"stat_t\": \"~/state\", \"cmd_t\": \"~/set\", \"dev\": $dev }"
config homeassistant/sensor/netns/hall_temp/config "{
  \"~\": \"hearth/netns/sensor/hall_temp\", \"name\": \"hall_temp\",
  \"unique_id\": \"hearth_netns_sensor_hall_temp\", \"default_entity_id\": \"sensor.hall_temp\",
  \"avty_t\": \"hearth/netns/availability\", \"json_attr_t\": \"~/attributes\",
  \"stat_t\": \"~/state\", \"dev_cla\": \"temperature\", \"unit_of_meas\": \"°C\", \"dev\": $dev }"
log "discovery configs, states, attributes and availability retained as HA expects"

# ---- a command from HA ---------------------------------------------------------------------
ip netns exec "$broker_ns" mosquitto_pub -h "$broker" -u ha -P ha-secret \
    -t hearth/netns/light/porch/set -m OFF
deadline=$((SECONDS + LIMIT))
until [ "$(hearth entity get light.porch --json 2>/dev/null | jq -r .state)" = off ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "the OFF command was not written"
    sleep 0.1
done
wait_payload hearth/netns/light/porch/state OFF "the state after the command"
log "a command on hearth/netns/light/porch/set was written and its state retained"

# ---- mosquitto restarts, losing its retained messages ------------------------------------
kill -TERM "$broker_pid"
wait "$broker_pid" 2>/dev/null || true
hearth entity set switch.fan on >/dev/null
start_broker
wait_payload hearth/netns/switch/fan/state ON "after the broker restart"
wait_payload hearth/netns/availability online "after the broker restart"
[ -n "$(payload homeassistant/light/netns/porch/config)" ] ||
    die "the configs were not published again after the broker restart"
log "mosquitto restarted: the bridge reconnected and published again"

# ---- availability: last will, and a clean stop ---------------------------------------------
kill -KILL "$node_pid"
wait "$node_pid" 2>/dev/null || true
wait_payload hearth/netns/availability offline "the last will after the node was killed"
start_node
wait_payload hearth/netns/availability online "after the node started again"
kill -TERM "$node_pid"
wait "$node_pid" 2>/dev/null || true
node_pid=""
check hearth/netns/availability offline
log "availability: offline by last will, online again, offline on a clean stop"
log "ok"
