"""Every benchmark the README shows, in one go (`make bench`), then the README's tables from them.

    python -m benchmarks.run_all             # measure (on an idle machine), then: python -m benchmarks.report
    python -m benchmarks.run_all --quick     # the smoke run: small cases, *_quick.json
    python -m benchmarks.run_all --device cuda --quick --out DIR
"""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks import _harness

SCRIPTS = ["bench_efficient", "bench_naive", "bench_compare"]


def main(argv=None):
    ap = _harness.parser(__doc__)
    ap.add_argument("--only", default=",".join(SCRIPTS), help="comma list of scripts")
    args = ap.parse_args(argv)
    common = ["--device", args.device, "--out", args.out] + (["--quick"] if args.quick else [])
    t0 = time.perf_counter()
    for name in args.only.split(","):  # each in a process of its own: no timing follows a memory pass (_harness)
        print(f"\n=== {name} {' '.join(common)}", flush=True)
        subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *common], cwd=_harness.ROOT, check=True)
    print(f"\nall benchmarks done in {time.perf_counter() - t0:.0f} s; now: python -m benchmarks.report")


if __name__ == "__main__":
    main()
