"""rk.compare against the peer libraries' layer-comparison tools (issue 10).

Same models, same data, same layers, one run: two MLPs (A: 6 hidden Linear+ReLU of
width 256 -> 12 layers; B: 5 of width 192 -> 10 layers) on n synthetic samples
(64 inputs), batches of 256, CPU.

  rcka default     rk.compare(...) as called by default (estimator="auto"; which estimator it
                   took is recorded)
  rcka exact       rk.compare(estimator="exact"): the full-data-set CKA
  rcka minibatch   rk.compare(estimator="minibatch"): Nguyen et al.
  pytorch-cka      cka.compute_cka (1.1.3): Nguyen et al., float32, clamped to [0, 1]
                   (its unclamped values are recorded too)
  torch-cka        torch_cka.CKA.compare (0.21): Nguyen et al., a Python loop over pairs
  ckatorch         ckatorch.CKA (1.0.3): takes (batch, tokens, features) outputs, so each
                   (b, d) output is handed to it as (1, b, d) (one b x b Gram); its batch
                   loop assigns each batch's CKA instead of summing, so its value is the
                   last batch's
  cka-pytorch      cka_pytorch.CKACalculator (1.1.3): Nguyen et al., float32 uncentred Grams,
                   epsilon 1e-4 added to its denominator
A peer that cannot be imported or fails is a recorded error. Every call gets freshly
built models (same seeds, same weights): torch-cka and ckatorch never remove their hooks.

Time: one process runs every implementation (and rcka minibatch and pytorch-cka at batch
sizes 64 and 1024 too), once to warm up (its values are the ones recorded), then ``--rounds``
rounds, each in a new random order, and reports the median (slow ones, over 5 s, run
2 rounds): contenders interleaved in one process see the same machine, which on a
shared machine matters more than anything else. The C library's default allocator.
Memory: one fresh process per implementation, with allocations of 64 KiB or more
mmap-backed (the RSS follows what is live): the peak RSS increase of the first call
("first call": it includes code and runtime pages the process touches for the first
time) and of a second, identical call ("extra memory": the working memory). Each
library is imported before anything is measured (the import's time and RSS are
recorded apart: pytorch-cka's imports matplotlib).

Values: rcka exact against rk.cka of the concatenated features in float64 (the
"oracle" process); every minibatch estimator against Nguyen's definition evaluated in
float64 with the textbook U-centred Grams (rcka_kernels.reference); how far the
minibatch values move with the batch size (64, 256, 1024) from the exact one.
Memory case: the exact estimator on 200,000 samples (batches generated on the fly)
with 4 + 4 layers of width 256.

    python -m benchmarks.bench_compare            # n = 10,000 (results/compare_cpu.{json,md})
    python -m benchmarks.bench_compare --quick    # n = 2,000, 20,000 for the memory case
Peers: `make bench` installs them (`pip install --no-deps ...`); ckatorch also needs
seaborn (and pandas), cka-pytorch lightning, both installed the same way.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks._harness import RESULTS, _malloc_setup, _malloc_trim, _status_kb, env_info, fmt_bytes, measure_peak  # noqa: E402

IN = 64
#: where the models run (set per worker process from its spec: "cpu" or "cuda")
DEVICE = "cpu"
A_WIDTHS = [256] * 6
B_WIDTHS = [192] * 5


def _mlp(widths, seed):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    dims = [IN] + widths
    return nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())], nn.Linear(dims[-1], 10))


def _layers(widths):
    return [str(i) for i in range(2 * len(widths))]  # every Linear and ReLU output


def _data(n, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


def _loader(x, y, bs):
    import torch

    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs, shuffle=False)


# ----------------------------------------------------------------------------- providers (in the worker)


def _rcka(est):
    def run(ma, mb, loader, la, lb):
        import rcka_kernels as rk

        res = rk.compare(ma, mb, loader, la, lb, estimator=est, progress=False)
        return res.values.tolist(), {"estimator": res.estimator}
    return run


def _pytorch_cka(ma, mb, loader, la, lb):
    import torch
    from cka import CKA, compute_cka

    raw = {}
    orig = CKA._compute_cka_matrix

    def keep(self, hxy, hxx, hyy):  # the library's value, and the same ratio without its clamp
        raw["v"] = (hxy.double() / torch.sqrt(hxx.double()[:, None] * hyy.double()[None])).tolist()
        return orig(self, hxy, hxx, hyy)

    CKA._compute_cka_matrix = keep
    try:
        out = compute_cka(ma, mb, loader, layers=la, model2_layers=lb, device=DEVICE, progress=False)[0]
    finally:
        CKA._compute_cka_matrix = orig
    return out.double().tolist(), {"values_unclamped": raw.get("v")}


def _torch_cka(ma, mb, loader, la, lb):
    from torch_cka import CKA

    c = CKA(ma, mb, model1_layers=la, model2_layers=lb, device=DEVICE)
    c.compare(loader)
    return c.export()["CKA"].double().tolist(), {}


def _ckatorch(ma, mb, loader, la, lb):
    import warnings

    import ckatorch.cka as ck

    orig = ck.cka_batch

    def batch_of_one(x, y):  # it takes (batch, tokens, features): a (b, d) output as one (1, b, d) sequence
        return orig(x.flatten(1)[None], y.flatten(1)[None])

    ck.cka_batch = batch_of_one
    try:
        c = ck.CKA(ma, mb, layers=la, second_layers=lb, device=DEVICE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "we suggest shuffle=True"; tqdm
            v = c(loader, epochs=1, f_extract=lambda b: {"input": b[0]}, f_args={})
    finally:
        ck.cka_batch = orig
    return v.double().tolist(), {}


def _cka_pytorch(ma, mb, loader, la, lb):
    from cka_pytorch.cka import CKACalculator

    c = CKACalculator(ma, mb, model1_layers=la, model2_layers=lb, device=DEVICE, verbose=False)
    return c.calculate_cka_matrix(loader, num_epochs=1).double().tolist(), {}


#: the module each provider imports: imported (and its time and memory recorded as import_s /
#: import_mem_bytes) before the measurement starts, so that the comparison times the work, not a
#: one-off import (pytorch-cka's imports matplotlib: ~0.5 s and ~30 MiB)
MODULES = {"rcka default": "rcka_kernels", "rcka exact": "rcka_kernels", "rcka minibatch": "rcka_kernels", "pytorch-cka 1.1.3": "cka",
           "torch-cka 0.21": "torch_cka", "ckatorch 1.0.3": "ckatorch", "cka-pytorch 1.1.3": "cka_pytorch.cka"}

PROVIDERS = {"rcka default": _rcka("auto"), "rcka exact": _rcka("exact"), "rcka minibatch": _rcka("minibatch"),
             "pytorch-cka 1.1.3": _pytorch_cka,
             "torch-cka 0.21": _torch_cka, "ckatorch 1.0.3": _ckatorch, "cka-pytorch 1.1.3": _cka_pytorch}


def _oracle(n, bs):
    """rk.cka of the concatenated features (float64) and Nguyen's definition with the textbook U-centred Grams."""
    import torch

    import rcka_kernels as rk
    from rcka_kernels import reference

    ma, mb = _mlp(A_WIDTHS, 1), _mlp(B_WIDTHS, 2)
    la, lb = _layers(A_WIDTHS), _layers(B_WIDTHS)
    x, _ = _data(n)

    def feats(m, names):
        out = {k: [] for k in names}
        mods = dict(m.named_modules())
        hs = [mods[k].register_forward_hook(lambda mod, i, o, k=k: out[k].append(o.detach())) for k in names]
        with torch.no_grad():
            for b in x.split(bs):
                m(b)
        for h in hs:
            h.remove()
        return [torch.cat(out[k]).double() for k in names]

    fa, fb = feats(ma, la), feats(mb, lb)
    exact = [[rk.cka(u - u.mean(0), v - v.mean(0)).item() for v in fb] for u in fa]
    hxy = torch.zeros(len(la), len(lb), dtype=torch.float64)
    hxx, hyy = torch.zeros(len(la), dtype=torch.float64), torch.zeros(len(lb), dtype=torch.float64)
    for s in range(0, n, bs):
        b = min(bs, n - s)
        if b < 4:
            continue
        ka = torch.stack([reference.centered_gram(u[s:s + b], "linear", None, True).reshape(-1) for u in fa])
        kb = torch.stack([reference.centered_gram(v[s:s + b], "linear", None, True).reshape(-1) for v in fb])
        hxy += ka @ kb.T / (b * (b - 3))
        hxx += (ka * ka).sum(1) / (b * (b - 3))
        hyy += (kb * kb).sum(1) / (b * (b - 3))
    nguyen = (hxy / torch.sqrt(hxx[:, None] * hyy[None])).tolist()
    out = {"status": "ok", "exact": exact, "nguyen": nguyen}
    try:  # pytorch-cka's own code on float64 models and data: its definition without its float32 rounding
        x64 = x.double()
        out["pytorch_cka_float64"] = _pytorch_cka(ma.double(), mb.double(), _loader(x64, x64[:, 0], bs), la, lb)[1]["values_unclamped"]
    except Exception as e:  # not installed, or failed: recorded
        out["pytorch_cka_float64_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def _memory_case(n, bs):
    """The exact estimator over n samples generated batch by batch: peak RSS does not grow with n."""
    import torch

    import rcka_kernels as rk

    ma, mb = _mlp([256] * 2, 1).to(DEVICE), _mlp([256] * 2, 2).to(DEVICE)
    la, lb = _layers([256] * 2), _layers([256] * 2)

    def batches():
        g = torch.Generator().manual_seed(0)
        for s in range(0, n, bs):
            yield torch.randn(min(bs, n - s), IN, generator=g)

    return ma, mb, batches(), la, lb, lambda ma, mb, loader, la, lb: (
        rk.compare(ma, mb, loader, la, lb, estimator="exact", progress=False).values.tolist(), {})


def _models():
    """Fresh models for every call (same seeds, same weights): some peers never remove their hooks."""
    return _mlp(A_WIDTHS, 1).to(DEVICE), _mlp(B_WIDTHS, 2).to(DEVICE)


def _peak(fn):
    """(seconds, peak memory increase in bytes, fn's result) of one call where the models run."""
    return measure_peak(fn, DEVICE)


#: the implementations also timed at batch sizes 64 and 1024
SWEPT = ("rcka minibatch", "pytorch-cka 1.1.3")
#: a case whose warm-up run took longer than this runs 2 timed rounds (its median is not in doubt)
SLOW_S = 5.0


def _timing(spec):
    """Every case in this one process: a warm-up run (values), then rounds in random orders."""
    import importlib
    import random
    import statistics

    x, y = _data(spec["n"])
    cases = {}  # label -> (provider, batch size)
    for prov in spec["providers"]:
        cases[prov] = (prov, spec["bs"])
    for prov in SWEPT:
        if prov in spec["providers"]:
            for b in spec["sweep"]:
                cases[f"{prov}, batch {b}"] = (prov, b)
    loaders = {b: _loader(x, y, b) for _, b in cases.values()}
    out = {}
    for label, (prov, b) in cases.items():
        try:
            importlib.import_module(MODULES[prov])
            la, lb = _layers(A_WIDTHS), _layers(B_WIDTHS)
            t0 = time.perf_counter()
            values, extra = PROVIDERS[prov](*_models(), loaders[b], la, lb)
            out[label] = {"status": "ok", "warmup_s": time.perf_counter() - t0, "values": values, "times": [], **extra}
        except Exception as e:  # an import error or a failure is a recorded result
            out[label] = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    ok = [k for k, r in out.items() if r["status"] == "ok"]
    for r in range(spec["rounds"]):
        for label in random.sample(ok, len(ok)):
            if out[label]["warmup_s"] > SLOW_S and r >= 2:
                continue
            prov, b = cases[label]
            ma, mb = _models()
            t0 = time.perf_counter()
            PROVIDERS[prov](ma, mb, loaders[b], _layers(A_WIDTHS), _layers(B_WIDTHS))
            out[label]["times"].append(time.perf_counter() - t0)
    for label in ok:
        out[label]["time_s"] = statistics.median(out[label]["times"])
    return {"status": "ok", "cases": out}


def _worker(spec):
    import torch

    global DEVICE
    DEVICE = spec.get("device", "cpu")
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    if spec["kind"] == "oracle":
        return _oracle(spec["n"], spec["bs"])
    if spec["kind"] == "timing":
        return _timing(spec)
    if DEVICE == "cpu":
        _malloc_setup()  # memory: allocations >= 64 KiB are mmap-backed, so the RSS follows what is live
    imported = {}
    try:
        import importlib

        mod = "rcka_kernels" if spec["kind"] == "memory_case" else MODULES[spec["provider"]]
        _malloc_trim()
        rss0, t0 = _status_kb("VmRSS") * 1024, time.perf_counter()
        importlib.import_module(mod)
        imported = {"import_s": round(time.perf_counter() - t0, 3), "import_mem_bytes": _status_kb("VmRSS") * 1024 - rss0}
    except ImportError as e:
        return {"status": "error", "error": f"{type(e).__name__}: {e}"}
    try:
        if spec["kind"] == "memory_case":
            ma, mb, loader, la, lb, fn = _memory_case(spec["n"], spec["bs"])
            wall, peak, _ = _peak(lambda: fn(ma, mb, loader, la, lb))
            return {"status": "ok", "time_s": wall, "peak_mem_bytes": peak, **imported}
        fn = PROVIDERS[spec["provider"]]
        x, y = _data(spec["n"])
        loader = _loader(x, y, spec["bs"])
        la, lb = _layers(A_WIDTHS), _layers(B_WIDTHS)
        runs = []
        for _ in range(2):  # the first call in this process, then the same call again
            ma, mb = _models()
            runs.append(_peak(lambda: fn(ma, mb, loader, la, lb)))
            ma = mb = None
    except Exception as e:
        return {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"status": "ok", "first_call_mem_bytes": runs[0][1], "peak_mem_bytes": runs[1][1],
            "memory_pass_s": [round(r[0], 3) for r in runs], **imported}


def _run(spec, timeout):
    """One case in a fresh interpreter; a timeout or crash is a recorded result."""
    cmd = [sys.executable, "-m", "benchmarks.bench_compare", "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "error": f"more than {timeout:.0f} s"}
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("@@")), None)
    if line is None:
        return {**spec, "status": "error", "error": f"exit {p.returncode}: {p.stderr.strip()[-300:]}"}
    return {**spec, **json.loads(line[2:]), "process_s": round(time.perf_counter() - t0, 1)}


