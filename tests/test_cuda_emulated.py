"""The cuda backend's fp32/fp64 kernels, run on the CPU.

csrc/module.cpp and the SIMT kernels of csrc/pair_kernels.cuh are compiled
with g++ against tests/build/cuda_host/emu.h (one std::thread per CUDA thread,
barriers for __syncthreads and shuffles, NaN-filled shared memory) into a
stand-in for rcka_kernels._rcka_cuda. rcka_kernels/ops/cuda_backend.py then
runs unchanged on CPU tensors: its checks, workspaces and reductions, the C++
argument checks, and the kernels' tiling, indexing, synchronisation and
small-group/tiled paths are all exercised, and compared with the torch
backend in float64. The fp16/bf16 tensor-core path runs on an emulation of
wmma (the documented fragment layouts), so this checks the kernels' tile
offsets and alignment, not the hardware: tests/test_cuda_parity.py does that.
"""


import pytest
import torch

from rcka_kernels.ops import torch_backend as tb

from .utils import centred_pair


@pytest.fixture(scope="module")
def emu(cuda_emulation):
    return cuda_emulation


@pytest.fixture
def cb(emu, monkeypatch):
    from rcka_kernels.ops import cuda_backend

    monkeypatch.setattr(cuda_backend, "_lib", lambda: emu)
    monkeypatch.setattr(cuda_backend, "_DEVICE_TYPES", ("cuda", "cpu"))
    return cuda_backend


