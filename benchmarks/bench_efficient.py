"""rcka-kernels against the best plain-PyTorch formula, in one process, interleaved.

    python -m benchmarks.bench_efficient                  # the README's CPU cases
    python -m benchmarks.bench_efficient --quick          # three small cases
    python -m benchmarks.bench_efficient --device cuda    # the GPU cases (--quick: shorter repeats)

Every case is one forward + backward with the student x requiring grad and the teacher y
detached, float32, against the yardstick of benchmarks/efficient.py (the feature- or
sample-space linear formula, the published n x n official formula, the dense RBF formula),
both with autograd. The harness (benchmarks/_harness.py) interleaves the contenders, counts
their aten ops (kernel launches on a GPU) and measures peak memory in its own pass.

GPU cases add RBF CKA at n = 16,384 and 65,536, p = 256 on every backend, with the time of a
dense (n, p) x (p, n) float32 matmul in the same rounds: the report divides each contender's
achieved rate, counted as 6 n^2 p FLOPs (two Gram products forward, one n x n by n x p
product backward), by the matmul's 2 n^2 p FLOPs per call.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

import rcka_kernels as rk
from benchmarks import _harness, efficient

Tensor = torch.Tensor
BOTH, CPU, CUDA = ("cpu", "cuda"), ("cpu",), ("cuda",)


def _step(f: Callable, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    def call():
        out = f(x, y)
        out.sum().backward()
        x.grad = None
        return out.detach()
    return call


def _pair(ours: Callable, plain: Callable, shape, q: int):
    def make(device: str) -> Dict[str, Callable]:
        x, y = _harness.inputs(shape, q, device)
        return {"rcka": _step(ours, x, y), "plain": _step(plain, x, y)}
    return make


def _rcka(official: bool):
    loss = rk.RCKALoss(intra_weight=15.0, inter_weight=15.0, official=official)
    return _pair(loss, lambda s, t: efficient.rcka_loss(s, t, 15.0, official=True), (64, 100), 100)


def _rbf_backends(n: int, p: int):
    """Every available backend, the dense formula and the matmul yardstick at (n, p)."""
    def make(device: str) -> Dict[str, Callable]:
        x, y = _harness.inputs((n, p), p, device)
        calls = {f"rcka[{b}]": _step(lambda a, c, b=b: rk.cka(a, c, kernel="rbf", backend=b), x, y)
                 for b in ("torch", "triton", "cuda") if rk.available_backends(device)[b].available}
        calls["plain"] = _step(efficient.rbf_cka, x, y)
        xd = x.detach()
        calls["matmul"] = lambda: xd @ xd.T
        return calls
    return make


def _maps(device: str) -> Dict[str, Callable]:
    """CKALoss(kernel="rbf") on (64, 256, 56, 56) feature maps, flattened as the loss does."""
    x, y = _harness.inputs((64, 256 * 56 * 56), 256 * 56 * 56, device)
    x4, y4 = x.detach().view(64, 256, 56, 56).requires_grad_(), y.view(64, 256, 56, 56)
    plain = _step(lambda a, b: 1 - efficient.rbf_cka(a.flatten(1), b.flatten(1)), x4, y4)
    return {"rcka": _step(rk.CKALoss(kernel="rbf"), x4, y4), "plain": plain}


# name -> (devices, in --quick, make(device) -> {contender: call}, FLOPs of one rcka call or None)
CASES = {
    "cka 64x100": (BOTH, True, _pair(rk.cka, efficient.linear_cka, (64, 100), 100), None),
    "cka 128x100": (CPU, False, _pair(rk.cka, efficient.linear_cka, (128, 100), 100), None),
    "cka 1024x1000": (CUDA, True, _pair(rk.cka, efficient.linear_cka, (1024, 1000), 1000), None),
    "cka 2048x512": (CPU, False, _pair(rk.cka, efficient.linear_cka, (2048, 512), 512), None),
    "cka 8192x256": (CUDA, True, _pair(rk.cka, efficient.linear_cka, (8192, 256), 256), None),
    "PCKA groups 256x77x512": (CUDA, True, _pair(rk.cka, efficient.linear_cka, (256, 77, 512), 512), None),
    "official alignment 64x100": (CPU, False, _pair(rk.losses.official_alignment, efficient.official_alignment, (64, 100), 100), None),
    "RCKALoss official 64x100": (BOTH, True, _rcka(official=True), None),
    "RCKALoss 64x100 vs the official formula": (CUDA, True, _rcka(official=False), None),
    "RBF cka 64x100 median": (BOTH, True, _pair(lambda a, b: rk.cka(a, b, kernel="rbf"), efficient.rbf_cka, (64, 100), 100), None),
    "RBF cka 64x100 sigma=10": (BOTH, False, _pair(lambda a, b: rk.cka(a, b, kernel="rbf", sigma=10.0),
                                                    lambda a, b: efficient.rbf_cka(a, b, 10.0), (64, 100), 100), None),
    "RBF cka 256x100 median": (BOTH, False, _pair(lambda a, b: rk.cka(a, b, kernel="rbf"), efficient.rbf_cka, (256, 100), 100), None),
    "RBF CKALoss 64x256x56x56 maps": (BOTH, False, _maps, None),
    "RBF cka 16384x256": (CUDA, True, _rbf_backends(16384, 256), 6 * 16384**2 * 256),
    "RBF cka 65536x256": (CUDA, True, _rbf_backends(65536, 256), 6 * 65536**2 * 256),
}


def main(argv=None):
    ap = _harness.parser(__doc__)
    ap.add_argument("--only", default="", help="comma list of case names")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    names = [k for k, (dev, quick, _, _) in CASES.items() if args.device in dev and (quick or not args.quick or gpu)]
    names = args.only.split(",") if args.only else names
    budget, reps = (0.5, 3) if args.quick else (2.0, 3)
    res = _harness.Results("efficient", args, {"cases": names, "budget_s": budget, "min_reps": reps, "dtype": "float32"})
    # every case in one call: each is timed in turn (its inputs freed before the next one's), memory afterwards
    recs = _harness.interleaved([(name, lambda m=CASES[name][2]: m(args.device)) for name in names], args.device, budget, reps,
                                ops=True)
    for r in recs:
        if r["case"] == "RCKALoss 64x100 vs the official formula":  # true CKA against the official alignment
            r["other_quantity"] = True
        if CASES[r["case"]][3] is not None:  # the matmul yardstick's FLOPs are a third of the CKA call's
            r["flops"] = CASES[r["case"]][3] // (3 if r["contender"] == "matmul" else 1)
    for name in names:
        if CASES[name][3] is not None:
            recs += [{"case": name, "contender": f"rcka[{b}]", "status": "unavailable", "error": st.reason}
                     for b, st in rk.available_backends(args.device).items() if b != "reference" and not st.available]
    res.add(recs)
    res.write()
    return res


if __name__ == "__main__":
    main()
