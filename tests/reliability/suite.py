#!/usr/bin/python3
"""The reliability suite's driver: runs the scenarios and prints one table of figures.

Usage (as root): suite.py HEARTH_BIN WORK_DIR
Environment:
  RELIABILITY=full     the long form (1000 kills, many partitions, an hour's soak)
  SCENARIOS=a,b        run only these (crash, rotation, partition, slow, flood, soak)
  SOAK_SECONDS=N       the soak's length (default 300, or 3600 in the full form)
  CRASH_KILLS=N        the crash scenario's kills (default 20, or 1000 in the full form)
  SEED=N               the random seed (default 1); printed so a run can be repeated
  RELIABILITY_LOG=F    the nodes' RUST_LOG filter (default info)
  DIAL_FLOOD_BIN=PATH  the flood's dialer, hearth-net's dial_flood example (run.sh builds it)
  RELIABILITY_ALLOW=a  known defects (by name, comma-separated) reported in the table
                       without failing the run: seq-reuse
"""

import os
import signal
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import Table, log  # noqa: E402

ALL = ["crash", "rotation", "partition", "slow", "flood", "soak"]
# Run beside the others, not after them, to keep the short form inside its budget.
BACKGROUND = {"soak"}


class Context:
    def __init__(self, bin_path, work):
        self.bin = bin_path
        self.work = work
        self.full = os.environ.get("RELIABILITY", "") == "full"
        self.seed = int(os.environ.get("SEED", "1"))
        # Namespace names carry the pid so concurrent runs never collide.
        self.tag = f"hr{os.getpid() % 100000}"
        # Failed checks that are known defects, by name; they fail the run unless
        # RELIABILITY_ALLOW names them.
        self.known_defects = []


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ctx = Context(sys.argv[1], sys.argv[2])
    chosen = [s for s in os.environ.get("SCENARIOS", ",".join(ALL)).split(",") if s]
    for s in chosen:
        if s not in ALL:
            sys.exit(f"unknown scenario {s!r}; known: {', '.join(ALL)}")
    table = Table()
    failures = []

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    log(f"seed {ctx.seed}, {'full' if ctx.full else 'short'} form, scenarios {', '.join(chosen)}")

    def run_one(name):
        t0 = time.monotonic()
        try:
            mod = __import__(name)
            mod.run(ctx, table)
        except Exception as e:  # every scenario reports; one failing does not hide the others
            failures.append(name)
            table.add(name, "-", "FAIL", str(e)[:300])
            traceback.print_exc()
        log(f"{name} took {time.monotonic() - t0:.0f}s")

    try:
        background = [threading.Thread(target=run_one, args=(s,), daemon=True)
                      for s in chosen if s in BACKGROUND]
        for t in background:
            t.start()
        for s in chosen:
            if s not in BACKGROUND:
                run_one(s)
        for t in background:
            t.join()
    finally:
        harness.cleanup()
    allowed = set(os.environ.get("RELIABILITY_ALLOW", "").split(","))
    for defect in ctx.known_defects:
        if defect not in allowed:
            failures.append(f"known defect {defect}")
    wall = time.monotonic() - started
    table.add("suite", f"{'full' if ctx.full else 'short'} form, seed {ctx.seed}",
              "FAIL: " + ", ".join(failures) if failures else "pass", f"wall time {wall:.0f}s")
    print()
    print(table.render(), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
