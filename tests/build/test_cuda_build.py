"""The CUDA kernels compile for sm_80 and sm_90 without register spills.

Each csrc/kernels_<dtype>.cu is compiled to a cubin with ``nvcc -Xptxas -v``
for both architectures (no GPU needed). The test fails on a compile error, on
any non-zero "spill stores"/"spill loads", on a missing kernel, and when the
fp16/bf16 kernels do not use tensor cores (wmma in their PTX). Results are
cached under ~/.cache/rcka-kernels-tests/ptxas-check/ (tests/utils.py: build_cache),
keyed by the sources, the flags and the nvcc version, so unchanged sources cost
nothing the second time, in this clone or another.
"""

import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ..utils import build_cache

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCHS = (80, 90)
DTYPES = ("f32", "f16", "bf16", "f64")
FLAGS = ["-std=c++17", "-O3"]  # and -I csrc/ (not in the cache key: a clone elsewhere has the same sources)
# entry points every kernels_<dtype>.cu must define: 3 forward modes and 2
# backward modes, each small-group and tiled, and the feature-space kernel
KERNELS = [f"pair_forward_kernel.*Li{m}ELb{s}E" for m in (0, 1, 2) for s in (0, 1)]
KERNELS += [f"pair_backward_kernel.*Li{m}ELb{s}E" for m in (0, 2) for s in (0, 1)]
KERNELS += ["cross_sq_kernel"]

nvcc = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(nvcc is None, reason="nvcc not found")


def _key() -> str:
    h = hashlib.sha256()
    for f in sorted(CSRC.glob("*")):
        if f.suffix in (".cu", ".cuh", ".h"):
            h.update(f.name.encode() + f.read_bytes())
    h.update(" ".join(FLAGS).encode())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def _compile(job):
    """(returncode, ptxas log) of one (dtype, arch, kind) compile, cached."""
    dtype, arch, kind, cache = job
    log = cache / f"{dtype}-sm{arch}-{kind}.log"
    if log.exists():
        rc, text = log.read_text().split("\n", 1)
        return int(rc), text
    src = CSRC / f"kernels_{dtype}.cu"
    out = cache / f"{dtype}-sm{arch}.{kind}"
    if kind == "cubin":
        cmd = [nvcc, *FLAGS, f"-I{CSRC}", "-cubin", "-Xptxas", "-v", f"-arch=sm_{arch}", str(src), "-o", str(out)]
    else:
        cmd = [nvcc, *FLAGS, f"-I{CSRC}", "-ptx", f"-arch=sm_{arch}", str(src), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    text = " ".join(cmd) + "\n" + res.stdout + res.stderr
    if kind == "ptx" and res.returncode == 0:
        text += "\n" + out.read_text()
    tmp = log.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{res.returncode}\n{text}")
    os.replace(tmp, log)
    return res.returncode, text


@pytest.fixture(scope="module")
def logs():
    cache = build_cache("ptxas-check") / _key()
    cache.mkdir(parents=True, exist_ok=True)
    jobs = [(d, a, "cubin", cache) for d in DTYPES for a in ARCHS]
    jobs += [(d, 80, "ptx", cache) for d in ("f16", "bf16")]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
        results = list(ex.map(_compile, jobs))
    return {(j[0], j[1], j[2]): r for j, r in zip(jobs, results)}


def parse_ptxas(text: str):
    """{kernel: (registers, spill stores, spill loads)} from `ptxas -v` output."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, [0, 0, 0])
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, [0, 0, 0])
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur is not None:
            out[cur][1] += int(m.group(1))
            out[cur][2] += int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur is not None:
            out[cur][0] = int(m.group(1))
    return {k: tuple(v) for k, v in out.items()}


def test_parse_ptxas_reads_spills():
    text = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert parse_ptxas(text) == {"_Z1kv": (255, 12, 4)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_compile_without_spills(logs, dtype, arch):
    rc, text = logs[(dtype, arch, "cubin")]
    assert rc == 0, f"nvcc failed for kernels_{dtype}.cu, sm_{arch}:\n{text[-4000:]}"
    kernels = parse_ptxas(text)
    for pattern in KERNELS:
        assert any(re.search(pattern, k) for k in kernels), f"{pattern} missing from kernels_{dtype}.cu (sm_{arch}): {sorted(kernels)}"
    spills = {k: v for k, v in kernels.items() if v[1] or v[2]}
    assert not spills, f"register spills in kernels_{dtype}.cu, sm_{arch}: {spills}"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_kernels_use_tensor_cores(logs, dtype):
    rc, text = logs[(dtype, 80, "ptx")]
    assert rc == 0, text[-4000:]
    assert re.search(r"wmma\.mma\.sync\.aligned\.row\.col\.m16n16k16\.f32", text), "no wmma mma in the PTX"