def _maxdiff(a, b):
    return max(abs(u - v) for ra, rb in zip(a, b) for u, v in zip(ra, rb))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--memory-n", type=int)
    ap.add_argument("--rounds", type=int, help="timed rounds after the warm-up (default 7, quick 3)")
    ap.add_argument("--timeout", type=float, help="per case and run (default 120 s, 60 s quick)")
    ap.add_argument("--only", help="comma-separated providers")
    ap.add_argument("--tag", default="")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the models run (cuda: memory is max_memory_allocated; the oracle stays on the CPU)")
    ap.add_argument("--out", help="folder for the results (default benchmarks/results)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = _worker(json.loads(args.worker))
        sys.stdout.write("\n@@" + json.dumps(res) + "\n")
        return None
    n = args.n or (2000 if args.quick else 10_000)
    mem_n = args.memory_n or (20_000 if args.quick else 200_000)
    timeout = args.timeout or (60.0 if args.quick else 120.0)
    rounds = args.rounds or (3 if args.quick else 7)
    bs = args.batch_size
    dev = args.device
    meta = env_info(dev)
    meta["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    meta.update({"n": n, "batch_size": bs, "models": {"a": f"MLP {IN}->{A_WIDTHS}->10", "b": f"MLP {IN}->{B_WIDTHS}->10"},
                 "layers_a": len(_layers(A_WIDTHS)), "layers_b": len(_layers(B_WIDTHS)), "memory_n": mem_n, "rounds": rounds,
                 "slow_s": SLOW_S})
    print(f"rk.compare vs peers: n={n}, batch {bs}, {meta['layers_a']} x {meta['layers_b']} layers, {meta['cpu']} "
          f"({meta['cpu_count']} cores), load {meta['loadavg_start']}", flush=True)
    oracle = _run({"kind": "oracle", "n": n, "bs": bs}, 4 * timeout)
    provs = [p for p in PROVIDERS if not args.only or p in args.only.split(",")]
    sweep_bs = [64, 1024]
    ncases = len(provs) + len(sweep_bs) * len([p for p in SWEPT if p in provs])
    timing = _run({"kind": "timing", "n": n, "bs": bs, "providers": provs, "sweep": sweep_bs, "rounds": rounds, "device": dev},
                  timeout * (rounds + 1) * ncases)
    tcases = timing.get("cases", {})
    records, sweep = [], []
    labels = {**{p: (p, bs) for p in provs}, **{f"{p}, batch {b}": (p, b) for p in SWEPT if p in provs for b in sweep_bs}}
    for label, (prov, b) in labels.items():
        t = tcases.get(label) or {"status": timing.get("status", "error"), "error": timing.get("error", "")}
        r = {"provider": prov, "bs": b, **t}
        if label in provs:
            mem = _run({"kind": "memory", "provider": prov, "n": n, "bs": bs, "device": dev}, 3 * timeout)
            if r["status"] == "ok" and mem.get("status") == "ok":
                r.update({k: mem[k] for k in ("peak_mem_bytes", "first_call_mem_bytes", "memory_pass_s", "import_s", "import_mem_bytes")})
            elif r["status"] == "ok":
                r["memory_error"] = mem.get("error", mem.get("status"))
            records.append(r)
        else:
            sweep.append(r)
        print(f"  {label:<28} {r['status']:<8} " + (f"{r['time_s']:.2f} s (median of {len(r['times'])}), +"
                                                    f"{fmt_bytes(r.get('peak_mem_bytes'))}" if r["status"] == "ok"
                                                    else r.get("error", "")[:160]), flush=True)
    mem = _run({"kind": "memory_case", "n": mem_n, "bs": 1024, "device": dev}, 4 * timeout)
    print(f"  exact estimator, n={mem_n}, 4 x 4 layers of width 256: "
          + (f"{mem['time_s']:.1f} s, +{fmt_bytes(mem['peak_mem_bytes'])}" if mem["status"] == "ok" else mem.get("error", "")), flush=True)
    # values
    if oracle.get("status") == "ok":
        for r in records + sweep:
            if r.get("status") != "ok":
                continue
            r["max_abs_vs_exact"] = _maxdiff(r["values"], oracle["exact"])
            if r["provider"] != "rcka exact" and r.get("estimator") != "exact" and r["bs"] == bs:
                r["max_abs_vs_nguyen"] = _maxdiff(r["values"], oracle["nguyen"])
                if r.get("values_unclamped"):
                    r["max_abs_unclamped_vs_nguyen"] = _maxdiff(r["values_unclamped"], oracle["nguyen"])
                if oracle.get("pytorch_cka_float64") and r["provider"].startswith("rcka"):
                    r["max_abs_vs_pytorch_cka_float64"] = _maxdiff(r["values"], oracle["pytorch_cka_float64"])
        if oracle.get("pytorch_cka_float64"):
            meta["pytorch_cka_float64_vs_nguyen"] = _maxdiff(oracle["pytorch_cka_float64"], oracle["nguyen"])
        meta["pytorch_cka_float64_error"] = oracle.get("pytorch_cka_float64_error")
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out = {"meta": meta, "oracle_status": oracle.get("status"), "oracle_error": oracle.get("error"), "records": records,
           "batch_size_sweep": sweep, "memory_case": mem}
    tag = ("_" + args.tag if args.tag else "") + ("_quick" if args.quick else "")
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"compare{tag}_{dev}.json"
    for r in records + sweep + [mem]:
        r.pop("values_unclamped", None) if r.get("provider") != "pytorch-cka 1.1.3" else None
    path.write_text(json.dumps(out, indent=1))
    md = _markdown(out)
    path.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return out


