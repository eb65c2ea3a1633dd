"""Issue 2: the torch backend against the naive code, same inputs, one run.

Linear CKA, fwd+bwd, against the official RCKA formula (traces of n x n
products) and the textbook explicit-H CKA; RBF CKA at large n against the
mean-centred naive CKA (Kornblith's recipe, O(n^2) memory) and the explicit-H
one. Targets (2-core CPU): n=8192, p=q=256: >= 100x faster than the official
formula and >= 20x less extra peak memory; n=2048, p=q=512: >= 10x faster;
RBF n=16384, p=64: < 1 GiB extra where the naive code needs about 5 GiB.

    python -m benchmarks.bench_vs_naive            # the issue-2 cases
    python -m benchmarks.bench_vs_naive --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse

from benchmarks._harness import Bench, add_common_args, fmt_bytes

OURS = "rcka[torch]"


def cases(quick: bool, device: str):
    lin = [(2048, 512, 512, ["official", "textbook"]), (8192, 256, 256, ["official", "textbook"])]
    rbf = [(4096, 64, 64, ["naive-centred", "textbook"]), (16384, 64, 64, ["naive-centred"])]
    if quick:
        lin = [(256, 64, 64, ["official", "textbook"]), (512, 128, 128, ["official", "textbook"])]
        rbf = [(512, 16, 16, ["naive-centred", "textbook"])]
    for n, p, q, naive in lin:
        cfg = dict(op="cka", n=n, p=p, q=q, kernel="linear", debiased=False, dtype="float32")
        yield cfg, [OURS, "rcka-official[torch]"] + naive
    for n, p, q, naive in rbf:
        cfg = dict(op="cka", n=n, p=p, q=q, kernel="rbf", debiased=False, dtype="float32")
        yield cfg, [OURS] + naive


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--only-n", default="", help="comma list: run only the cases with these n (e.g. 2048)")
    ap.add_argument("--textbook-max-n", type=int, default=1 << 30,
                    help="skip the explicit-H textbook CKA above this n (it takes ~13 min at n=8192 on 2 cores)")
    add_common_args(ap, timeout=900.0, repeats=3)
    ap.set_defaults(mem_cap_gb=12.0)
    args = ap.parse_args(argv)
    bench = Bench("vs_naive", args, args.device)
    summary = []
    only = {int(v) for v in args.only_n.split(",") if v}
    for cfg, provs in cases(args.quick, args.device):
        if only and cfg["n"] not in only:
            continue
        # a baseline that runs for minutes: time its first run (warm-up costs are negligible there)
        heavy = dict(warmup=0, repeats=1, timeout=max(args.timeout, 1500.0)) if cfg["n"] >= 8192 else {}
        provs = [p for p in provs if not (p == "textbook" and cfg["n"] > args.textbook_max_n)]
        recs = {p: bench.run(p, cfg, **({} if p.startswith("rcka") else heavy)) for p in provs}
        ours = recs[OURS]
        for p in provs[1:]:
            r = recs[p]
            if ours["status"] == "ok" and r["status"] == "ok" and p != "rcka-official[torch]":
                summary.append((cfg, p, r["time_ms"] / ours["time_ms"], r["peak_mem_bytes"] / max(ours["peak_mem_bytes"], 1), r, ours))
    print("\nspeed-up and memory ratio of rcka[torch] (fwd+bwd) over each naive baseline:")
    for cfg, p, sp, mr, r, ours in summary:
        print(f"  {cfg['kernel']:<6} n={cfg['n']:<6} p={cfg['p']:<4} q={cfg['q']:<4} vs {p:<14} {sp:8.1f}x faster, "
              f"{mr:8.1f}x less extra memory ({fmt_bytes(r['peak_mem_bytes'])} vs {fmt_bytes(ours['peak_mem_bytes'])})")
    bench.meta["summary"] = [dict(config=c, baseline=p, speedup=sp, mem_ratio=mr) for c, p, sp, mr, _, _ in summary]
    bench.write(args.tag or ("quick" if args.quick else ""))
    return bench


if __name__ == "__main__":
    main()
