"""Host tests of the CUDA kernels' tile arithmetic (csrc/tile_math.cuh).

tests/build/cuda_host/tile_math_test.cpp is compiled for the CPU with g++ (or nvcc
host-only); it self-checks the tile enumeration, the row-sum workspace slots
and the shared-memory layouts, and replays the kernels' tiled algorithm with
the header's functions. Its statistics and gradients are compared here to the
float64 reference (values from rcka_kernels.reference, gradients from autograd
through it). No GPU needed.
"""

import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rcka_kernels import reference

from ..utils import build_cache

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests" / "build" / "cuda_host" / "tile_math_test.cpp"
HEADER = ROOT / "csrc" / "tile_math.cuh"

HSIC_RBF, HSIC_LINEAR, MMD_RBF = 0, 1, 2


def _compiler():
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return [shutil.which(cxx), "-x", "c++"]
    if shutil.which("nvcc"):
        return [shutil.which("nvcc"), "-x", "cu"]  # host code only: no kernels in the test
    return None


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    cc = _compiler()
    if cc is None:
        pytest.skip("no C++ compiler")
    digest = hashlib.sha256(SRC.read_bytes() + HEADER.read_bytes() + " ".join(cc).encode()).hexdigest()[:16]
    cache = build_cache("cuda-host-test")
    exe = cache / f"tile_math_test-{digest}"
    if not exe.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"tmp-{os.getpid()}"
        cmd = cc + ["-std=c++17", "-O2", "-Wall", f"-I{ROOT / 'csrc'}", str(SRC), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"compiling the host test failed:\n{' '.join(cmd)}\n{res.stderr}"
        os.replace(tmp, exe)
    return exe


def test_selfcheck(binary):
    res = subprocess.run([str(binary), "selfcheck"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def _emulate(binary, tmp_path, mode, edge, x, y, gx, gy, gs, grx, gry):
    n, p = x.shape
    m, q = y.shape
    vals = [mode, edge, n, m, p, q, gx, gy]
    body = [x.flatten(), y.flatten(), gs, grx, gry]
    inp, out = tmp_path / "in.txt", tmp_path / "out.txt"
    head = " ".join(repr(float(v)) if isinstance(v, float) else str(v) for v in vals)
    inp.write_text(head + "\n" + "\n".join(" ".join(repr(float(v)) for v in t.tolist()) for t in body) + "\n")
    res = subprocess.run([str(binary), "emulate", str(inp), str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return torch.tensor([float(v) for v in out.read_text().split()], dtype=torch.float64)


def _rbf(x, z, gamma):
    return torch.exp(-gamma * reference.sq_distances(x, z))


def _off_diagonal(k):
    return k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))


# (n, p, q, edge): one tile, a ragged last tile, many tiles, edge larger than n, p = 1
HSIC_CASES = [(5, 3, 2, 64), (11, 4, 7, 4), (33, 5, 3, 8), (17, 1, 1, 5), (9, 6, 2, 3)]


@pytest.mark.parametrize("n,p,q,edge", HSIC_CASES)
@pytest.mark.parametrize("mode", [HSIC_RBF, HSIC_LINEAR])
def test_hsic_tiles_match_reference(binary, tmp_path, mode, n, p, q, edge):
    torch.manual_seed(n * 100 + edge)
    x = torch.randn(n, p, dtype=torch.float64)
    y = torch.randn(n, q, dtype=torch.float64) + 0.5 * x[:, :1]
    gx, gy = 0.5 / p, 0.7 / q
    gs = torch.randn(3, dtype=torch.float64)
    grx, gry = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    out = _emulate(binary, tmp_path, mode, edge, x, y, gx, gy, gs, grx, gry)

    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    if mode == HSIC_RBF:  # the contract's RBF sums leave the (exactly 1) diagonal out
        k = _off_diagonal(reference.gram(xr, "rbf", math.sqrt(0.5 / gx)))
        l = _off_diagonal(reference.gram(yr, "rbf", math.sqrt(0.5 / gy)))
    else:
        k, l = reference.gram(xr, "linear"), reference.gram(yr, "linear")
    s = torch.stack([(k * l).sum(), (k * k).sum(), (l * l).sum()])
    torch.testing.assert_close(out[:3], s.detach(), rtol=1e-12, atol=1e-12)
    if mode == HSIC_LINEAR:
        return
    rx, ry = k.sum(-1), l.sum(-1)
    torch.testing.assert_close(out[3 : 3 + n], rx.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[3 + n : 3 + 2 * n], ry.detach(), rtol=1e-12, atol=1e-12)
    loss = (gs * s).sum() + (grx * rx).sum() + (gry * ry).sum()
    dx, dy = torch.autograd.grad(loss, (xr, yr))
    grads = out[3 + 2 * n :]
    torch.testing.assert_close(grads[: n * p], dx.flatten(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[n * p :], dy.flatten(), rtol=1e-10, atol=1e-10)


# (n, m, p, edge): the X/Y boundary inside a tile, on a tile edge, m != n
MMD_CASES = [(5, 3, 2, 64), (6, 9, 3, 4), (8, 8, 1, 4), (13, 4, 5, 6)]


@pytest.mark.parametrize("n,m,p,edge", MMD_CASES)
def test_mmd_tiles_match_reference(binary, tmp_path, n, m, p, edge):
    torch.manual_seed(n * 100 + m)
    x = torch.randn(n, p, dtype=torch.float64)
    y = torch.randn(m, p, dtype=torch.float64) + 0.3
    gamma = 0.4
    gs = torch.randn(3, dtype=torch.float64)
    zeros = torch.zeros(n, dtype=torch.float64)
    out = _emulate(binary, tmp_path, MMD_RBF, edge, x, y, gamma, 0.0, gs, zeros, zeros)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    kxx, kyy = _off_diagonal(_rbf(xr, None, gamma)), _off_diagonal(_rbf(yr, None, gamma))
    s = torch.stack([kxx.sum(), kyy.sum(), _rbf(xr, yr, gamma).sum()])
    torch.testing.assert_close(out[:3], s.detach(), rtol=1e-12, atol=1e-12)
    dx, dy = torch.autograd.grad((gs * s).sum(), (xr, yr))
    torch.testing.assert_close(out[3 : 3 + n * p], dx.flatten(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[3 + n * p :], dy.flatten(), rtol=1e-10, atol=1e-10)
