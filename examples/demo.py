"""rcka-kernels demo: a naive CKA loss against ``rcka_kernels.cka_loss``, same inputs.

For each size it runs, forward + backward:
  - the official RCKA formula, transcribed (n x n Gram matrices, traces of n x n
    products, no centring), and rcka_kernels' value of the same quantity
    (1 - gram_discrepancy(centered=False));
  - the textbook CKA (explicit centring matrix H, tr(KHLH)) and rcka_kernels.cka_loss.
Values are checked against the float64 oracle ``rcka_kernels.reference``
(``official_alignment`` for the official formula, ``cka`` for CKA). Time is the
median of repeats after a warm-up; memory is the peak RSS increase of a fresh
process that runs only that case.

    python examples/demo.py            # n = 256, 1024, 4096 (p = q = 256) and one RBF size: 45 s on 2 idle cores
    python examples/demo.py --quick    # n = 256, 1024 only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's benchmarks/ harness

from benchmarks._harness import Bench, add_common_args, fmt_bytes, fmt_ms  # noqa: E402

ROWS = [  # (provider, what it computes, label)
    ("official", "official", "official RCKA formula (naive)"),
    ("rcka-official[torch]", "official", "rcka_kernels, same definition"),
    ("textbook", "cka", "textbook CKA, explicit H (naive)"),
    ("naive-centred", "cka", "mean-centred Grams (naive)"),
    ("rcka[torch]", "cka", "rcka_kernels.cka_loss"),
]


def mem_ratio(r, ours, floor=64 << 10) -> str:
    """Ratio of extra peak memory; below 64 KiB (page-level noise) ours counts as 64 KiB."""
    a, b = r["peak_mem_bytes"], ours["peak_mem_bytes"]
    return _x(a / b) if b >= floor else ">" + _x(a / floor)


def _x(r: float) -> str:
    return f"{r:.1f}x" if r < 10 else f"{r:.0f}x"


def cases(quick: bool):
    for n in (256, 1024) if quick else (256, 1024, 4096):
        naive = ["official", "textbook"]
        yield dict(op="cka", n=n, p=256, q=256, kernel="linear", debiased=False, dtype="float32"), \
            naive[:1] + ["rcka-official[torch]"] + naive[1:] + ["rcka[torch]"]
    n = 1024 if quick else 2048
    yield dict(op="cka", n=n, p=64, q=64, kernel="rbf", debiased=False, dtype="float32"), \
        ["textbook", "naive-centred", "rcka[torch]"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    add_common_args(ap, timeout=300.0, repeats=3)
    ap.set_defaults(ref_max_n=1024, time_budget=6.0)
    args = ap.parse_args(argv)
    bench = Bench("demo", args)
    m = bench.meta
    print(f"rcka-kernels demo on {m['device_name']} ({m['cpu_count']} cores), torch {m['torch']}; "
          f"float64 reference up to n={args.ref_max_n}, above it the torch backend in float64.\n")
    head = f"{'n':>5} {'p':>4} {'kernel':<6} {'implementation':<34} {'value':>10} {'fp64 ref':>10} {'|diff|':>8} " \
           f"{'fwd+bwd':>9} {'extra mem':>10} {'vs rcka':>16}"
    print(head)
    print("-" * len(head))
    t_start = time.perf_counter()
    worst = []
    for cfg, provs in cases(args.quick):
        # naive baselines that run for seconds: their first run is timed (no warm-up)
        heavy = dict(warmup=0, repeats=1) if cfg["n"] >= 4096 else {}
        recs = {p: bench.run(p, cfg, verbose=False, **({} if p.startswith("rcka") else heavy)) for p in provs}
        ours_of = {"cka": recs["rcka[torch]"], "official": recs.get("rcka-official[torch]")}
        for prov, quantity, label in ROWS:
            if prov not in recs:
                continue
            r = recs[prov]
            name = label + (" [1-CKA]" if prov == "rcka[torch]" else "")
            if r["status"] != "ok":
                print(f"{cfg['n']:>5} {cfg['p']:>4} {cfg['kernel']:<6} {name:<34} {r['status'].upper()}: {r.get('error', '')}")
                continue
            ref = r.get("ref_value")
            diff = abs(r["value"] - ref) if ref is not None else None
            ratio, ours = "", ours_of[quantity]
            if ours and ours["status"] == "ok" and not prov.startswith("rcka"):
                ratio = f"{_x(r['time_ms'] / ours['time_ms'])} t, {mem_ratio(r, ours)} mem"
            print(f"{cfg['n']:>5} {cfg['p']:>4} {cfg['kernel']:<6} {name:<34} {r['value']:>10.6f} "
                  f"{ref if ref is not None else float('nan'):>10.6f} {diff if diff is not None else float('nan'):>8.1e} "
                  f"{fmt_ms(r['time_ms']):>9} {fmt_bytes(r['peak_mem_bytes']):>10} {ratio:>16}")
            if diff is not None:
                worst.append(diff)
        print()
    print("value = CKA for CKA rows (rcka_kernels.cka_loss reports 1 - CKA; shown here as CKA) and the official")
    print("alignment tr(KL)/(|K||L|) for the official rows: a different quantity (no centring), compared with")
    print("rcka_kernels.reference.official_alignment. 'vs rcka': time and extra-memory ratios of the naive code")
    print("over rcka_kernels computing the same value (CKA rows: cka_loss; official rows: its same-definition row).")
    print("The mean-centred naive recipe loses digits in float32 as n grows (it centres n x n Grams in float32);")
    print("rcka_kernels accumulates in float32 blocks and float64 across blocks.")
    print(f"largest |value - float64 reference| = {max(worst):.1e}; demo took {time.perf_counter() - t_start:.0f} s.")
    return bench


if __name__ == "__main__":
    main()
