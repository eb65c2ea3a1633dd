"""rcka-kernels against the best plain-PyTorch formulation, in one process, interleaved.

    python -m benchmarks.bench_efficient                 # the committed CPU table
    python -m benchmarks.bench_efficient --quick         # three cases, seconds
    python -m benchmarks.bench_efficient --device cuda --backends torch,triton --out DIR

For every linear entry point (cka biased and debiased, hsic, the official
alignment, RCKALoss in both modes, batched PCKA-sized groups) it times one
forward + backward with the student (x) requiring grad and the teacher (y)
detached, against the efficient formula of benchmarks/efficient.py: the
contenders take turns in every repeat and the medians are compared as a ratio
(ours / baseline; below 1 is faster). With each: aten ops per call (kernel
launches on a GPU, benchmarks.efficient.count_ops) and the peak extra memory of
one call (CPU: peak RSS over the RSS before it, with allocations of 64 KiB and
more mmap-backed so the RSS follows what is live, set after all timing, which
runs with the C library's default allocator; GPU: max_memory_allocated).
No time is asserted anywhere; the JSON records the device, versions, date,
commit and the machine's load average.
"""

from __future__ import annotations

import os

_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "(unset)")  # as the process started (_harness sets a default)

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

import rcka_kernels as rk
from benchmarks import _harness, efficient

Tensor = torch.Tensor

# (name, op, shape of x (..., n, p), q); op picks the contenders below
CASES = [
    ("cka 64x100", "cka", (64, 100), 100),
    ("cka 128x100", "cka", (128, 100), 100),
    ("cka 256x1000", "cka", (256, 1000), 1000),
    ("cka 1024x1000", "cka", (1024, 1000), 1000),
    ("cka 2048x512", "cka", (2048, 512), 512),
    ("cka 8192x256", "cka", (8192, 256), 256),
    ("cka 4096x256, q=64", "cka", (4096, 256), 64),
    ("PCKA groups 256x77x512", "cka", (256, 77, 512), 512),
    ("PCKA groups 256x64x256", "cka", (256, 64, 256), 256),
    ("debiased cka 64x100", "cka_debiased", (64, 100), 100),
    ("debiased cka 2048x512", "cka_debiased", (2048, 512), 512),
    ("debiased groups 256x64x256", "cka_debiased", (256, 64, 256), 256),
    ("official alignment 64x100", "official", (64, 100), 100),
    ("RCKALoss 64x100", "rcka", (64, 100), 100),
    ("RCKALoss official 64x100", "rcka_official", (64, 100), 100),
    ("RCKALoss 64x100 vs the official formula", "rcka_vs_official", (64, 100), 100),
    ("RCKALoss 256x100", "rcka", (256, 100), 100),
    ("RCKALoss 64x1000", "rcka", (64, 1000), 1000),
]
QUICK = ["cka 64x100", "cka 2048x512", "RCKALoss 64x100"]


def contenders(op: str, backend: str) -> Dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """{"ours": ..., "baseline": ...} for one op."""
    if op == "cka":
        return {"ours": lambda x, y: rk.cka(x, y, backend=backend), "baseline": efficient.linear_cka}
    if op == "cka_debiased":
        return {"ours": lambda x, y: rk.cka(x, y, debiased=True, backend=backend), "baseline": efficient.linear_cka_debiased}
    if op == "official":
        return {"ours": lambda x, y: rk.losses.official_alignment(x, y, backend=backend), "baseline": efficient.official_alignment}
    if op in ("rcka", "rcka_official"):
        official = op == "rcka_official"
        loss = rk.RCKALoss(intra_weight=15.0, inter_weight=15.0, official=official, backend=backend)
        return {"ours": loss, "baseline": lambda s, t: efficient.rcka_loss(s, t, 15.0, official)}
    if op == "rcka_vs_official":  # the yardstick for both modes: the official code's naive formula
        loss = rk.RCKALoss(intra_weight=15.0, inter_weight=15.0, backend=backend)
        return {"ours": loss, "baseline": lambda s, t: efficient.rcka_loss(s, t, 15.0, official=True)}
    raise ValueError(op)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(fn, x, y) -> None:
    fn(x, y).sum().backward()
    x.grad = None


def _peak_extra_bytes(fn, x, y, device: str) -> int:
    """Peak memory of one forward + backward above what was live before it."""
    return _harness.measure_peak(lambda: _step(fn, x, y), device)[1]


def _inputs(shape, q: int, device: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device).requires_grad_()
    y = (0.5 * torch.randn(*shape[:-1], q, generator=gen)).to(device)
    k = min(shape[-1], q)
    y[..., :k] += x.detach()[..., :k]
    return x, y