# the inputs are quantised first and the float64 spec sees the same values, so
# what remains is fp32 accumulation, plus the rounding of half-precision gradients
TOL = {torch.float32: 3e-5, torch.float16: 3e-5, torch.bfloat16: 3e-5, torch.float64: 1e-11}
GTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def _close(a, e, tol, what):
    a, e = a.double(), e.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite"
    err = (a - e).abs().max().item()
    scale = max(e.abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def _inputs(g, n, p, q, dtype, seed=0):
    x, y = centred_pair(g, n, p, q, seed)
    return x.to(dtype), y.to(dtype)


def _gamma(x):
    return (1.0 / (2 * x.double().var(1).sum(-1))).to(tb.compute_dtype(x.dtype))


# (G, n, p, q): small-group path (n <= 128: 1, 2 or 4 tiles) and tiled path (n > 128,
# ragged last tile), p, q below and above a staging chunk (32 fp32 / 16 fp64 features)
SHAPES = [(2, 5, 3, 2), (1, 70, 40, 9), (1, 128, 2, 33), (1, 150, 5, 18), (2, 131, 17, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HALF = (torch.float16, torch.bfloat16)


def _cases(shapes, half_shapes):
    """Every shape in fp32/fp64; the (slower to emulate) wmma dtypes on a small and a tiled shape."""
    return [(*s, d) for s in shapes for d in DTYPES if d not in HALF or s in half_shapes]


@pytest.mark.parametrize("g,n,p,q,dtype", _cases(SHAPES, [(2, 5, 3, 2), (1, 150, 5, 18)]))
def test_rbf_stats(cb, g, n, p, q, dtype):
    x, y = _inputs(g, n, p, q, dtype)
    gx, gy = _gamma(x), _gamma(y)
    s, rx, ry = cb.rbf_stats(x, y, gx, gy)
    es, erx, ery = tb.rbf_stats(x.double(), y.double(), gx.double(), gy.double())
    _close(s, es, TOL[dtype], "S")
    _close(rx, erx, TOL[dtype], "rx")
    _close(ry, ery, TOL[dtype], "ry")
    gen = torch.Generator().manual_seed(3)
    gs = torch.randn(g, 3, generator=gen, dtype=torch.float64)
    grx = torch.randn(g, n, generator=gen, dtype=torch.float64)
    gry = torch.randn(g, n, generator=gen, dtype=torch.float64)
    cd = tb.compute_dtype(dtype)
    dx, dy = cb.rbf_stats_backward(x, y, gx, gy, gs, grx.to(cd), gry.to(cd))
    edx, edy = tb.rbf_stats_backward(x.double(), y.double(), gx.double(), gy.double(), gs, grx, gry)
    assert dx.dtype == dtype and dy.shape == y.shape
    _close(dx, edx, GTOL[dtype], "dx")
    _close(dy, edy, GTOL[dtype], "dy")


@pytest.mark.parametrize("g,n,p,q,dtype", _cases(SHAPES + [(1, 300, 20, 45), (2, 140, 70, 3)], [(1, 70, 40, 9), (1, 300, 20, 45)]))
def test_linear_stats(cb, g, n, p, q, dtype):
    # small Gram tiles, tiled Gram (p + q > n) and feature-space X^T Y tiles (p + q <= n)
    x, y = _inputs(g, n, p, q, dtype, seed=1)
    _close(cb.linear_stats(x, y), tb.linear_stats(x.double(), y.double()), TOL[dtype], "S")


# (G, n, m, p): Z = [X; Y] small (n + m <= 128) and tiled, the X/Y boundary inside a tile
MMD_SHAPES = [(2, 4, 3, 2), (1, 50, 60, 7), (1, 100, 45, 20), (1, 70, 70, 3)]


@pytest.mark.parametrize("g,n,m,p,dtype", _cases(MMD_SHAPES, [(2, 4, 3, 2), (1, 100, 45, 20)]))
def test_mmd_sums(cb, g, n, m, p, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(g, n, p, generator=gen, dtype=torch.float64).to(dtype)
    y = (torch.randn(g, m, p, generator=gen, dtype=torch.float64) + 0.3).to(dtype)
    gamma = _gamma(torch.cat([x, y], 1))
    _close(cb.rbf_mmd_sums(x, y, gamma), tb.rbf_mmd_sums(x.double(), y.double(), gamma.double()), TOL[dtype], "S")
    gs = torch.randn(g, 3, generator=gen, dtype=torch.float64)
    dx, dy = cb.rbf_mmd_sums_backward(x, y, gamma, gs)
    edx, edy = tb.rbf_mmd_sums_backward(x.double(), y.double(), gamma.double(), gs)
    _close(dx, edx, GTOL[dtype], "dx")
    _close(dy, edy, GTOL[dtype], "dy")


def test_public_api_through_the_emulation(cb, monkeypatch):
    # cka with backend="cuda" on CPU tensors: dispatch, custom ops and formulas over the emulated kernels
    import rcka_kernels as rk
    from rcka_kernels import _dispatch, reference

    monkeypatch.setitem(_dispatch._loaded, "cuda", cb)
    monkeypatch.setattr(_dispatch, "_device_reason", lambda name, device: None)
    x, y = _inputs(1, 40, 6, 4, torch.float64, seed=5)
    x, y = x[0].clone().requires_grad_(), y[0].clone().requires_grad_()
    for kernel, debiased in (("rbf", False), ("rbf", True), ("linear", True)):
        out = rk.cka(x, y, kernel=kernel, sigma=1.2 if kernel == "rbf" else None, debiased=debiased, backend="cuda")
        ref = reference.cka(x, y, kernel, 1.2 if kernel == "rbf" else None, debiased)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
        g1 = torch.autograd.grad(out, (x, y))
        g2 = torch.autograd.grad(ref, (x, y))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_emulated_module_checks_arguments(emu):
    with pytest.raises(ValueError, match="unknown dtype"):
        emu.pair_forward(0, 9, 1, (256, 0, 4, 4, 2, 8, 0, 2, 1), (256, 0, 4, 4, 2, 8, 0, 2, 1), 256, 256, 256, 256, 256, 0, 0)
    assert emu.device_status()["device_count"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_is_deterministic_whatever_the_block_order(cb, monkeypatch, dtype):
    """Each block owns the rows it updates (no atomics): with the blocks run in
    shuffled orders, as a GPU may run them, the gradients are bitwise equal."""
    x, y = _inputs(2, 150, 5, 18, dtype)  # several row blocks: the tiled path
    gx, gy = _gamma(x), _gamma(y)
    gen = torch.Generator().manual_seed(5)
    gs = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    grx = torch.randn(2, 150, generator=gen, dtype=torch.float64).to(dtype)
    gry = torch.randn(2, 150, generator=gen, dtype=torch.float64).to(dtype)
    z = torch.cat([x, x + 0.5], 1)[:, :130].contiguous()
    outs = []
    for seed in (None, "1", "2"):
        if seed is None:
            monkeypatch.delenv("RCKA_EMU_BLOCK_ORDER", raising=False)
        else:
            monkeypatch.setenv("RCKA_EMU_BLOCK_ORDER", seed)
        outs.append(cb.rbf_stats_backward(x, y, gx, gy, gs, grx, gry) + cb.rbf_mmd_sums_backward(x, z, gx, gs))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