def _markdown(out):
    m = out["meta"]
    gpu = m.get("device", "cpu") != "cpu"
    where = f"{m['device_name']}, CUDA {m.get('cuda')}" if gpu else f"{m['cpu']}, {m['cpu_count']} cores"
    mem_what = "peak max_memory_allocated increase" if gpu else "peak RSS increase"
    lines = [f"# rk.compare vs peers ({m['date']}, {where}, torch {m['torch']}, commit {m['git_commit'][:10]}"
             + (", uncommitted changes" if m.get("git_dirty") else "") + ")",
             "", f"`{' '.join(m['argv'])}`; load average {m['loadavg_start']} before, {m['loadavg_end']} after; "
             f"OMP_WAIT_POLICY={m.get('OMP_WAIT_POLICY')!r}.", "",
             f"{m['models']['a']} ({m['layers_a']} layers) vs {m['models']['b']} ({m['layers_b']} layers), n={m['n']}, "
             f"batch {m['batch_size']}. Time: every implementation in one process, interleaved: a warm-up run, then "
             f"{m['rounds']} rounds in random orders (2 for those over {m['slow_s']:.0f} s), median, forward passes included. "
             f"Memory: one fresh process each, {mem_what} of a second identical call (working memory) and of the "
             "first call (which also touches code and runtime pages for the first time). Each library is imported before "
             "anything is measured (its import is the last column).", "",
             "| implementation | status | time (median) | extra memory | first call | max abs vs exact CKA | "
             "max abs vs Nguyen (float64) | import |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | {r['status']}: {r.get('error', '')[:120]} | | | | | | |")
            continue
        ng = r.get("max_abs_vs_nguyen")
        ngs = "" if ng is None else f"{ng:.1e}"
        if r.get("max_abs_unclamped_vs_nguyen") is not None:
            ngs += f" (unclamped: {r['max_abs_unclamped_vs_nguyen']:.1e})"
        ex = r.get("max_abs_vs_exact")
        imp = f"{r['import_s']:.2f} s, {fmt_bytes(r['import_mem_bytes'])}" if "import_s" in r else ""
        spread = f" ({min(r['times']):.2f}-{max(r['times']):.2f})" if len(r["times"]) > 1 else ""
        mem = fmt_bytes(r["peak_mem_bytes"]) if "peak_mem_bytes" in r else f"error: {r.get('memory_error', '')}"[:80]
        status = f"ok ({r['estimator']})" if r["provider"] == "rcka default" else "ok"
        lines.append(f"| {r['provider']} | {status} | {r['time_s']:.2f} s{spread} | {mem} | {fmt_bytes(r.get('first_call_mem_bytes'))} | "
                     f"{'' if ex is None else f'{ex:.1e}'} | {ngs} | {imp} |")
    if m.get("pytorch_cka_float64_vs_nguyen") is not None:
        ours = [r for r in out["records"] if r.get("max_abs_vs_pytorch_cka_float64") is not None]
        lines += ["", "pytorch-cka's own code run on float64 copies of the models and data (its unclamped values): "
                  f"{m['pytorch_cka_float64_vs_nguyen']:.1e} max abs from Nguyen's definition evaluated in float64 on the "
                  "float32 models' features (the float64 models' features differ from those by float32 rounding); "
                  + "; ".join(f"{r['provider']} {r['max_abs_vs_pytorch_cka_float64']:.1e} from it" for r in ours)
                  + ". So its float32 values' distance from the definition (above) is its own float32 rounding."]
    if out["batch_size_sweep"]:
        runs = {(r["provider"], r["bs"]): r for r in out["records"] + out["batch_size_sweep"] if r["status"] == "ok"}
        lines += ["", "By batch size (times from the same interleaved rounds; the value's distance from the exact "
                  "full-data-set CKA):", "", "| batch size | " + " | ".join(f"{p} time | {p} max abs vs exact" for p in SWEPT) + " |",
                  "|---|" + "---|---|" * len(SWEPT)]
        for b in sorted({r["bs"] for r in out["batch_size_sweep"]} | {m["batch_size"]}):
            cells = []
            for p in SWEPT:
                r = runs.get((p, b))
                cells += [f"{r['time_s']:.2f} s", f"{r.get('max_abs_vs_exact', float('nan')):.3f}"] if r else ["", ""]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
    mem = out["memory_case"]
    if mem.get("status") == "ok":
        lines += ["", f"Exact estimator on {m['memory_n']:,} samples (4 + 4 layers of width 256, batches of 1024 generated on the fly): "
                  f"{mem['time_s']:.1f} s, +{fmt_bytes(mem['peak_mem_bytes'])} ({mem_what}; first call in a fresh process)."]
    else:
        lines += ["", f"Memory case: {mem.get('status')}: {mem.get('error')}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
