"""``make gpu-check``: validate the package on an NVIDIA GPU within a short lease.

    python benchmarks/gpu_check.py --stage install+test --out DIR   # build (CUDA forced) + the GPU tests
    python benchmarks/gpu_check.py --stage sanitize --out DIR       # compute-sanitizer memcheck + racecheck
    python benchmarks/gpu_check.py --stage bench --out DIR          # quick benchmarks with launch counts
    python benchmarks/gpu_check.py --stage all --out DIR            # the three in turn (the default)
    python benchmarks/gpu_check.py --dry-run                        # no GPU needed: print and check the plan

Each stage fits one 10-minute command on an H100 and runs only what needs a GPU
(CI runs the rest on the CPU): the GPU-marked tests (the shared suite's GPU
environments, tests/utils.py, and what only a GPU shows), in parallel where pytest-xdist is installed; the sanitizers with
PyTorch's caching allocator off (it would hide out-of-bounds accesses inside
pooled blocks) and without stopping at the first error; the efficient-formula
comparison (benchmarks/bench_efficient.py) under a time budget and the quick
rk.compare benchmark (benchmarks/bench_compare.py --quick; the peer libraries
installed there are compared, the others recorded as import errors: the machine
has no index, so they come as wheels carried along, e.g. ``pip download --no-deps
-d wheels pytorch-cka==1.1.3`` here, ``pip install --no-deps wheels/*`` there). Nothing
is fetched: pip runs with no index, no version check, no build isolation.

Everything a stage produces goes into ``--out`` (for a remote machine, the folder
whose files come back), at most 10 files for ``all``: per stage a summary JSON
(device, versions, date, commit, exit codes, passed/failed/skipped per backend)
and a log; the benchmarks' JSON and markdown. A stage that fails is recorded and
the next still runs; the exit code is 1 if any failed, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("install+test", "sanitize", "bench")
# the environments of the shared suite on a GPU (tests/utils.py: ENVIRONMENTS); a test
# parametrised over them is counted under the one in its id
ENVIRONMENTS = ("torch-cuda", "triton-cuda", "cuda")
# test files whose GPU tests run on the GPU -> the environment they exercise when their ids name none
GPU_TESTS = {
    "tests/test_parity.py": "",
    "tests/test_catalogue.py": "",
    "tests/test_cuda_gpu.py": "cuda",
    "tests/test_triton_gpu.py": "triton-cuda",
    "tests/test_linear.py": "torch-cuda",
}
# the CUDA C++ kernels' contract (every path of every kernel, every dtype) under the sanitizers
SANITIZED = ["tests/test_parity.py", "-m", "gpu", "-k", "contract and cuda and not torch and not triton"]
UNSUPPORTED = re.compile(r"Device not supported|not supported on this|unsupported device", re.I)


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", s)[:40]


def _pytest(py: str, junit: Path, *args: str) -> list:
    workers = ["-n", "4"] if _has_module("xdist") else []
    return [py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *workers, f"--junitxml={junit}", *args]


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def plan(stage: str, py: str, out: Path, tmp: Path, tag: str):
    """[(title, command, extra environment)] of one stage."""
    if stage == "install+test":
        return [
            ("build + install (CUDA library forced)",
             [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "--disable-pip-version-check", "-e", "."],
             {"RCKA_FORCE_CUDA": "1", "RCKA_FORCE_NATIVE": "1", "PIP_NO_INDEX": "1"}),
            ("backends", [py, "-c", "import rcka_kernels as rk; print(rk.available_backends('cuda'), rk.native_status())"], {}),
            ("GPU tests (every environment of the shared suite on the GPU, and what only a GPU shows)",
             _pytest(py, tmp / "marked.xml", "-m", "gpu", *GPU_TESTS),
             {"RCKA_REQUIRE_CUDA": "1", "RCKA_REQUIRE_NATIVE": "1"}),
        ]
    if stage == "sanitize":
        tool = shutil.which("compute-sanitizer") or "compute-sanitizer"
        return [(f"compute-sanitizer {t}",
                 [tool, "--tool", t, "--error-exitcode", "3", py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SANITIZED],
                 {"RCKA_REQUIRE_CUDA": "1", "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}) for t in ("memcheck", "racecheck")]
    if stage == "bench":
        return [("vs efficient plain PyTorch, launch counts",
                 [py, "-m", "benchmarks.bench_efficient", "--device", "cuda", "--backends", "torch,triton,cuda",
                  "--time-budget", "2", "--out", str(out), "--tag", tag], {}),
                ("rk.compare vs peers (those installed)",
                 [py, "-m", "benchmarks.bench_compare", "--device", "cuda", "--quick", "--out", str(out), "--tag", tag], {})]
    raise ValueError(stage)


def dry_run(stages, py: str, out: Path) -> int:
    """Print every command and check that what it names exists (scripts, test files, the marker)."""
    missing = []
    markers = (ROOT / "pyproject.toml").read_text()
    if '"gpu:' not in markers:
        missing.append("the 'gpu' pytest marker in pyproject.toml")
    for stage in stages:
        print(f"\n[{stage}] -> {out}/{stage}.json, {out}/{stage}.log")
        for title, cmd, env in plan(stage, py, out, Path("<tmp>"), "<gpu>"):
            print(f"  {title}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd)}")
            for arg in cmd:
                if arg.startswith("tests/") and not (ROOT / arg).exists():
                    missing.append(arg)
                if arg.startswith("benchmarks.") and not (ROOT / (arg.replace(".", "/") + ".py")).exists():
                    missing.append(arg)
    if missing:
        print("gpu-check --dry-run: MISSING " + ", ".join(missing))
        return 1
    print("\ngpu-check --dry-run: every script, test file and marker the stages name exists")
    return 0


def _run(title: str, cmd, env: dict, log) -> dict:
    log.write(f"\n=== {title}\n$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        text, rc = proc.stdout, proc.returncode
    except FileNotFoundError as e:
        text, rc = f"{e}\n", 127
    log.write(text)
    log.write(f"=== {title}: exit {rc} after {time.perf_counter() - t0:.0f} s\n")
    log.flush()
    print(f"{title}: exit {rc} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"title": title, "exit_code": rc, "seconds": round(time.perf_counter() - t0, 1), "tail": text[-2000:]}


def _test_file(classname: str) -> str:
    """The test file of a junit classname: "tests.build.test_x.TestY" -> "tests/build/test_x.py"."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        name = "/".join(parts[:i]) + ".py"
        if name in GPU_TESTS or (ROOT / name).is_file():
            return name
    return ""


