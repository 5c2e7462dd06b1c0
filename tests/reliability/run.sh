#!/usr/bin/env bash
# The reliability suite: crash, partition and heal, slow consumer, soak (see tests/reliability/README.md).
#
# Usage (as root):  tests/reliability/run.sh
# Environment:
#   RELIABILITY=full   the long form; the default is the short form CI runs
#   SCENARIOS=a,b      only these scenarios (crash, rotation, partition, slow, flood, soak)
#   SEED=N             random seed (default 1)
#   HEARTH_BIN=PATH    binary to run (default: $CARGO_TARGET_DIR or target, /debug/hearth;
#                      built with `cargo build` when absent)
#   DIAL_FLOOD_BIN=PATH  the flood's dialer (default: hearth-net's dial_flood example, built)
#   KEEP_LOGS=1        keep the work dir (node logs and data dirs)
# Every namespace and process it made is gone when it exits, however it exits.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${HEARTH_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/hearth}
die() { printf 'reliability: FAIL: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it creates network namespaces)"
for tool in ip iptables jq /usr/bin/python3; do
    command -v "$tool" >/dev/null || die "needs '$tool' on PATH"
done
if [ ! -x "$bin" ]; then
    (cd "$repo" && cargo build --bin hearth) || die "cargo build failed"
fi
# The flood scenario's dialer, which completes libp2p's handshakes as fresh peers. Built
# with the workspace's features (as `cargo test --workspace` resolves them), so nothing
# already built is compiled again.
case ",${SCENARIOS:-flood}," in
*,flood,*)
    if [ -z "${DIAL_FLOOD_BIN:-}" ]; then
        DIAL_FLOOD_BIN=$(cd "$repo" && cargo build -q --workspace --example dial_flood \
            --message-format=json | jq -r 'select(.executable != null) | .executable' | tail -1)
        [ -x "$DIAL_FLOOD_BIN" ] || die "cargo build of the dial_flood example failed"
    fi
    DIAL_FLOOD_BIN=$(readlink -f "$DIAL_FLOOD_BIN")
    export DIAL_FLOOD_BIN
    ;;
esac
work=$(mktemp -d "${TMPDIR:-/tmp}/hearth-reliability.XXXXXX")
cleanup() {
    local status=$?
    if [ "${KEEP_LOGS:-0}" = 1 ] || [ "$status" -ne 0 ]; then
        printf 'reliability: logs kept in %s\n' "$work" >&2
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
# The driver tears down its namespaces and nodes itself, on failure and on SIGTERM too.
/usr/bin/python3 "$repo/tests/reliability/suite.py" "$(readlink -f "$bin")" "$work"
