"""The one benchmark harness: contenders timed interleaved in one process, or each in a fresh
process, and one JSON format for every result.

- ``interleaved(cases)``: every contender of a case in this process. A warm-up call each
  (its output is the recorded value, its aten ops are counted on request), then rounds in
  which every contender runs once, in a new random order each round (what ran just before
  a call sets its cache state: a fixed alternation favours one side), until ``min_reps``
  rounds and ``budget_s`` seconds; the median is the time. Timing runs with the C library's
  default allocator; memory is measured afterwards in its own pass (one call each).
- ``isolated(target, kwargs)``: one contender in a new interpreter (its own peak memory, an
  address-space cap on the CPU): warm-up, timed calls, then the memory pass.
- Memory: on the CPU the peak RSS above the RSS before the call, with allocations of
  64 KiB or more mmap-backed and the heap trimmed first, so the RSS follows what is live;
  on a GPU the ``max_memory_allocated`` increase.
- An out-of-memory, an error or a timeout is a recorded result (``status``), not a crash.
- ``Results`` writes ``{benchmark, meta, config, results}``: meta has the device, versions,
  commit and the load average before and after; each result names its case and contender.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
_MARK = "@@RESULT@@"
_OMP_AT_START = os.environ.get("OMP_WAIT_POLICY", "(unset)")


# ----------------------------------------------------------------------------- environment


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def env_info(device: str) -> dict:
    """Where and with what a result was measured."""
    import torch

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    gpu = device == "cuda" and torch.cuda.is_available()
    return {
        "device": device, "device_name": torch.cuda.get_device_name() if gpu else _cpu_name(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__, "triton": triton_v,
        "cuda": torch.version.cuda if gpu else None, "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "rcka_kernels", "benchmarks", ":!benchmarks/results")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]], "OMP_WAIT_POLICY": _OMP_AT_START,
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
    }


class Results:
    """The records of one benchmark run, written as ``<out>/<name>_<device>[_quick].json``."""

    def __init__(self, name: str, args, config: dict):
        self.name, self.args, self.config = name, args, dict(config, quick=bool(args.quick))
        self.meta = env_info(args.device)
        self.results: List[dict] = []

    def add(self, recs: List[dict]) -> None:
        """Record (and print) results; the JSON is rewritten each time, so a run stopped at a
        deadline leaves what it finished."""
        for r in recs:
            print(fmt_record(r), flush=True)
        self.results += recs
        self.write(quiet=True)

    def write(self, quiet: bool = False) -> Path:
        self.meta["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}_{self.args.device}{'_quick' if self.args.quick else ''}.json"
        doc = {"benchmark": self.name, "meta": self.meta, "config": self.config, "results": self.results}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        if not quiet:
            print(f"wrote {path}")
        return path


def parser(description: str):
    """The options every benchmark script takes: --quick, --device, --out."""
    import argparse

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few small cases (a smoke run; written as *_quick.json)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON (and plots)")
    return ap


def inputs(shape, q: int, device: str):
    """x (..., n, p) requiring grad and a detached y (..., n, q): noise plus x's first columns,
    so CKA is far from 0 and 1. The same seed for every contender."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    y = 0.5 * torch.randn(*shape[:-1], q, generator=gen)
    k = min(shape[-1], q)
    y[..., :k] += x[..., :k]
    return x.to(device).requires_grad_(), y.to(device)


# ----------------------------------------------------------------------------- measuring one call


def _status_kb(key: str) -> int:
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key + ":"))


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_MEMORY_MODE = False  # set for good by memory_mode(): no timing in this process after it


def memory_mode(device: str) -> None:
    """From now on allocations of 64 KiB or more are mmap-backed (returned to the OS on free),
    so the RSS follows what is live. Called once every timing of the process is over: it
    makes every such allocation page-fault, a cost a normal process does not pay, and it
    cannot be undone (``interleaved`` refuses to time after it)."""
    global _MEMORY_MODE
    libc = _libc()
    if device == "cpu" and libc is not None:
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD, fixed
        _MEMORY_MODE = True


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure_peak(fn: Callable, device: str) -> Tuple[float, int, object]:
    """(seconds, peak memory above what was live before, fn's result) of one call."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base, out
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    base = _status_kb("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, max(0, _status_kb("VmHWM") * 1024 - base), out


def failure(e: BaseException) -> dict:
    s = f"{type(e).__name__}: {e}"
    low = s.lower()
    oom = isinstance(e, MemoryError) or any(k in low for k in ("out of memory", "can't allocate", "cannot allocate"))
    return {"status": "oom" if oom else "error", "error": s[:400]}


def value_of(out) -> Optional[float]:
    """The float a contender's output stands for (a tensor is summed), None if it has none."""
    import torch

    try:
        return float(out.detach().sum(dtype=torch.float64)) if hasattr(out, "detach") else float(out)
    except (TypeError, ValueError):
        return None


def count_ops(fn: Callable) -> Tuple[int, object]:
    """(aten ops that do work, fn's result) of one call (``efficient.OpCounter``)."""
    from benchmarks.efficient import OpCounter

    with OpCounter() as c:
        out = fn()
    return len(c.ops), out


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- interleaved, in this process


