"""rcka-kernels demo: naive CKA losses against ``rcka_kernels``, same inputs, forward + backward.

For each size: the official RCKA formula, transcribed (n x n Grams, no centring) beside
rcka_kernels' value of the same quantity (1 - gram_discrepancy(centered=False)); the textbook
CKA (explicit centring matrix H) and Kornblith's mean-centred Grams beside
``rcka_kernels.cka_loss``. Values against the float64 oracle ``rcka_kernels.reference``; time
(median, contenders interleaved) and extra peak memory from the benchmarks' one harness.

    python examples/demo.py            # n = 256, 1024, 2048 (p = 256) and one RBF size
    python examples/demo.py --quick    # n = 256, 1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's benchmarks/ harness

import rcka_kernels as rk  # noqa: E402
from benchmarks import _harness, naive  # noqa: E402
from rcka_kernels import reference  # noqa: E402


def _step(fn, x, y):
    """One forward + backward of fn(x, y) with x requiring grad; returns the value."""
    def call():
        xg = x.detach().requires_grad_()
        v = fn(xg, y)
        v.backward()
        return v.detach()
    return call


def contenders(kernel: str, x, y) -> dict:
    """name -> (what it computes, call)."""
    if kernel == "rbf":
        return {"textbook CKA, explicit H (naive)": ("cka", _step(lambda a, b: naive.textbook_cka(a, b, "rbf"), x, y)),
                "mean-centred Grams (naive)": ("cka", _step(lambda a, b: naive.centred_cka(a, b, "rbf"), x, y)),
                "rcka_kernels.cka (rbf)": ("cka", _step(lambda a, b: rk.cka(a, b, kernel="rbf"), x, y))}
    return {"official RCKA formula (naive)": ("official", _step(naive.official_alignment, x, y)),
            "rcka_kernels, same definition": ("official", _step(lambda a, b: 1 - rk.gram_discrepancy(a, b, centered=False), x, y)),
            "textbook CKA, explicit H (naive)": ("cka", _step(naive.textbook_cka, x, y)),
            "mean-centred Grams (naive)": ("cka", _step(naive.centred_cka, x, y)),
            "rcka_kernels.cka_loss (as CKA)": ("cka", _step(lambda a, b: 1 - rk.cka_loss(a, b), x, y))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    sizes = [("linear", n, 256) for n in ((256, 1024) if args.quick else (256, 1024, 2048))] + [("rbf", 1024, 64)]
    t0 = time.perf_counter()
    print(f"{'kernel':<6} {'n':>5} {'implementation':<36} {'value':>10} {'|diff| fp64':>11} {'fwd+bwd':>9} {'extra mem':>10}")
    worst = 0.0
    cases = {}  # case -> (contenders, float64 values); one interleaved() call times them all (the harness's rule)
    for kernel, n, p in sizes:
        x, y = _harness.inputs((n, p), p, "cpu")
        want = {"cka": reference.cka(x.double(), y.double(), kernel, "median" if kernel == "rbf" else None).item(),
                "official": reference.official_alignment(x.double(), y.double()).item()}
        cases[f"{kernel} {n}"] = (contenders(kernel, x, y), want)
    recs = _harness.interleaved([(c, lambda c=c: {k: f for k, (_, f) in cases[c][0].items()}) for c in cases], "cpu",
                                budget_s=1.0, min_reps=2)
    for case, (calls, want) in cases.items():
        kernel, n = case.split()
        for r in (r for r in recs if r["case"] == case):
            if r["status"] != "ok":
                print(f"{kernel:<6} {n:>5} {r['contender']:<36} {r['status']}: {r.get('error', '')}")
                continue
            diff = abs(r["value"] - want[calls[r["contender"]][0]])
            worst = max(worst, diff)
            print(f"{kernel:<6} {n:>5} {r['contender']:<36} {r['value']:>10.6f} {diff:>11.1e} {_harness.fmt_s(r['time_s']):>9} "
                  f"{_harness.fmt_bytes(r.get('peak_bytes', 0)):>10}")
        print()
    print("value: CKA, or for the official rows the uncentred alignment tr(KL)/(|K||L|) (another quantity, compared")
    print("with rcka_kernels.reference.official_alignment). The mean-centred recipe loses digits in float32 as n grows.")
    print(f"largest |value - float64 reference| = {worst:.1e}; demo took {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
