"""Every benchmark script in one go: ``make bench`` (full) and ``make bench-quick``.

    python -m benchmarks.run_all --quick           # small sizes, < 3 min on 2 CPU cores
    python -m benchmarks.run_all                   # the moderate CPU sweep committed in results/
    python -m benchmarks.run_all --device cuda     # on a GPU (see gpu_check.py for the full GPU sweep)

Each script writes JSON + markdown (+ PNG plots) into benchmarks/results/;
--quick results are tagged "quick" so they never overwrite committed results.
Options after ``--`` are passed to every script (e.g. ``-- --timeout 60``).
"""

from __future__ import annotations

import argparse
import importlib
import time

SCRIPTS = ["bench_efficient", "bench_vs_naive", "bench_peers", "bench_scaling", "bench_mmd", "bench_losses", "bench_compare"]
#: the --quick options of each script (default: the harness's)
QUICK = {"bench_compare": ["--quick"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", default=",".join(SCRIPTS), help="comma list of scripts to run")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- options passed to every script")
    args = ap.parse_args(argv)
    rest = [a for a in args.rest if a != "--"]
    t0 = time.perf_counter()
    for name in args.only.split(","):
        quick = QUICK.get(name, ["--quick", "--repeats", "3", "--time-budget", "3"]) if args.quick else []
        common = ["--device", args.device] + quick + rest
        print(f"\n=== {name} {' '.join(common)}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(common)
    print(f"\nall benchmarks done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
