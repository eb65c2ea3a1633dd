"""Shared benchmark harness: every case runs in a fresh subprocess.

- Time: median of ``repeats`` forward(+backward) runs after ``warmup`` runs
  (fewer repeats when one run is slow: at least one timed run after warm-up).
- Memory, CPU: peak RSS increase over the RSS before the measured run, read
  from /proc/self/status (VmHWM, reset through /proc/self/clear_refs) in a
  process that ran nothing else. GPU: torch.cuda.max_memory_allocated delta.
- An out-of-memory, an error or a timeout is a recorded result ("oom", "error",
  "timeout", "killed"), not a crash; in a sweep, a provider that fails at some n
  is not run at larger n (recorded as "skipped").
- Every record carries the config; every JSON file carries the device name,
  torch/triton versions, date and git commit (``meta``).

Worker entry point: ``python -m benchmarks._harness '<json spec>'``.
"""

from __future__ import annotations

import os

# Threads that sleep instead of spinning at barriers: on a machine whose cores are
# shared (CI, other jobs), spinning OpenMP threads make small ops 10-100x slower and
# the timings meaningless. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datetime
import json
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
_MARK = "@@RESULT@@"


# ----------------------------------------------------------------------------- environment


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def env_info(device: str = "cpu") -> dict:
    import torch

    try:
        import triton

        triton_v = triton.__version__
    except Exception as e:  # triton is optional
        triton_v = f"unavailable ({type(e).__name__})"
    info = {
        "device": device,
        "device_name": _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_v,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "rcka_kernels", "csrc", "benchmarks", ":!benchmarks/results")),
        "argv": sys.argv,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
    if device == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import rcka_kernels as rk

        info["backends"] = {k: (v.available, v.reason) for k, v in rk.available_backends().items()}
    except Exception as e:
        info["backends"] = f"{type(e).__name__}: {e}"
    return info