def measure(name: str, op: str, shape, q: int, device: str, backend: str, budget_s: float, min_reps: int) -> dict:
    """Values, ops and time of one case (memory: ``measure_memory``, in a second pass)."""
    x, y = _inputs(shape, q, device)
    fns = contenders(op, backend)
    rec = {"case": name, "op": op, "shape": list(shape), "q": q, "backend": backend, "device": device, "dtype": "float32"}
    vals = {k: float(f(x, y).detach().double().sum()) for k, f in fns.items()}
    rec["value_rel_diff"] = abs(vals["ours"] - vals["baseline"]) / max(abs(vals["baseline"]), 1e-30)
    rec["ops"] = {k: len(efficient.count_ops(lambda f=f: f(x, y))) for k, f in fns.items()}
    x.grad = None
    for f in fns.values():  # warm-up
        _step(f, x, y)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    t_end = time.perf_counter() + budget_s
    order = list(fns)
    shuffle = random.Random(0).shuffle
    while len(times["ours"]) < min_reps or (time.perf_counter() < t_end and len(times["ours"]) < 2000):
        shuffle(order)  # every repeat runs each contender once, in a random order (what ran just before
        for k in order:  # a call sets its cache state: a fixed alternation favours one side)
            f = fns[k]
            _sync(device)
            t0 = time.perf_counter()
            _step(f, x, y)
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    rec["reps"] = len(times["ours"])
    rec["median_s"] = {k: statistics.median(v) for k, v in times.items()}
    rec["ratio"] = rec["median_s"]["ours"] / rec["median_s"]["baseline"]
    return rec


def measure_memory(rec: dict) -> None:
    """The peak extra memory of one call of each contender, into ``rec``. On the CPU this
    runs after every timing: it makes allocations of 64 KiB and more mmap-backed (so the
    RSS follows what is live), which would also make each such allocation page-fault
    during the timed calls, a cost a normal process does not pay."""
    x, y = _inputs(rec["shape"], rec["q"], rec["device"])
    fns = contenders(rec["op"], rec["backend"])
    rec["peak_extra_bytes"] = {k: _peak_extra_bytes(f, x, y, rec["device"]) for k, f in fns.items()}


def _ms(seconds: float) -> str:
    return _harness.fmt_ms(seconds * 1e3)


def table(records: List[dict]) -> str:
    lines = [
        "| case | backend | ours | plain PyTorch | ratio | ops ours / plain | extra memory ours / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        t, o, m = r["median_s"], r["ops"], r["peak_extra_bytes"]
        lines.append(
            f"| {r['case']} | {r['backend']} | {_ms(t['ours'])} | {_ms(t['baseline'])} | "
            f"**{r['ratio']:.2f}** | {o['ours']} / {o['baseline']} | "
            f"{_harness.fmt_bytes(m['ours'])} / {_harness.fmt_bytes(m['baseline'])} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backends", default=None, help="comma list (default: torch on cpu, torch,triton on cuda)")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    ap.add_argument("--only", default="", help="comma list of case names")
    ap.add_argument("--time-budget", type=float, default=6.0, help="seconds of repeats per case and backend")
    ap.add_argument("--min-reps", type=int, default=7)
    ap.add_argument("--out", default=str(_harness.RESULTS), help="folder for the JSON and markdown")
    ap.add_argument("--tag", default="")
    args, _ = ap.parse_known_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    backends = (args.backends or ("torch,triton" if args.device == "cuda" else "torch")).split(",")
    names = QUICK if args.quick else [c[0] for c in CASES]
    if args.only:
        names = args.only.split(",")
    meta = _harness.env_info(args.device)
    meta.update(script="bench_efficient", OMP_WAIT_POLICY=_OMP_WAIT_POLICY, argv=["-m", "benchmarks.bench_efficient", *(argv or [])])
    records = []
    for name, op, shape, q in CASES:
        if name not in names:
            continue
        for backend in backends:
            st = rk.available_backends(args.device)[backend]
            if not st.available:
                records.append({"case": name, "backend": backend, "status": "unavailable", "reason": st.reason})
                continue
            try:
                rec = measure(name, op, shape, q, args.device, backend, args.time_budget, args.min_reps)
            except Exception as e:  # a failure is a recorded result, not a crash
                rec = {"case": name, "backend": backend, "status": "error", "error": f"{type(e).__name__}: {e}"}
            records.append(rec)
            if "ratio" in rec:
                print(f"{name:28s} {backend:6s} ours {_ms(rec['median_s']['ours']):>10s}  plain {_ms(rec['median_s']['baseline']):>10s}"
                      f"  ratio {rec['ratio']:.2f}  ops {rec['ops']['ours']}/{rec['ops']['baseline']}", flush=True)
            else:
                print(f"{name:28s} {backend:6s} {rec['status']}: {rec.get('reason') or rec.get('error')}", flush=True)
    if args.device == "cpu":
        _harness._malloc_setup()  # allocations >= 64 KiB are mmap-backed: the RSS follows what is live
    for rec in records:
        if "ratio" in rec:
            measure_memory(rec)
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"efficient{('_' + args.tag) if args.tag else ''}_{args.device}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    ok = [r for r in records if "ratio" in r]
    head = (f"{meta['device_name']}, torch {meta['torch']}, load average {meta['loadavg_start']} -> {meta['loadavg_end']}, "
            f"OMP_WAIT_POLICY {meta['OMP_WAIT_POLICY']}")
    (out / f"{stem}.md").write_text(f"# {stem}\n\n{head}\n\n{table(ok)}\n")
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
