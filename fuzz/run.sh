#!/usr/bin/env bash
# Replays the committed corpus of fuzz targets, then fuzzes each one for a fixed, seeded
# budget. CI calls it without arguments: the sync engine's targets (this package).
# `fuzz/run.sh --node` runs the node crate's targets too (the package in node/), and
# `fuzz/run.sh --node-only` only those.
#
# - Nightly is not needed: RUSTC_BOOTSTRAP=1 lets stable rustc take the
#   sanitizer-coverage flags cargo-fuzz passes.
# - Targets are built without AddressSanitizer (`-s none`): the crates under
#   test forbid unsafe code, and ASan slowed the receive target tenfold, so
#   the budget buys far more inputs this way. Panics still abort and fail.
# - Fuzzing runs on a scratch copy of the corpus, so new inputs libFuzzer
#   keeps do not dirty the committed seeds.
# - Cargo.lock files are committed so a clean clone builds the same versions;
#   cargo refreshes them if a crate's dependencies moved.
# - The node targets build the whole node with coverage instrumentation, about
#   six minutes on two cores even at opt-level 1 with 16 codegen units (as here),
#   which a CI run cannot spend. CI covers them instead with `cargo test`: the
#   unit tests of `hearth::fuzzing` replay this corpus and a seeded budget of
#   mutations of it through the same entry points (src/fuzzing.rs).
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1

crdt=1
node=0
case "${1:-}" in
    "") ;;
    --node) node=1 ;;
    --node-only) crdt=0; node=1 ;;
    *) echo "usage: fuzz/run.sh [--node | --node-only]" >&2; exit 2 ;;
esac

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# target:runs. Runs are sized from measured rates (envelope ~250k/s,
# receive ~700/s, sync_message ~400/s, digest ~16k/s on 2 cores) to about fifteen seconds each
# (CI's budget; longer runs: `cargo fuzz run` with -max_total_time).
# The node crate's targets (through `hearth::fuzzing`) get about ten seconds each: rates measured
# with six running at once on a busy 2-core machine were invite ~58k/s, certificate ~3.8k/s,
# pairing ~1.9k/s (SPAKE2 on every input that gets that far), peer_frame ~10k/s,
# store_record ~22k/s, api_request ~10k/s; alone they run about twice as fast.
crdt_budget=("envelope:3000000" "receive:10000" "sync_message:6000" "digest:200000")
node_budget=("invite:1000000" "certificate:60000" "pairing:30000" "peer_frame:200000"
    "store_record:400000" "api_request:200000")
seed=20261122

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# fuzz_dir entry...: builds, replays and fuzzes each entry's target of the package in fuzz_dir.
run_targets() {
    local dir=$1
    shift
    local flags=(-O -s none --fuzz-dir "$dir")
    if [ "$dir" = node ]; then
        # Faster builds for the large package; the runs lose a little speed.
        flags+=(--codegen-units 16)
        export CARGO_PROFILE_RELEASE_OPT_LEVEL=1
    fi
    for entry in "$@"; do
        local target=${entry%%:*}
        local runs=${entry##*:}
        cargo fuzz build "${flags[@]}" "$target"

        echo "== $target: replaying corpus/$target"
        cargo fuzz run "${flags[@]}" "$target" "corpus/$target" -- -runs=0

        echo "== $target: $runs runs, seed $seed"
        mkdir -p "$scratch/$target"
        cp -r "corpus/$target/." "$scratch/$target/"
        cargo fuzz run "${flags[@]}" "$target" "$scratch/$target" -- \
            -runs="$runs" -seed="$seed" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
    done
    unset CARGO_PROFILE_RELEASE_OPT_LEVEL
}

if [ "$crdt" = 1 ]; then run_targets . "${crdt_budget[@]}"; fi
if [ "$node" = 1 ]; then run_targets node "${node_budget[@]}"; fi
echo "fuzz: all targets passed"