def _environment(test: str, file: str) -> str:
    """The environment a test ran in: the one its parameter id names ("test_x[triton-cuda-float32-5]"),
    else its file's (GPU_TESTS), else "other"."""
    params = "-" + test.partition("[")[2].rstrip("]") + "-"
    for env in sorted(ENVIRONMENTS, key=len, reverse=True):
        if f"-{env}-" in params:
            return env
    return GPU_TESTS.get(file) or "other"


def _junit_counts(paths) -> dict:
    """{environment: {passed, failed, skipped}} from junit XML files."""
    counts = {}
    for path in paths:
        if not path.exists():
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            env = _environment(case.get("name", ""), _test_file(case.get("classname", "")))
            c = counts.setdefault(env, {"passed": 0, "failed": 0, "skipped": 0})
            if case.find("failure") is not None or case.find("error") is not None:
                c["failed"] += 1
            elif case.find("skipped") is not None:
                c["skipped"] += 1
            else:
                c["passed"] += 1
    return counts


def run_stage(stage: str, py: str, out: Path, tag: str) -> bool:
    from benchmarks._harness import env_info

    with tempfile.TemporaryDirectory() as tmp, open(out / f"{stage}.log", "w") as log:
        tmp = Path(tmp)
        steps = [_run(title, cmd, env, log) for title, cmd, env in plan(stage, py, out, tmp, tag)]
        summary = {"stage": stage, "meta": env_info("cuda"), "steps": steps}
        ok = all(s["exit_code"] == 0 for s in steps)
        if stage == "install+test":
            summary["per_backend"] = _junit_counts([tmp / "marked.xml"])
            print("per environment: " + "; ".join(f"{k}: {v['passed']} passed, {v['failed']} failed, {v['skipped']} skipped"
                                                  for k, v in sorted(summary["per_backend"].items())), flush=True)
        if stage == "sanitize":
            for s in steps:  # a sanitizer this machine cannot run is recorded apart from a failure
                unsupported = s["exit_code"] == 127 or UNSUPPORTED.search(s["tail"])
                s["status"] = "unsupported" if unsupported else ("passed" if s["exit_code"] == 0 else "failed")
            ok = all(s["status"] != "failed" for s in steps)
        summary["ok"] = ok
        (out / f"{stage}.json").write_text(json.dumps(summary, indent=1))
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=STAGES + ("all",))
    ap.add_argument("--out", default=None, help="folder for every result (default benchmarks/results/gpu_<gpu>)")
    ap.add_argument("--dry-run", action="store_true", help="print the stages' commands and check what they name; no GPU needed")
    args = ap.parse_args(argv)
    stages = STAGES if args.stage == "all" else (args.stage,)
    py = sys.executable
    if args.dry_run:
        return dry_run(stages, py, Path(args.out or "benchmarks/results/gpu_<gpu>"))
    import torch

    if not torch.cuda.is_available():
        sys.stderr.write(f"gpu-check: FAILED: no CUDA device is visible to PyTorch (torch {torch.__version__}); "
                         "this check needs an NVIDIA GPU (--dry-run shows its plan anywhere).\n")
        return 2
    tag = _slug(torch.cuda.get_device_name())
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_{tag}"
    out.mkdir(parents=True, exist_ok=True)
    failed = [s for s in stages if not run_stage(s, py, out, tag)]
    print(f"\ngpu-check on {tag}: {'FAILED: ' + ', '.join(failed) if failed else 'all stages passed'}; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
