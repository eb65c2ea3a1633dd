"""Squared RBF MMD: rcka_kernels.mmd against the naive three-matrix version and
geomloss ``SamplesLoss("gaussian")`` (tensorized backend; the KeOps 'online'
backend where pykeops imports and compiles, else its error is recorded).
geomloss returns MMD^2 / 2 (biased); it is doubled here. All providers use the
same fixed bandwidth sigma = sqrt(d) (geomloss takes no heuristic).

    python -m benchmarks.bench_mmd --quick
    python -m benchmarks.bench_mmd
"""

from __future__ import annotations

import argparse
import time

from benchmarks._harness import RESULTS, Bench, add_common_args, plot
from benchmarks.bench_scaling import _backends, _ints


def _warm_keops(bench, ds, device):
    """KeOps compiles each formula once into its disk cache (about a minute per
    formula on a CPU): do it before timing so the sweep measures the kernels."""
    from benchmarks import providers

    prov = providers.registry()["geomloss-keops"]
    for d in ds:
        cfg = dict(op="mmd", n=64, m=64, p=d, kernel="rbf", debiased=False, sigma=1.0, dtype="float32", device=device)
        if prov.supports(cfg):
            bench.meta["keops"] = prov.supports(cfg)
            return
        t0 = time.perf_counter()
        try:
            x, y = providers.make_inputs(cfg)
            prov.make(cfg, x, y)().backward()
            bench.meta.setdefault("keops_compile_s", {})[d] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # recorded by the sweep's own cases as well
            bench.meta["keops"] = f"{type(e).__name__}: {e}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", default="256-16384")
    ap.add_argument("--d", default="64")
    add_common_args(ap, timeout=120.0, repeats=5)
    args = ap.parse_args(argv)
    if args.quick:
        args.n = "256,1024"
    bench = Bench("mmd", args, args.device)
    provs = [f"rcka-mmd[{b}]" for b in _backends(args.device)] + ["naive-mmd", "geomloss"]
    if not args.quick:  # KeOps compiles its formulas (minutes on a CPU) on first use: full runs only
        provs.append("geomloss-keops")
        _warm_keops(bench, _ints(args.d), args.device)
    tag = args.tag or ("quick" if args.quick else "")
    for d in _ints(args.d):
        for unbiased in (False, True):
            cfg = dict(op="mmd", p=d, kernel="rbf", debiased=unbiased, sigma=float(d) ** 0.5, dtype="float32")
            bench.sweep(provs, cfg, _ints(args.n))
        recs = [r for r in bench.records if r["config"]["p"] == d and not r["config"]["debiased"]]
        plot(recs, RESULTS / f"mmd_d{d}{'_' + tag if tag else ''}_{args.device}.png",
             f"RBF MMD^2 (biased), n = m, d = {d}, fwd+bwd, {bench.meta['device_name']}")
    bench.write(tag)
    return bench


if __name__ == "__main__":
    main()
