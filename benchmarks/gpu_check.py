"""``make gpu-check``: on a machine with an NVIDIA GPU, build and install the
package, run the whole test suite on CUDA tensors, run the GPU benchmarks, and
write every result tagged with the GPU's name, versions, date and commit into
benchmarks/results/. Without a GPU it stops at once with exit code 2.

    python benchmarks/gpu_check.py             # everything (tests + benchmarks)
    python benchmarks/gpu_check.py --no-bench  # build + tests only
    python benchmarks/gpu_check.py --quick     # build + tests + quick benchmarks

Steps (each logged; a failing step does not stop the later ones, the exit code
is non-zero if any failed):
 1. ``pip install --no-build-isolation --no-deps -e .`` (builds csrc/ where nvcc exists)
 2. ``pytest tests`` with RCKA_TEST_DEVICES=cpu,cuda -> results/gpu_tests_<gpu>.json,
    then compute-sanitizer memcheck and racecheck over the CUDA backend's contract tests
 3. bench_vs_naive, bench_peers, bench_mmd, bench_losses on cuda, and the full
    bench_scaling sweep (n 128..65536, p in 64..4096, linear/RBF, biased/debiased,
    float32/bfloat16) -> results/*_<gpu>_cuda.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _require_gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        sys.stderr.write(
            f"gpu-check: FAILED: no CUDA device is visible to PyTorch (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}). This check needs an NVIDIA GPU; on a CPU-only machine "
            "run `make test` and `make bench` instead.\n"
        )
        sys.exit(2)
    return torch.cuda.get_device_name()


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return re.sub(r"^nvidia-", "", s)[:40]


def _step(title: str, cmd, log: Path, env=None) -> int:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n=== {title}\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = []
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
            tail = (tail + [line])[-40:]
        rc = proc.wait()
    print(f"=== {title}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    _step.tails[title] = "".join(tail)
    return rc


_step.tails = {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-bench", action="store_true", help="build and test only")
    ap.add_argument("--quick", action="store_true", help="quick benchmarks instead of the full sweeps")
    ap.add_argument("--no-install", action="store_true", help="skip the pip install step")
    args = ap.parse_args(argv)

    gpu = _require_gpu()
    slug = _slug(gpu)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    log = results / f"gpu_check_{slug}.log"
    log.write_text(f"gpu-check on {gpu}\n")
    py = sys.executable
    failed = []

    if not args.no_install:
        if _step("build + install", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], log):
            failed.append("install")

    # the test suite on CUDA tensors (conftest: RCKA_TEST_DEVICES), gpu-marked tests included
    env = dict(os.environ, RCKA_TEST_DEVICES="cpu,cuda")
    rc = _step("tests on cpu + cuda", [py, "-m", "pytest", "-q", "-rfEs", "tests"], log, env=env)
    if rc:
        failed.append("tests")
    from benchmarks._harness import env_info

    summary = [l for l in _step.tails["tests on cpu + cuda"].splitlines() if re.search(r"\d+ (passed|failed)", l)]
    (results / f"gpu_tests_{slug}.json").write_text(json.dumps(
        {"meta": env_info("cuda"), "exit_code": rc, "summary": summary[-1] if summary else None,
         "tail": _step.tails["tests on cpu + cuda"]}, indent=1))

    # compute-sanitizer memcheck and racecheck over the CUDA backend's parity tests (small shapes)
    sanitizer = shutil.which("compute-sanitizer")
    for tool in ("memcheck", "racecheck"):
        if sanitizer is None:
            print(f"compute-sanitizer not found: {tool} not run", flush=True)
            failed.append(f"{tool} (no compute-sanitizer)")
            continue
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "3", py, "-m", "pytest", "-q", "-x",
               "tests/test_cuda_parity.py", "-k", "contract"]
        if _step(f"compute-sanitizer {tool}", cmd, log, env=dict(os.environ, RCKA_REQUIRE_CUDA="1")):
            failed.append(tool)

    if not args.no_bench:
        tag = ["--tag", slug]
        # the comparison users care about most first: against the efficient plain-PyTorch formula, with launch counts
        runs = [("vs efficient plain PyTorch", ["-m", "benchmarks.bench_efficient", "--device", "cuda", *(["--quick"] if args.quick else []), *tag])]
        if args.quick:
            runs += [("quick benchmarks", ["-m", "benchmarks.run_all", "--quick", "--device", "cuda", "--", *tag])]
        else:
            runs += [
                ("issue-2 vs naive", ["-m", "benchmarks.bench_vs_naive", "--device", "cuda", *tag]),
                ("peers", ["-m", "benchmarks.bench_peers", "--device", "cuda", "--n", "256-32768", *tag]),
                ("mmd", ["-m", "benchmarks.bench_mmd", "--device", "cuda", "--n", "256-65536", "--d", "64,256", *tag]),
                ("losses", ["-m", "benchmarks.bench_losses", "--device", "cuda", *tag]),
                ("scaling (full sweep)", ["-m", "benchmarks.bench_scaling", "--device", "cuda", "--n", "128-65536",
                                          "--p", "64,256,1024,4096", "--kernels", "linear,rbf", "--estimators", "biased,debiased",
                                          "--dtypes", "float32,bfloat16", "--timeout", "120", *tag]),
            ]
        for title, cmd in runs:
            if _step(title, [py, *cmd], log):
                failed.append(title)

    print(f"\ngpu-check on {gpu}: {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'}; "
          f"results in {results.relative_to(ROOT)} (tag {slug})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
