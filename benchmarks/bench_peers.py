"""rcka_kernels against the CKA code people use: the official RCKA formula, the
textbook explicit-H CKA, Kornblith's mean-centred recipe, and the peer
libraries torch-cka, ckatorch and cka-pytorch (optional, installed with
``pip install --no-deps torch-cka ckatorch cka-pytorch``). Same inputs; value
agreement with the float64 reference, time (fwd+bwd where the library has a
gradient, else forward), extra peak memory. A peer that is not installed, or
fails on an input, is recorded with its error.

Which estimator each computes: torch-cka and cka-pytorch the unbiased HSIC
(debiased CKA), ckatorch(method='hsic') the biased one (its 'fro_norm' method
detaches the Grams: no gradient), the official formula the uncentred alignment.

    python -m benchmarks.bench_peers --quick
    python -m benchmarks.bench_peers
"""

from __future__ import annotations

import argparse

from benchmarks._harness import RESULTS, Bench, add_common_args, plot
from benchmarks.bench_scaling import _backends, _ints

PEERS = ["official", "textbook", "naive-centred", "torch-cka", "ckatorch", "ckatorch-fro", "cka-pytorch"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", default="256-4096")
    ap.add_argument("--p", default="256")
    add_common_args(ap, timeout=180.0, repeats=5)
    args = ap.parse_args(argv)
    if args.quick:
        args.n = "256,512"
    bench = Bench("peers", args, args.device)
    ours = [f"rcka[{b}]" for b in _backends(args.device)] + [f"rcka-official[{b}]" for b in _backends(args.device)]
    tag = args.tag or ("quick" if args.quick else "")
    for kernel in ("linear", "rbf"):
        for debiased in (False, True):
            for p in _ints(args.p):
                cfg = dict(op="cka", p=p, q=p, kernel=kernel, debiased=debiased, dtype="float32")
                bench.sweep(ours + PEERS, cfg, _ints(args.n))
    bench.write(tag)
    for debiased in (False, True):
        recs = [r for r in bench.records if r["config"]["kernel"] == "linear" and r["config"]["debiased"] == debiased]
        est = "debiased" if debiased else "biased"
        plot(recs, RESULTS / f"peers_linear_{est}{'_' + tag if tag else ''}_{args.device}.png",
             f"linear CKA ({est}) vs peers, p = q = {args.p}, {bench.meta['device_name']}")
    return bench


if __name__ == "__main__":
    main()
