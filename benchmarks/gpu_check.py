"""``make gpu-check``: validate the package on an NVIDIA GPU within a short lease.

    python benchmarks/gpu_check.py --stage test --out DIR    # <= 5 min: build (forced), GPU tests, mixed precision
    python benchmarks/gpu_check.py --stage bench --out DIR   # <= 2 min: quick benchmarks, compute-sanitizer memcheck
    python benchmarks/gpu_check.py --stage all --out DIR     # the two in turn (the default)
    python benchmarks/gpu_check.py --stage rerun --failed-from DIR/test.json --out DIR2   # only what failed
    python benchmarks/gpu_check.py --dry-run                 # no GPU needed: the plan, its time budgets and files
    python benchmarks/gpu_check.py --fetch-wheels            # with network, before: the peers as wheels

Only what needs a GPU runs here (CI runs the rest on the CPU), most valuable first,
each step time-boxed: a step must end by the stage's start plus the budgets of the
steps up to it (time a step leaves unused passes to the next), a pytest run is
interrupted there (SIGINT, so it reports, then killed), every test has a time limit
(pytest-timeout) and the tests run in parallel (pytest-xdist) where installed.

- ``test``: the CUDA library and the native op built in place, both forced (a
  failure is an error), concurrently, for the GPU's own architecture; that every
  environment of the test suite, the GPU ones included, has what it needs
  (tests/test_smoke.py); then one pytest run of the GPU-marked tests (``-m "gpu and not slow"``) in
  this order: what only a GPU shows (tests/test_cuda_gpu.py, test_triton_gpu.py,
  test_linear.py), mixed precision on CUDA (test_autocast.py), the shared suite's
  GPU environments torch-cuda, triton-cuda and cuda (test_catalogue.py, test_parity.py).
- ``bench``: the build again only if the test stage's is gone (a fresh machine);
  the peers from the wheels carried in benchmarks/wheels/ installed into a scratch
  folder (no index, no dependencies: the machine has no network); the
  efficient-formula benchmark's quick cases; the compare benchmark's ResNet-18
  case; compute-sanitizer memcheck on the contract test of each CUDA kernel
  (linear, RBF, MMD; forward and backward) on two shapes, one on the small-group
  path and one tiled with a ragged last tile, in float32 and bfloat16, with
  PyTorch's caching allocator off (it would hide out-of-bounds accesses in pooled
  blocks); a sanitizer that refuses the device (or is missing) is recorded as
  ``unsupported``, not as a failure. On a fresh machine the build alone takes most
  of this stage's budget: give it more (``--budget 230``, a command limit of 250 s).

Files (``--out``, or benchmarks/results/gpu_<gpu>): per stage ``<stage>.json`` (device,
versions, date, commit, every step's exit code, budget and time, ``per_backend``
passed/failed/skipped counts, the failed tests, ``ok``), ``<stage>.log`` (every
command's output) and ``<stage>.jsonl`` (one line per finished test), each written as
the stage goes, so a command stopped at its limit still leaves what finished; the
bench stage adds the benchmarks' JSON (then markdown, plots): at most 8 files per stage, names
of letters, digits, '.', '_' and '-'. The exit code is 1 if a stage failed, 2 without a GPU.

On a leased machine that keeps nothing, has no network and returns only the files of
one folder ($OUT): fetch the wheels here first (``--fetch-wheels``; git ignores them),
then two commands, back to back, with <HEAD> this checkout's commit (the copy sent
there may have no .git):

    run(command="python3 benchmarks/gpu_check.py --stage test --out $OUT --commit <HEAD>", timeout_s=300)
    run(command="python3 benchmarks/gpu_check.py --stage bench --out $OUT --commit <HEAD>",
        carry=["benchmarks/wheels/pytorch_cka-1.1.3-py3-none-any.whl"], timeout_s=120)

Commit what comes back under benchmarks/results/gpu_<gpu>/. If tests failed and
time is left, copy test.json there (the tree sent along then holds it) and run
``--stage rerun --failed-from benchmarks/results/gpu_<gpu>/test.json --out $OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "benchmarks" / "wheels"
#: the compare benchmark's peer, as a wheel for the GPU machine's Python (pure Python; its
#: dependencies matplotlib, numpy, torch and tqdm are on that machine already)
PEER_WHEELS = ("pytorch-cka==1.1.3",)
PEER_PYTHON = "3.12"
STAGES = ("test", "bench")
#: seconds a stage may take, inside the command limit of the docstring (300 s, 120 s), with
#: room for the interrupted step's report and the summary
BUDGET = {"test": 285, "bench": 105, "rerun": 240}
#: each stage leaves at most this many files in --out (what a leased machine sends back)
MAX_FILES = 8
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
TEST_TIMEOUT_S = 60  # per test (pytest-timeout)
WORKERS = 8  # pytest-xdist workers, each with 2 threads for the float64 reference on the CPU
GRACE_S = 8  # after SIGINT at a step's deadline, before SIGKILL

# the environments of the shared suite (tests/utils.py: ENVIRONMENTS), the GPU ones first; a test
# parametrised over them is counted under the one its id names
ENVIRONMENTS = ("torch-cuda", "triton-cuda", "cuda", "reference", "torch", "torch-python", "triton-interpreter", "cuda-emulated")
# the GPU test files, most valuable first -> the environment a test exercises when its id names none
GPU_TESTS = {
    "tests/test_cuda_gpu.py": "cuda",
    "tests/test_triton_gpu.py": "triton-cuda",
    "tests/test_linear.py": "torch-cuda",
    "tests/test_autocast.py": "",
    "tests/test_catalogue.py": "",
    "tests/test_parity.py": "",
}
# each environment of the suite this machine can have, with what it lacks (not GPU-marked)
SMOKE = "tests/test_smoke.py"
# under memcheck: each CUDA kernel's contract test (forward and backward) on a small-group
# shape and a tiled one with a ragged last tile, in float32 and bfloat16 (tests/test_parity.py)
SANITIZED = ["-m", "gpu and not slow", "tests/test_parity.py", "-k",
             "test_contract and cuda and not torch and not triton and not emulated and (float32 or bfloat16)"
             " and (64-40-8 or 129-12-7 or 40-70-9 or 150-90-37)"]
UNSUPPORTED = re.compile(r"Device not supported|not supported on this|unsupported device|Unable to find injection library", re.I)
# the benchmarks, by their command lines (their --out is a scratch folder: see _collect)
EFFICIENT = ["-m", "benchmarks.bench_efficient", "--quick", "--device", "cuda"]
COMPARE = ["-m", "benchmarks.bench_compare", "--quick", "--device", "cuda", "--case", "resnet"]
RESULTS_ENV, STEP_ENV = "RCKA_GPU_CHECK_RESULTS", "RCKA_GPU_CHECK_STEP"


@dataclass
class Step:
    key: str
    title: str
    budget_s: float
    cmds: List[Tuple[List[str], Dict[str, str]]]  # run concurrently
    tests: bool = False  # a pytest run: its outcomes go to <stage>.jsonl
    collect: bool = False  # a benchmark: its results move from the scratch folder to --out (_collect)
    skip: str = ""  # why it does not run (decided when the plan is made)
    sanitizer: bool = False  # a sanitizer run: not installed, or refusing the device, is "unsupported"
    env: Dict[str, str] = field(default_factory=dict)  # for the steps after it (the peers' PYTHONPATH)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _pytest(py: str, *args: str, parallel: bool, have: set) -> List[str]:
    cmd = [py, "-m", "pytest", "-rfEs", "-p", "no:cacheprovider", "-p", "benchmarks.gpu_check"]
    if "pytest_timeout" in have:
        cmd += [f"--timeout={TEST_TIMEOUT_S}"]
    cmd += ["-n", str(WORKERS)] if parallel and "xdist" in have else ["-p", "no:xdist"]
    return cmd + list(args)


def _built() -> str:
    """'' when both compiled parts are in the package for this Python, else what is missing."""
    import sysconfig

    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    missing = [name for name in ("_rcka_cuda", "_rcka_native") if not (ROOT / "rcka_kernels" / (name + suffix)).exists()]
    return ", ".join(missing)


def _build(py: str, arch: str) -> List[Tuple[List[str], Dict[str, str]]]:
    cmd = [py, "setup.py", "build_ext", "--inplace"]
    return [(cmd, {"RCKA_FORCE_NATIVE": "1", "RCKA_SKIP_CUDA": "1"}),
            (cmd, {"RCKA_FORCE_CUDA": "1", "RCKA_SKIP_NATIVE": "1", "RCKA_CUDA_ARCHS": arch})]


REQUIRE = {"RCKA_REQUIRE_CUDA": "1", "RCKA_REQUIRE_NATIVE": "1", "RCKA_REQUIRE_TRITON": "1"}  # a skip for want of these fails


def _gpu_tests(py: str, have: set, nodeids: Optional[List[str]] = None) -> Step:
    args = nodeids if nodeids is not None else ["-m", "gpu and not slow", *GPU_TESTS]
    title = "the failed tests again" if nodeids is not None else "GPU tests (GPU-only, mixed precision, the suite's GPU environments)"
    return Step("gpu-tests", title, 0, [(_pytest(py, *args, parallel=True, have=have), {**REQUIRE, "OMP_NUM_THREADS": "2"})], tests=True)


def plan(stage: str, py: str, arch: str, have: set, scratch: str, rebuild: str = "", nodeids=None) -> List[Step]:
    """The steps of one stage, in order. ``have``: the optional pytest plugins installed
    (xdist, pytest_timeout); ``scratch``: a folder for the peers and the benchmarks' output;
    ``rebuild``: what the bench and rerun stages find missing of the test stage's build."""
    build = Step("build", "build in place, the CUDA library and the native op forced", 120, _build(py, arch))
    if stage == "test":
        smoke = _pytest(py, SMOKE, parallel=False, have=have)
        return [build, Step("environments", "every test environment has what it needs (the GPU ones too)", 20, [(smoke, REQUIRE)],
                            tests=True),
                _with_budget(_gpu_tests(py, have), BUDGET["test"] - 140)]
    build.title = "build in place again (only if the test stage's build is gone), forced"
    if not rebuild:
        build.skip, build.budget_s = "the test stage's build is here", 0
    if stage == "rerun":
        return [build, _with_budget(_gpu_tests(py, have, nodeids or []), BUDGET["rerun"] - build.budget_s)]
    if stage != "bench":
        raise ValueError(stage)
    site, out = os.path.join(scratch, "site"), ["--out", os.path.join(scratch, "results")]
    wheels = sorted(glob.glob(str(WHEELS / "*.whl")))
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--upgrade", "--target", site, *wheels]
    peers = Step("peers", "the peers from benchmarks/wheels (no index, no dependencies)", 5, [(pip, {})],
                 skip="" if wheels else "no wheels in benchmarks/wheels (python benchmarks/gpu_check.py --fetch-wheels)",
                 env={"PYTHONPATH": os.pathsep.join([site, str(ROOT)])})
    memcheck = [_sanitizer(), "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20",
                *_pytest(py, *SANITIZED, parallel=False, have=have)]
    return [build, peers,
            Step("efficient", "vs the efficient plain-PyTorch formula, quick cases", 45, [([py, *EFFICIENT, *out], {})], collect=True),
            Step("compare", "rk.compare vs pytorch-cka, the ResNet-18 case", 35, [([py, *COMPARE, *out], {})], collect=True),
            Step("memcheck", "compute-sanitizer memcheck on contract tests of each CUDA kernel", BUDGET["bench"] - 85,
                 [(memcheck, {"RCKA_REQUIRE_CUDA": "1", "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})], tests=True, sanitizer=True)]


def _with_budget(step: Step, budget: float) -> Step:
    step.budget_s = budget
    return step


def _sanitizer() -> str:
    found = shutil.which("compute-sanitizer")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and home and os.access(os.path.join(home, "bin", "compute-sanitizer"), os.X_OK):
            found = os.path.join(home, "bin", "compute-sanitizer")
    return found or "compute-sanitizer"


# ----------------------------------------------------------------------------- per-test outcomes (a pytest plugin)


def pytest_runtest_logreport(report):
    """With ``-p benchmarks.gpu_check``: one JSON line per test phase that decides a test's
    outcome (its call, or a setup or teardown that failed or skipped), appended to
    $RCKA_GPU_CHECK_RESULTS as the test finishes, by the process that reports (xdist's
    controller, not its workers): a run stopped at its deadline keeps what finished."""
    path = os.environ.get(RESULTS_ENV)
    if not path or os.environ.get("PYTEST_XDIST_WORKER") or (report.when != "call" and report.passed):
        return
    rec = {"step": os.environ.get(STEP_ENV, ""), "test": report.nodeid, "when": report.when, "outcome": report.outcome,
           "seconds": round(report.duration, 3)}
    if report.failed:
        rec["message"] = report.longreprtext[-1500:]
    elif report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        rec["message"] = reason.removeprefix("Skipped: ")[:300]
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _environment(test: str) -> str:
    """The environment a test ran in: the one its parameter id names ("f[triton-cuda-float32-5]"),
    the longest match first (torch-cuda is not cuda); else its file's (GPU_TESTS), else "other"."""
    params = "-" + test.partition("[")[2].rstrip("]") + "-"
    for env in sorted(ENVIRONMENTS, key=len, reverse=True):
        if f"-{env}-" in params:
            return env
    return GPU_TESTS.get(test.partition("::")[0]) or "other"


def outcomes(path: Path) -> Dict[Tuple[str, str], dict]:
    """{(step, test): {outcome, message}} from a .jsonl of the plugin: failed if any phase
    failed, else skipped if any skipped, else passed."""
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    out: Dict[Tuple[str, str], dict] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        key = (rec["step"], rec["test"])
        if key not in out or rank[rec["outcome"]] > rank[out[key]["outcome"]]:
            out[key] = {"outcome": rec["outcome"], "message": rec.get("message", "")}
    return out


def counts(results: Dict[Tuple[str, str], dict]) -> Dict[str, Dict[str, int]]:
    """{environment: {passed, failed, skipped}}."""
    per: Dict[str, Dict[str, int]] = {}
    for (_, test), r in results.items():
        c = per.setdefault(_environment(test), {"passed": 0, "failed": 0, "skipped": 0})
        c[r["outcome"]] += 1
    return dict(sorted(per.items()))


# ----------------------------------------------------------------------------- running a stage


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the command's process group (pytest then reports what finished), then
    SIGKILL to what is left of it (xdist's workers, a command ignoring SIGINT) after GRACE_S."""
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_step(step: Step, deadline: float, log, env: Dict[str, str]) -> dict:
    """Run the step's commands concurrently until they end or the deadline (time.monotonic());
    their output goes to ``log`` (one command: as it comes)."""
    rec = {"key": step.key, "title": step.title, "budget_s": step.budget_s}
    if step.skip:
        return {**rec, "status": "skipped", "reason": step.skip}
    if deadline - time.monotonic() < 1:
        return {**rec, "status": "not run", "reason": "no time left in the stage"}
    log.flush()
    t0, start = time.monotonic(), log.tell()
    procs, sinks, codes = [], [], []
    for cmd, extra in step.cmds:
        log.write(f"\n=== {step.title}\n$ {' '.join(f'{k}={v}' for k, v in extra.items())} {' '.join(cmd)}\n")
        log.flush()
        sink = log if len(step.cmds) == 1 else tempfile.TemporaryFile("w+")
        try:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env, **extra},
                                          stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, text=True))
            sinks.append(sink)
        except OSError as e:  # not installed
            log.write(f"{e}\n")
            codes.append(127)
    timed_out = False
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        codes.append(proc.returncode)
    for sink in sinks:
        if sink is not log:
            sink.seek(0)
            log.write(sink.read())
            sink.close()
    seconds = round(time.monotonic() - t0, 1)
    log.write(f"=== {step.title}: exit {codes} after {seconds} s{' (stopped at its deadline)' if timed_out else ''}\n")
    log.flush()
    with open(log.name, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    status = "timeout" if timed_out else ("passed" if all(c == 0 for c in codes) else "failed")
    if step.sanitizer and (127 in codes or UNSUPPORTED.search(text)):
        status = "unsupported"
    rec.update(status=status, exit_codes=codes, seconds=seconds, tail=text[-2000:])
    selected = re.findall(r"\[(\d+) items?\]|collected (\d+) items?(?: / \d+ deselected / (\d+) selected)?", text)
    if step.tests and selected:
        a, b, c = selected[-1]
        rec["selected"] = int(a or c or b)
    return rec


COLLECTED = (".json", ".md", ".png")  # what the benchmarks write that comes back, in this order while there is room


def _collect(scratch: Path, out: Path, room: int) -> Tuple[List[str], List[str]]:
    """Move the benchmarks' results from scratch to out, JSON first, then markdown, then plots,
    as many as there is room for, with names a leased machine sends back; (copied, left out)."""
    found = [f for f in scratch.rglob("*") if f.is_file()]
    found.sort(key=lambda f: (COLLECTED.index(f.suffix) if f.suffix in COLLECTED else len(COLLECTED), f.name))
    copied, left = [], []
    for f in found:
        if f.suffix in COLLECTED and SAFE_NAME.match(f.name) and len(copied) < room:
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
        else:
            left.append(f.name)
        f.unlink()
    return copied, left


def _status_ok(step: dict) -> bool:
    return step["status"] in ("passed", "unsupported") or (step["status"] == "skipped" and step["key"] == "build")


def run_stage(stage: str, steps: List[Step], out: Path, meta: dict, start: float, budget: float, scratch: Path) -> bool:
    """Run the steps in order, step i ending by start + the budgets of steps 0..i (the last
    by start + budget); <stage>.json is rewritten before and after every step."""
    files = [out / f"{stage}{ext}" for ext in (".json", ".log", ".jsonl")]
    files[2].unlink(missing_ok=True)
    summary = {"stage": stage, "meta": meta, "budget_s": budget, "steps": [], "per_backend": {}, "failed_tests": [],
               "files": [f.name for f in files], "ok": False}
    env = {RESULTS_ENV: str(files[2]), "PYTHONPATH": str(ROOT)}
    scheduled = 0.0
    files[1].write_text("")
    with open(files[1], "a") as log:  # appending: the commands write to it too
        for i, step in enumerate(steps):
            scheduled = budget if i == len(steps) - 1 else min(budget, scheduled + step.budget_s)  # the last takes what is left
            summary["running"] = step.key
            files[0].write_text(json.dumps(summary, indent=1))
            rec = run_step(step, start + scheduled, log, {**env, STEP_ENV: step.key})
            if rec["status"] == "passed":
                env.update(step.env)
            if step.collect:
                rec["files"], rec["left_out"] = _collect(scratch / "results", out, MAX_FILES - len(summary["files"]))
                summary["files"] += rec["files"]
            summary["steps"].append(rec)
            refused = {s["key"] for s in summary["steps"] if s["status"] == "unsupported"}  # its tests' failures are the sanitizer's
            results = {k: r for k, r in outcomes(files[2]).items() if k[0] not in refused}
            summary["per_backend"] = counts(results)
            summary["failed_tests"] = [{"test": t, "message": r["message"][-500:]} for (_, t), r in results.items()
                                       if r["outcome"] == "failed"][:100]
            print(f"[{stage}] {step.key}: {rec['status']}" + (f" ({rec['seconds']} s of {step.budget_s:.0f})" if "seconds" in rec
                                                            else f": {rec.get('reason', '')}"), flush=True)
    summary.pop("running")
    tested = sum(c["passed"] for c in summary["per_backend"].values())
    summary["ok"] = all(_status_ok(s) for s in summary["steps"]) and not summary["failed_tests"] and (tested > 0 or stage == "bench")
    files[0].write_text(json.dumps(summary, indent=1))
    print(f"[{stage}] per environment: " + "; ".join(f"{k}: {v['passed']} passed, {v['failed']} failed, {v['skipped']} skipped"
                                                      for k, v in summary["per_backend"].items()), flush=True)
    return summary["ok"]


def _output(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__})"


def _nvcc() -> str:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or "nvcc"


def environment(commit: Optional[str]) -> dict:
    """Device, versions, date and commit (``commit`` where the copy has no .git)."""
    import datetime
    import platform
    from importlib import metadata

    import torch

    head = _output(["git", "rev-parse", "HEAD"])
    git = bool(re.fullmatch(r"[0-9a-f]{40}", head))
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "not installed"
    nvcc = re.search(r"release [\d.]+, V[\d.]+", _output([_nvcc(), "--version"]))
    return {"device_name": torch.cuda.get_device_name(), "capability": "%d.%d" % torch.cuda.get_device_capability(),
            "driver": _output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton, "python": platform.python_version(),
            "nvcc": nvcc.group(0) if nvcc else "unavailable", "compute_sanitizer": _output([_sanitizer(), "--version"])[-80:],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit or (head if git else "unknown (no .git here: pass --commit)"),
            "git_dirty": bool(_output(["git", "status", "--porcelain", "--", "rcka_kernels", "csrc", "tests", "benchmarks",
                                       ":!benchmarks/results"])) if git else None,
            "cpu_count": os.cpu_count()}


def failed_tests(path: Path) -> List[str]:
    """The failed tests' node ids in a stage's summary (.json) or outcomes (.jsonl)."""
    if path.suffix == ".jsonl":
        return sorted({t for (_, t), r in outcomes(path).items() if r["outcome"] == "failed"})
    return [r["test"] for r in json.loads(path.read_text())["failed_tests"]]


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", s)[:40]


# ----------------------------------------------------------------------------- dry run, wheels, main


def _check(stage: str, steps: List[Step], budget: float) -> List[str]:
    """What the plan names that is missing here: test files, benchmark modules and the options
    it passes them (defined in the module or benchmarks/_harness.py), setup.py's switches, the
    'gpu' marker; budgets over the stage's."""
    missing = []
    if '"gpu:' not in (ROOT / "pyproject.toml").read_text():
        missing.append("the 'gpu' pytest marker in pyproject.toml")
    setup_py = (ROOT / "setup.py").read_text()
    for step in steps:
        for cmd, env in step.cmds:
            missing += [f"{k} in setup.py" for k in env if k.startswith("RCKA_") and "build" in step.key and k not in setup_py]
            missing += [a for a in cmd if a.startswith("tests/") and not (ROOT / a.partition("::")[0]).exists()]
            if "-m" in cmd and cmd[cmd.index("-m") + 1].startswith("benchmarks."):
                module = cmd[cmd.index("-m") + 1]
                if not (ROOT / (module.replace(".", "/") + ".py")).exists():
                    missing.append(module)
                    continue
                source = "".join(p.read_text() for p in (ROOT / (module.replace(".", "/") + ".py"), ROOT / "benchmarks" / "_harness.py"))
                missing += [f"{module} {a}" for a in cmd if a.startswith("--") and f'"{a}"' not in source]
    if sum(s.budget_s for s in steps) > budget + 1e-9:
        missing.append(f"[{stage}] budgets {sum(s.budget_s for s in steps):.0f} s > the stage's {budget:.0f} s")
    return missing


def dry_run(stages, py: str, out: str, budgets: Dict[str, float], failed_from: Optional[str]) -> int:
    """Print every stage's steps (budget, deadline, commands) and files, as a GPU machine with
    pytest-xdist and pytest-timeout would run them, and check what they name exists here."""
    have, missing = {"xdist", "pytest_timeout"}, []
    print(f"gpu-check plan (nothing runs); Python {py}; <arch>: the GPU's compute capability, e.g. 90")
    for stage in stages:
        nodeids = failed_tests(Path(failed_from)) if failed_from else ["<the failed tests of --failed-from>"]
        steps = plan(stage, py, "<arch>", have, "<scratch>", nodeids=nodeids)
        files = [f"{out}/{stage}{ext}" for ext in (".json", ".log", ".jsonl")]
        print(f"\n[{stage}] at most {budgets[stage]:.0f} s -> {', '.join(files)}")
        end = 0.0
        for step in steps:
            end = min(budgets[stage], end + step.budget_s)
            what = " (the *.json, *.md and *.png it writes, moved to the output folder while there is room)" if step.collect else ""
            print(f"  {step.key}: {step.title}; budget {step.budget_s:.0f} s, ends by {end:.0f} s{what}")
            if step.skip:
                print(f"    skipped where: {step.skip}")
            for cmd, env in step.cmds:
                print("    $ " + shlex.join([f"{k}={v}" for k, v in env.items()] + cmd))
        print(f"  files: at most {MAX_FILES}")
        missing += _check(stage, steps, budgets[stage])
    if missing:
        print("\ngpu-check --dry-run: MISSING " + "; ".join(missing))
        return 1
    print("\ngpu-check --dry-run: every test file, benchmark option, build switch and marker the stages name exists")
    return 0


def fetch_wheels() -> int:
    """Download the peers' wheels for the GPU machine's Python into benchmarks/wheels/ (git ignores them)."""
    WHEELS.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", PEER_PYTHON,
           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
           "-d", str(WHEELS), *PEER_WHEELS]
    rc = subprocess.call(cmd)
    print("carry to the bench stage: " + json.dumps(sorted(str(p.relative_to(ROOT)) for p in WHEELS.glob("*.whl"))))
    return rc


def main(argv=None) -> int:
    start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=STAGES + ("all", "rerun"))
    ap.add_argument("--out", default=None, help="folder for every result (default benchmarks/results/gpu_<gpu>)")
    ap.add_argument("--commit", default=None, help="the commit to record where the copy has no .git")
    ap.add_argument("--budget", type=float, default=None, help="seconds for each stage (default: test 285, bench 105, rerun 240)")
    ap.add_argument("--failed-from", default=None, help="--stage rerun: a stage's .json or .jsonl whose failed tests run again")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and check what it names; no GPU needed")
    ap.add_argument("--fetch-wheels", action="store_true", help="download the peers' wheels into benchmarks/wheels (needs network)")
    args = ap.parse_args(argv)
    stages = STAGES if args.stage == "all" else (args.stage,)
    budgets = {s: args.budget or BUDGET[s] for s in stages}
    if args.stage == "rerun" and not args.failed_from:
        ap.error("--stage rerun needs --failed-from")
    if args.fetch_wheels:
        return fetch_wheels()
    py = sys.executable
    if args.dry_run:
        return dry_run(stages, py, args.out or "benchmarks/results/gpu_<gpu>", budgets, args.failed_from)
    import torch

    if not torch.cuda.is_available():
        sys.stderr.write(f"gpu-check: FAILED: no CUDA device is visible to PyTorch (torch {torch.__version__}); "
                         "this check needs an NVIDIA GPU (--dry-run shows its plan anywhere).\n")
        return 2
    tag = _slug(torch.cuda.get_device_name())
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_{tag}"
    out.mkdir(parents=True, exist_ok=True)
    arch = "%d%d" % torch.cuda.get_device_capability()
    have = {m for m in ("xdist", "pytest_timeout") if _has_module(m)}
    nodeids = failed_tests(Path(args.failed_from)) if args.failed_from else None
    if args.stage == "rerun" and not nodeids:
        print(f"gpu-check: no failed test in {args.failed_from}: nothing to run again")
        return 0
    meta = environment(args.commit)
    failed = []
    for stage in stages:
        with tempfile.TemporaryDirectory() as scratch:
            steps = plan(stage, py, arch, have, scratch, rebuild=_built(), nodeids=nodeids)
            if not run_stage(stage, steps, out, meta, start, budgets[stage], Path(scratch)):
                failed.append(stage)
        start = time.monotonic()
    print(f"\ngpu-check on {meta['device_name']}: {'FAILED: ' + ', '.join(failed) if failed else 'every stage passed'}; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