# ----------------------------------------------------------------------------- worker (in the subprocess)


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _is_oom(e: BaseException) -> bool:
    s = f"{type(e).__name__}: {e}".lower()
    return isinstance(e, MemoryError) or "out of memory" in s or "can't allocate" in s or "cannot allocate" in s or "outofmemory" in s


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_setup() -> None:
    """Allocations >= 64 KiB go to mmap (returned to the OS on free), so the RSS
    follows what is live instead of what glibc's heap kept from the warm-up."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def measure_peak(fn, device: str = "cpu"):
    """(seconds, peak memory above what was live before, fn's result) of one call of ``fn``:
    on a GPU the ``max_memory_allocated`` increase, on the CPU the peak RSS increase (VmHWM
    reset to VmRSS first, freed heap trimmed; see ``_malloc_setup`` for RSS that follows what
    is live)."""
    import torch

    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base, out
    _malloc_trim()
    base = _status_kb("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, _status_kb("VmHWM") * 1024 - base, out


def _worker(spec: dict) -> dict:
    import torch

    from benchmarks import providers

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cfg = spec["config"]
    if spec.get("kind") == "oracle":
        v, kind = providers.oracle(spec["quantity"], cfg, spec.get("ref_max_n", 2048))
        return {"status": "ok", "value": v, "ref_kind": kind}
    prov = providers.registry()[spec["provider"]]
    cuda = cfg.get("device", "cpu") == "cuda"
    x, y = providers.make_inputs(cfg, requires_grad=prov.grad)
    fn = prov.make(cfg, x, y)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def once():
        if prov.grad:
            x.grad = y.grad = None
            out = fn()
            out.backward()
        else:
            with torch.no_grad():
                out = fn()
        sync()
        return out

    value, first = None, 0.0
    for _ in range(spec.get("warmup", 1)):
        t0 = time.perf_counter()
        out = once()
        first = time.perf_counter() - t0
        value = providers.provider_value(prov, cfg, out)
        del out
    # memory: one measured run in a process that has run only this case
    dt, peak, out = measure_peak(once, "cuda" if cuda else "cpu")
    times = [dt]
    if value is None:  # no warm-up: the measured run gives the value
        value = providers.provider_value(prov, cfg, out)
    del out
    budget = spec.get("time_budget_s", 20.0)
    while len(times) < spec.get("repeats", 5) and sum(times) + first < budget:
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return {
        "status": "ok",
        "value": value,
        "time_ms": 1e3 * statistics.median(times),
        "times_ms": [round(1e3 * t, 4) for t in times],
        "peak_mem_bytes": int(max(0, peak)),
        "mode": "fwd+bwd" if prov.grad else "fwd",
        "warmup": spec.get("warmup", 1),
    }


def _isolated(spec: dict) -> dict:
    """Run one spec in this (fresh) process: memory cap, then the worker; never raises."""
    cap = spec.get("mem_cap_gb")
    if spec["config"].get("device", "cpu") == "cpu":
        _malloc_setup()
    if cap and spec["config"].get("device", "cpu") == "cpu":
        # address-space cap: an allocation beyond it raises instead of swapping the machine.
        # It counts from what this process has mapped already (torch itself: about 1 GiB
        # for a CPU build, several for a CUDA build), so it means the same for every build.
        lim = _status_kb("VmSize") * 1024 + int(cap * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    try:
        return _worker(spec)
    except BaseException as e:  # recorded, never raised
        return {"status": "oom" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {str(e)[:400]}"}


def _worker_main(arg: str) -> None:
    res = _isolated(json.loads(arg))
    sys.stdout.write("\n" + _MARK + json.dumps(res) + "\n")
    sys.stdout.flush()


def _fork_child(spec: dict, conn) -> None:
    conn.send(_isolated(spec))
    conn.close()


_PRELOAD = ["torch", "rcka_kernels", "benchmarks._harness", "benchmarks.providers", "benchmarks._preload"]


def _run_forked(spec: dict, timeout_s: float) -> dict:
    """A child forked from a fork server that imported torch and ran nothing (a plain
    fork of a parent that has run OpenMP work can deadlock): a process of its own
    (own peak RSS), without paying the interpreter start-up for every case."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    recv, send = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_fork_child, args=(spec, send), daemon=True)
    proc.start()
    send.close()
    res = None
    if recv.poll(timeout_s):
        try:
            res = recv.recv()
        except EOFError:
            res = None
    proc.join(5 if res is not None else 0.1)
    wall = round(time.perf_counter() - t0, 1)
    if proc.is_alive():
        proc.kill()
        proc.join()
        if res is None:
            return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s", "wall_s": wall}
    if res is None:
        if proc.exitcode == -signal.SIGKILL:
            return {"status": "killed", "error": "killed by SIGKILL (likely the out-of-memory killer)", "wall_s": wall}
        return {"status": "error", "error": f"worker exited with {proc.exitcode}", "wall_s": wall}
    res["wall_s"] = wall
    return res


# ----------------------------------------------------------------------------- runner (in the parent)


def run_case(spec: dict, timeout_s: float, isolation: str = "auto") -> dict:
    """Run one spec in a fresh process; always returns a result dict.

    ``isolation``: "fork" (CPU, Linux: a child of a clean fork server, fast), "interpreter" (a new
    Python: always used for CUDA, where forking is unsafe), "auto" picks."""
    cuda = spec["config"].get("device", "cpu") == "cuda"
    if isolation == "auto":
        isolation = "fork" if (not cuda and sys.platform.startswith("linux")) else "interpreter"
    if isolation == "fork":
        return _run_forked(spec, timeout_s)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "benchmarks._harness", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s", "wall_s": round(time.perf_counter() - t0, 1)}
    wall = round(time.perf_counter() - t0, 1)
    for line in reversed(out.splitlines()):
        if line.startswith(_MARK):
            res = json.loads(line[len(_MARK):])
            res["wall_s"] = wall
            return res
    if proc.returncode in (-signal.SIGKILL, 137):
        return {"status": "killed", "error": "killed by SIGKILL (likely the out-of-memory killer)", "wall_s": wall}
    return {"status": "error", "error": f"exit {proc.returncode}: {err.strip()[-400:]}", "wall_s": wall}


class Bench:
    """Collects records of one benchmark script and writes them out."""

    def __init__(self, name: str, args, device: str = "cpu"):
        self.name, self.args, self.device = name, args, device
        self.records: List[dict] = []
        self._oracles: Dict[str, tuple] = {}
        self._failed: Dict[tuple, str] = {}
        self.meta = env_info(device)
        self.meta["bench"] = name

    def oracle(self, quantity: str, cfg: dict) -> tuple:
        key = json.dumps([quantity, {k: v for k, v in cfg.items() if k not in ("dtype", "device")}], sort_keys=True)
        if key not in self._oracles:
            ocfg = dict(cfg, dtype="float32")
            spec = {"kind": "oracle", "quantity": quantity, "config": ocfg, "ref_max_n": self.args.ref_max_n}
            res = run_case(spec, self.args.timeout, self.args.isolation)
            self._oracles[key] = (res.get("value"), res.get("ref_kind", res.get("error")))
        return self._oracles[key]

    def run(self, provider: str, cfg: dict, group: Optional[tuple] = None, verbose: bool = True, **overrides) -> dict:
        """Run one case unless the provider failed on a smaller case of the same group."""
        from benchmarks import providers

        cfg = dict(cfg, device=self.device)
        prov = providers.registry().get(provider)
        rec = {"bench": self.name, "provider": provider, "config": cfg}
        gkey = (provider,) + tuple(group or ())
        reason = "unknown provider" if prov is None else prov.supports(cfg)
        if reason:
            rec.update(status="unsupported", error=reason)
        elif gkey in self._failed:
            rec.update(status="skipped", error=f"not run: failed at a smaller size ({self._failed[gkey]})")
        else:
            rec["note"] = prov.note
            spec = {"provider": provider, "config": cfg, "warmup": self.args.warmup, "repeats": self.args.repeats,
                    "time_budget_s": self.args.time_budget, "mem_cap_gb": self.args.mem_cap_gb}
            spec.update(overrides)  # e.g. warmup=0, repeats=1 for a baseline that runs for minutes
            rec["loadavg_before"] = round(os.getloadavg()[0], 2)
            limit = overrides.get("timeout", self.args.timeout)
            rec.update(run_case(spec, limit, self.args.isolation))
            rec["loadavg_after"] = round(os.getloadavg()[0], 2)
            if rec["status"] != "ok":
                self._failed[gkey] = f"{rec['status']} at n={cfg.get('n')}"
            elif group is not None and rec["time_ms"] / 1e3 * 4 * (1 + spec["warmup"]) > limit:
                # the next size costs at least 4x per run (n^2 work), and it needs warm-up + one timed run
                self._failed[gkey] = (f"one run took {rec['time_ms'] / 1e3:.0f} s at n={cfg.get('n')}; "
                                      f"at 2n, warm-up + one run would exceed the {limit:.0f} s limit")
            if rec["status"] == "ok":
                ref, kind = self.oracle(prov.quantity, cfg)
                rec["quantity"] = prov.quantity
                rec["ref_value"], rec["ref_kind"] = ref, kind
                if ref is not None:
                    rec["abs_err"] = abs(rec["value"] - ref)
        self.records.append(rec)
        if verbose:
            print(fmt_record(rec), flush=True)
        return rec

    def sweep(self, providers: Iterable[str], base: dict, ns: Iterable[int], verbose: bool = True, **overrides) -> None:
        """Run every provider at every n (ascending) of one config; a provider that
        fails (or would exceed the time limit) at some n is skipped at larger n."""
        group = tuple(sorted((k, str(v)) for k, v in base.items() if k != "n"))
        for n in sorted(ns):
            for p in providers:
                self.run(p, dict(base, n=n), group=group, verbose=verbose, **overrides)

    def write(self, tag: str = "") -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = f"{self.name}{('_' + tag) if tag else ''}_{self.device}"
        path = RESULTS / f"{stem}.json"
        with open(path, "w") as f:
            json.dump({"meta": self.meta, "records": self.records}, f, indent=1)
        (RESULTS / f"{stem}.md").write_text(markdown(self.meta, self.records))
        print(f"wrote {_rel(path)} and {stem}.md")
        return path


# ----------------------------------------------------------------------------- output


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _size(cfg: dict) -> str:
    if cfg["op"] == "rcka":
        return f"B={cfg['B']} classes={cfg['classes']}"
    if cfg["op"] == "pcka":
        return f"{cfg.get('level', '')} B={cfg['B']} C={cfg['C']} {cfg['H']}x{cfg['W']} ({cfg['n']} patches)".strip()
    g = f"G={cfg['G']} " if cfg.get("G") else ""
    if cfg["op"] == "mmd":
        return f"{g}n={cfg['n']} m={cfg.get('m', cfg['n'])} d={cfg['p']}"
    return f"{g}n={cfg['n']} p={cfg['p']} q={cfg['q']}"


def _variant(cfg: dict) -> str:
    if cfg["op"] in ("rcka", "pcka"):
        return f"{cfg['op']} loss {cfg.get('dtype', 'float32')}"
    est = "debiased" if cfg.get("debiased") else "biased"
    return f"{cfg['op']} {cfg['kernel']} {est} {cfg.get('dtype', 'float32')}"


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= s:
            v = b / s
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{b} B"


def fmt_ms(t) -> str:
    if t is None:
        return "-"
    return f"{t / 1e3:.3g} s" if t >= 1e3 else f"{t:.3g} ms"


def fmt_record(r: dict) -> str:
    c = r["config"]
    head = f"{r['provider']:<22} {_variant(c):<28} {_size(c):<26}"
    if r["status"] != "ok":
        return f"{head} {r['status'].upper()}: {r.get('error', '')}"
    err = f"{r['abs_err']:.1e}" if r.get("abs_err") is not None else "-"
    return f"{head} {fmt_ms(r['time_ms']):>9} {r['mode']:<7} +{fmt_bytes(r['peak_mem_bytes']):>10}  value={r['value']:.6g} |err|={err}"


def markdown(meta: dict, records: Iterable[dict]) -> str:
    lines = [
        f"# {meta.get('bench')} on {meta.get('device_name')} ({meta.get('device')})",
        "",
        f"torch {meta.get('torch')}, triton {meta.get('triton')}, python {meta.get('python')}, "
        f"{meta.get('date')}, commit {meta.get('git_commit', '')[:10]}{' (dirty)' if meta.get('git_dirty') else ''}, "
        f"{meta.get('torch_threads')} threads. Command: `{' '.join(meta.get('argv', []))}`",
        "",
        "Time: median fwd(+bwd) after warm-up. Memory: extra peak (CPU: peak RSS increase in a fresh process; "
        "GPU: max_memory_allocated delta). |err|: against the float64 oracle (ref).",
        "",
        "| variant | size | provider | status | time | mode | extra peak mem | value | ref | abs err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    unsupported = [r for r in records if r["status"] == "unsupported"]
    for r in records:
        c = r["config"]
        ok = r["status"] == "ok"
        if r["status"] == "unsupported":
            continue
        lines.append(
            "| " + " | ".join([
                _variant(c), _size(c), r["provider"],
                r["status"] if ok else f"{r['status']}: {r.get('error', '')[:80]}".replace("|", "/"),
                fmt_ms(r.get("time_ms")) if ok else "-", r.get("mode", "-"),
                fmt_bytes(r.get("peak_mem_bytes")) if ok else "-",
                f"{r['value']:.6g}" if ok else "-",
                f"{r['ref_value']:.6g}" if ok and r.get("ref_value") is not None else "-",
                f"{r['abs_err']:.1e}" if ok and r.get("abs_err") is not None else "-",
            ]) + " |"
        )
    if unsupported:
        lines += ["", "Not applicable (the provider does not compute this variant): " + "; ".join(
            sorted({f"{r['provider']} ({r.get('error', '')})" for r in unsupported}))]
    return "\n".join(lines) + "\n"


def _series(r: dict) -> str:
    return r["provider"] + (" (fwd only)" if r.get("mode") == "fwd" else "")


def plot(records: List[dict], path: Path, title: str, series_key=_series, xlabel: str = "n (samples)") -> Optional[Path]:
    """Log-log time vs n and extra memory vs n, one line per series (memory below
    64 KiB, the page-level noise of an RSS measurement, is drawn at 64 KiB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: Dict[str, list] = {}
    for r in records:
        if r["status"] == "ok":
            series.setdefault(series_key(r), []).append(r)
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["config"]["n"])
        ns = [r["config"]["n"] for r in rs]
        axes[0].plot(ns, [r["time_ms"] / 1e3 for r in rs], "o-", label=name)
        axes[1].plot(ns, [max(r["peak_mem_bytes"], 64 << 10) / (1 << 20) for r in rs], "o-", label=name)
    for ax, lab in zip(axes, ("time per fwd(+bwd) [s]", "extra peak memory [MiB]")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {_rel(path)}")
    return path


def add_common_args(ap, timeout=600.0, repeats=5):
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--timeout", type=float, default=timeout, help="seconds per case (subprocess killed, recorded as timeout)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--time-budget", type=float, default=20.0, help="stop repeating a case after this many seconds (>= 1 timed run)")
    ap.add_argument("--mem-cap-gb", type=float, default=14.0,
                    help="CPU: address space a case may add to its process (torch loaded); beyond it = recorded OOM")
    ap.add_argument("--ref-max-n", type=int, default=2048,
                    help="largest n checked against rcka_kernels.reference (above: torch backend in fp64)")
    ap.add_argument("--isolation", default="auto", choices=["auto", "fork", "interpreter"],
                    help="fresh process per case: forked child (CPU default) or a new interpreter (CUDA)")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    return ap


if __name__ == "__main__":
    _worker_main(sys.argv[1])