def interleaved(cases: List[Tuple[str, Callable[[], Dict[str, Callable]]]], device: str, budget_s: float = 2.0,
                min_reps: int = 5, ops: bool = False) -> List[dict]:
    """Time and memory of every contender of every case, in this process. ``cases``: (name,
    make) with make() -> {contender: call}; a call takes no argument and returns the value
    (a loss call runs its own backward). make() runs again for the memory pass.
    Cases are timed one at a time (each one's calls released before the next one is made),
    then measured for memory: pass every case of a process in one call, since no timing may
    follow a memory pass (``memory_mode``)."""
    if _MEMORY_MODE:
        raise RuntimeError("interleaved: timing after memory_mode() would time page faults; pass every case in one call")
    recs: Dict[Tuple[str, str], dict] = {}

    def run(case, name, fn, what):  # one call; a failure marks the contender and returns None
        try:
            return what(fn)
        except Exception as e:  # recorded, never raised
            recs[case, name].update(failure(e))
            _release(device)
            return None

    for case, make in cases:
        calls = make()
        for name, fn in calls.items():
            recs[case, name] = {"case": case, "contender": name, "status": "ok"}
            got = run(case, name, fn, lambda f: (f(), sync(device))[0])  # warm-up: the recorded value
            if got is not None:
                recs[case, name]["value"] = value_of(got)
                got = run(case, name, fn, count_ops) if ops else None
                recs[case, name].update({"ops": got[0]} if got else {})
            got = None
        times: Dict[str, List[float]] = {k: [] for k in calls}
        t_end = time.perf_counter() + budget_s
        while True:
            live = [k for k in calls if recs[case, k]["status"] == "ok"]
            if not live or (min(len(times[k]) for k in live) >= min_reps and (time.perf_counter() > t_end or len(times[live[0]]) >= 1000)):
                break
            for k in random.sample(live, len(live)):
                sync(device)
                t0 = time.perf_counter()
                if run(case, k, calls[k], lambda f: (f(), sync(device))) is not None:
                    times[k].append(time.perf_counter() - t0)
        for k in calls:
            if recs[case, k]["status"] == "ok":
                recs[case, k].update(time_s=statistics.median(times[k]), reps=len(times[k]))
        calls = None
        _release(device)
    memory_mode(device)
    for case, make in cases:
        calls = make()
        for k, fn in calls.items():
            if recs[case, k]["status"] == "ok":
                got = run(case, k, fn, lambda f: measure_peak(f, device))
                if got is not None:
                    recs[case, k]["peak_bytes"] = got[1]
                got = None  # the output goes before the next contender's call
        calls = None
        _release(device)
    return list(recs.values())


# ----------------------------------------------------------------------------- isolated, in a fresh process


def _worker(spec: dict) -> dict:
    """In the fresh process: the contender ``target(**kwargs)`` returns a call; warm-up, timed
    calls (at least one after warm-up unless the warm-up alone took the budget), memory pass."""
    import importlib

    device = spec["device"]
    if device == "cpu" and spec.get("mem_cap_gb"):  # beyond the cap an allocation raises instead of swapping
        lim = _status_kb("VmSize") * 1024 + int(spec["mem_cap_gb"] * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    try:
        mod, fn_name = spec["target"].split(":")
        fn = getattr(importlib.import_module(mod), fn_name)(**spec["kwargs"])
        t0 = time.perf_counter()
        value = value_of(fn())
        sync(device)
        first = time.perf_counter() - t0
        times = []
        while first + sum(times) < spec["budget_s"] and len(times) < spec["reps"]:
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        memory_mode(device)
        peak = measure_peak(fn, device)[1]
    except Exception as e:  # recorded, never raised
        return failure(e)
    return {"status": "ok", "value": value, "time_s": statistics.median(times or [first]), "reps": len(times),
            "first_call_s": first, "peak_bytes": peak}


def isolated(target: str, kwargs: dict, device: str, budget_s: float = 5.0, reps: int = 5,
             timeout_s: float = 600.0, mem_cap_gb: Optional[float] = None) -> dict:
    """Run the contender ``target`` ("module:function", which returns a call) in a new
    interpreter; returns its record (status "timeout" or "killed" when it did not finish)."""
    spec = dict(target=target, kwargs=kwargs, device=device, budget_s=budget_s, reps=reps, mem_cap_gb=mem_cap_gb)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks._harness", json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(_MARK)), None)
    if line is not None:
        return json.loads(line[len(_MARK):])
    if proc.returncode in (-signal.SIGKILL, 137):
        return {"status": "killed", "error": "killed by SIGKILL (likely the out-of-memory killer)"}
    return {"status": "error", "error": f"exit {proc.returncode}: {err.strip()[-400:]}"}


# ----------------------------------------------------------------------------- formatting


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= s:
            return f"{b / s:.0f} {unit}" if b >= 100 * s else f"{b / s:.3g} {unit}"
    return f"{b} B"


def fmt_s(t) -> str:
    if t is None:
        return "-"
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def fmt_record(r: dict) -> str:
    head = f"{r['case']:<34} {r['contender']:<26}"
    if r["status"] != "ok":
        return f"{head} {r['status'].upper()}: {r.get('error', '')}"
    ops = f" {r['ops']} ops" if r.get("ops") is not None else ""
    return f"{head} {fmt_s(r.get('time_s')):>9} +{fmt_bytes(r.get('peak_bytes')):>10}{ops}"


if __name__ == "__main__":
    print("\n" + _MARK + json.dumps(_worker(json.loads(sys.argv[1]))), flush=True)
