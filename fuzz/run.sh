#!/usr/bin/env bash
# Replays the committed corpus of every fuzz target, then fuzzes each one for a
# fixed, seeded budget (about three minutes in total on the CI machine). CI calls this.
#
# - Nightly is not needed: RUSTC_BOOTSTRAP=1 lets stable rustc take the
#   sanitizer-coverage flags cargo-fuzz passes.
# - Targets are built without AddressSanitizer (`-s none`): the crates under
#   test forbid unsafe code, and ASan slowed the receive target tenfold, so
#   the budget buys far more inputs this way. Panics still abort and fail.
# - Fuzzing runs on a scratch copy of the corpus, so new inputs libFuzzer
#   keeps do not dirty the committed seeds.
# - fuzz/Cargo.lock is committed so a clean clone builds the same versions;
#   cargo refreshes it if the crdt crate's dependencies moved.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# target:runs. Runs are sized from measured rates (envelope ~250k/s,
# receive ~700/s, sync_message ~400/s, digest ~16k/s on 2 cores) to about half a minute each.
# The node crate's targets (through `hearth::fuzzing`) get about ten seconds each: rates measured
# with six running at once on a busy 2-core machine were invite ~58k/s, certificate ~3.8k/s,
# pairing ~1.9k/s (SPAKE2 on every input that gets that far), peer_frame ~10k/s,
# store_record ~22k/s, api_request ~10k/s; alone they run about twice as fast.
budget=("envelope:6000000" "receive:20000" "sync_message:12000" "digest:400000"
    "invite:1000000" "certificate:60000" "pairing:30000" "peer_frame:200000"
    "store_record:400000" "api_request:200000")
seed=20261122

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

for entry in "${budget[@]}"; do
    target=${entry%%:*}
    runs=${entry##*:}
    cargo fuzz build -O -s none "$target"

    echo "== $target: replaying corpus/$target"
    cargo fuzz run -O -s none "$target" "corpus/$target" -- -runs=0

    echo "== $target: $runs runs, seed $seed"
    mkdir -p "$scratch/$target"
    cp -r "corpus/$target/." "$scratch/$target/"
    cargo fuzz run -O -s none "$target" "$scratch/$target" -- \
        -runs="$runs" -seed="$seed" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzz: all targets passed"
