"""How time and memory grow with n: every rcka_kernels backend and the naive
baselines, fwd+bwd, over a sweep of n for each (p = q, kernel, estimator, dtype).

A provider that runs out of memory, errors or would exceed the per-case time
limit at some n is not run at larger n (recorded as "skipped").

    python -m benchmarks.bench_scaling --quick                         # seconds
    python -m benchmarks.bench_scaling                                 # moderate CPU sweep (the committed one)
    python -m benchmarks.bench_scaling --n 128-65536 --p 64,256,1024,4096 --kernels linear,rbf \\
        --estimators biased,debiased --dtypes float32,bfloat16 --device cuda   # the full sweep (GPU)
"""

from __future__ import annotations

import argparse

from benchmarks._harness import RESULTS, Bench, add_common_args, plot


def _ints(s: str):
    if "-" in s and "," not in s:  # a power-of-two range "lo-hi"
        lo, hi = (int(v) for v in s.split("-"))
        out, v = [], lo
        while v <= hi:
            out.append(v)
            v *= 2
        return out
    return [int(v) for v in s.split(",")]


def _backends(device):
    import rcka_kernels as rk

    return [b for b, st in rk.available_backends(device).items() if st.available and b != "reference"]


BASELINES = {"linear": ["official", "textbook", "naive-centred"], "rbf": ["textbook", "naive-centred"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", default="128-8192", help="list or power-of-two range lo-hi")
    ap.add_argument("--p", default="64,256", help="widths (q = p)")
    ap.add_argument("--kernels", default="linear,rbf")
    ap.add_argument("--estimators", default="biased,debiased")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--baselines", default="auto", help="comma list, 'none', or 'auto' (naive baselines per kernel)")
    add_common_args(ap, timeout=120.0, repeats=5)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.p, args.estimators = "128-512", "64", "biased"
    bench = Bench("scaling", args, args.device)
    ours = [f"rcka[{b}]" for b in _backends(args.device)]
    tag = args.tag or ("quick" if args.quick else "")
    for kernel in args.kernels.split(","):
        for p in _ints(args.p):
            for est in args.estimators.split(","):
                for dt in args.dtypes.split(","):
                    if args.baselines == "auto":
                        base = [b for b in BASELINES[kernel] if not (b == "textbook" and est == "debiased")]
                    else:
                        base = [] if args.baselines == "none" else args.baselines.split(",")
                    if dt != "float32" and args.device == "cpu":
                        base = []  # naive code in bf16 on CPU measures nothing useful
                    cfg = dict(op="cka", p=p, q=p, kernel=kernel, debiased=est == "debiased", dtype=dt)
                    bench.sweep(ours + base, cfg, _ints(args.n))
                    recs = [r for r in bench.records if all(r["config"].get(k) == v for k, v in cfg.items())]
                    plot(recs, RESULTS / f"scaling_{kernel}_p{p}_{est}_{dt}{'_' + tag if tag else ''}_{args.device}.png",
                         f"{kernel} CKA ({est}, {dt}), p = q = {p}, fwd+bwd, {bench.meta['device_name']}")
    bench.write(tag)
    return bench


if __name__ == "__main__":
    main()
