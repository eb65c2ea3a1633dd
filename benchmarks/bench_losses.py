"""RCKALoss on logits and PCKALoss on detection feature maps against the naive
losses (official formula / explicit-H CKA on each axis, a loop over channels).

RCKA: logits (B, classes), B in 64..1024, 100 and 1000 classes; both terms
(sample axis B x B, class axis classes x classes). PCKA: one FPN level of a
2-image 1333x800 batch (padded to 1344x800), C=256, 16x16 patches: the level's
(C, patches, B*256) patch matrices.

    python -m benchmarks.bench_losses           # full
    python -m benchmarks.bench_losses --quick   # small sizes
"""

from __future__ import annotations

import argparse

from benchmarks._harness import RESULTS, Bench, add_common_args, plot


def _backends():
    import rcka_kernels as rk

    return [b for b, st in rk.available_backends().items() if st.available and b != "reference"]


def fpn_levels(quick: bool):
    # stride s: a 1344x800 padded batch gives an (800/s) x (1344/s) map
    levels = [("P5", 32), ("P4", 16), ("P3", 8)] if not quick else [("P5", 32)]
    for name, stride in levels:
        h, w = 800 // stride, 1344 // stride
        patches = (-(-h // 16)) * (-(-w // 16))
        yield dict(op="pcka", level=name, B=2, C=256, H=h, W=w, patch=16, n=patches, dtype="float32")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    add_common_args(ap, timeout=300.0)
    args = ap.parse_args(argv)
    bench = Bench("losses", args, args.device)
    bs = [64, 256] if args.quick else [64, 128, 256, 512, 1024]
    classes = [100] if args.quick else [100, 1000]
    ours = _backends()
    rprov = [f"RCKALoss[{b}]" for b in ours] + [f"RCKALoss-official[{b}]" for b in ours] + ["official-rcka", "textbook-rcka"]
    for c in classes:
        group = (("op", "rcka"), ("classes", c))
        for b in bs:
            for p in rprov:
                bench.run(p, dict(op="rcka", B=b, classes=c, n=b, dtype="float32"), group=group)
    pprov = [f"PCKALoss[{b}]" for b in ours] + [f"PCKALoss-official[{b}]" for b in ours] + ["official-pcka", "textbook-pcka"]
    for cfg in fpn_levels(args.quick):
        for p in pprov:
            bench.run(p, cfg, group=(("op", "pcka"),))
    tag = args.tag or ("quick" if args.quick else "")
    bench.write(tag)
    for c in classes:
        recs = [r for r in bench.records if r["config"]["op"] == "rcka" and r["config"]["classes"] == c]
        plot(recs, RESULTS / f"losses_rcka{c}{'_' + tag if tag else ''}_{args.device}.png",
             f"RCKA loss (both axes) on (B, {c}) logits, fwd+bwd, {bench.meta['device_name']}", xlabel="B (batch size)")
    return bench


if __name__ == "__main__":
    main()
