"""The cuda backend on a GPU: values and gradients against the float64 reference.

Two levels:
- the backend contract (ops/_contract.py): every function of cuda_backend
  against torch_backend evaluated in float64 on the same (quantised) inputs,
  over shapes that take the small-group path (n <= 128) and the tiled path
  (ragged last tiles, p and q larger than a feature chunk), both linear paths
  (sample and feature space), batched groups, fp32/fp16/bf16/fp64, with
  cotangents that are not all ones;
- the public API (cka, hsic, mmd with backend="cuda", both estimators) against
  rcka_kernels.reference, values and gradients, plus gradcheck in float64.

Skipped without a CUDA device (the `gpu` marker). On a GPU machine where the
library is not built the tests skip with the reason, unless RCKA_REQUIRE_CUDA=1.
"""

import os

import pytest
import torch
from torch.autograd import gradcheck

import rcka_kernels as rk
from rcka_kernels import _cuda, reference
from rcka_kernels.ops import torch_backend as tb

from .utils import SHAPES, assert_close, centred_pair

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (G, n, p, q): small-group path (n <= 128) and tiled path (n > 128; > 2 tiles, ragged)
STAT_SHAPES = [(1, 5, 3, 2), (3, 33, 17, 5), (2, 64, 40, 8), (2, 128, 7, 70), (1, 129, 12, 7), (2, 200, 45, 33), (1, 300, 3, 1)]
# (G, n, m, p): MMD over Z = [X; Y] with n + m <= 128 and > 128
MMD_SHAPES = [(1, 4, 3, 2), (2, 40, 70, 9), (1, 100, 29, 5), (2, 150, 90, 37), (1, 7, 200, 3)]


@pytest.fixture(autouse=True)
def _need_library():
    if not _cuda.available():
        if os.environ.get("RCKA_REQUIRE_CUDA") == "1":
            pytest.fail(f"cuda backend unavailable: {_cuda.reason()}")
        pytest.skip(f"cuda backend unavailable: {_cuda.reason()}")


def _cb():
    from rcka_kernels.ops import cuda_backend

    return cuda_backend


def _rel_close(actual, expected, tol, what=""):
    """max |a - e| <= tol * max(|e|, 1e-30): errors judged against the size of the result."""
    a, e = actual.double().cpu(), expected.double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-30)
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


# relative tolerance of the statistics per input dtype (the inputs are quantised
# first and the float64 spec sees the same quantised values, so what remains is
# accumulation error: fp32 inside a tile, float64 across tiles)
STAT_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
# gradients carry the input rounding of the returned dtype
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _inputs(g, n, p, q, dtype, seed=0):
    x, y = centred_pair(g, n, p, q, seed)
    return x.to(dtype).cuda(), y.to(dtype).cuda()


def _gammas(x):
    # about 1 / (2 * mean squared distance): kernel values spread over (0, 1)
    d = 2 * x.double().var(1).sum(-1).clamp_min(1e-6)
    return (1.0 / d).to(tb.compute_dtype(x.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g,n,p,q", STAT_SHAPES)
def test_rbf_stats_contract(g, n, p, q, dtype):
    x, y = _inputs(g, n, p, q, dtype)
    gx, gy = _gammas(x), _gammas(y)
    s, rx, ry = _cb().rbf_stats(x, y, gx, gy)
    s_ref, rx_ref, ry_ref = tb.rbf_stats(x.double(), y.double(), gx.double(), gy.double())
    cd = tb.compute_dtype(dtype)
    assert s.dtype == torch.float64 and rx.dtype == cd and ry.dtype == cd and rx.shape == (g, n)
    tol = STAT_TOL[dtype]
    _rel_close(s, s_ref, tol, "S")
    _rel_close(rx, rx_ref, tol, "K 1")
    _rel_close(ry, ry_ref, tol, "L 1")

    gen = torch.Generator().manual_seed(1)
    gs = torch.randn(g, 3, generator=gen, dtype=torch.float64).cuda()
    grx = torch.randn(g, n, generator=gen, dtype=torch.float64).to(cd).cuda()
    gry = torch.randn(g, n, generator=gen, dtype=torch.float64).to(cd).cuda()
    dx, dy = _cb().rbf_stats_backward(x, y, gx, gy, gs, grx, gry)
    dx_ref, dy_ref = tb.rbf_stats_backward(x.double(), y.double(), gx.double(), gy.double(), gs, grx.double(), gry.double())
    assert dx.dtype == dtype and dy.dtype == dtype and dx.shape == x.shape and dy.shape == y.shape
    _rel_close(dx, dx_ref, GRAD_TOL[dtype], "dx")
    _rel_close(dy, dy_ref, GRAD_TOL[dtype], "dy")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g,n,p,q", STAT_SHAPES + [(2, 500, 20, 30), (1, 257, 64, 1)])
def test_linear_stats_contract(g, n, p, q, dtype):
    # n <= 128: small-group Gram tiles; p + q > n: tiled Gram; else feature-space X^T Y tiles
    x, y = _inputs(g, n, p, q, dtype)
    s = _cb().linear_stats(x, y)
    _rel_close(s, tb.linear_stats(x.double(), y.double()), STAT_TOL[dtype], "S")
    gs = torch.randn(g, 3, dtype=torch.float64).cuda()
    dx, dy = _cb().linear_stats_backward(x, y, gs)
    dx_ref, dy_ref = tb.linear_stats_backward(x.double(), y.double(), gs)
    _rel_close(dx, dx_ref, GRAD_TOL[dtype], "dx")
    _rel_close(dy, dy_ref, GRAD_TOL[dtype], "dy")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g,n,m,p", MMD_SHAPES)
def test_mmd_sums_contract(g, n, m, p, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(g, n, p, generator=gen, dtype=torch.float64).to(dtype).cuda()
    y = (torch.randn(g, m, p, generator=gen, dtype=torch.float64) + 0.3).to(dtype).cuda()
    gamma = _gammas(torch.cat([x, y], 1))
    s = _cb().rbf_mmd_sums(x, y, gamma)
    _rel_close(s, tb.rbf_mmd_sums(x.double(), y.double(), gamma.double()), STAT_TOL[dtype], "S")
    gs = torch.randn(g, 3, generator=gen, dtype=torch.float64).cuda()
    dx, dy = _cb().rbf_mmd_sums_backward(x, y, gamma, gs)
    dx_ref, dy_ref = tb.rbf_mmd_sums_backward(x.double(), y.double(), gamma.double(), gs)
    assert dx.dtype == dtype and dy.shape == y.shape
    _rel_close(dx, dx_ref, GRAD_TOL[dtype], "dx")
    _rel_close(dy, dy_ref, GRAD_TOL[dtype], "dy")


def test_many_small_groups_match_one_by_one():
    # PCKA-style: many tiny groups in one launch equal the same groups one at a time
    x, y = _inputs(37, 16, 9, 4, torch.float32)
    gx, gy = _gammas(x), _gammas(y)
    s, rx, _ = _cb().rbf_stats(x, y, gx, gy)
    for i in (0, 17, 36):
        si, rxi, _ = _cb().rbf_stats(x[i : i + 1].contiguous(), y[i : i + 1].contiguous(), gx[i : i + 1], gy[i : i + 1])
        torch.testing.assert_close(s[i : i + 1], si, rtol=0, atol=0)
        torch.testing.assert_close(rx[i : i + 1], rxi, rtol=0, atol=0)


def test_runs_on_the_current_stream():
    x, y = _inputs(2, 150, 10, 6, torch.float32)
    gx, gy = _gammas(x), _gammas(y)
    expected = _cb().rbf_stats(x, y, gx, gy)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _cb().rbf_stats(x, y, gx, gy)[0]
    torch.cuda.current_stream().wait_stream(side)
    _rel_close(got, expected, 1e-12, "S on a side stream")


def test_wrapper_rejects_bad_inputs():
    x, y = _inputs(1, 10, 4, 3, torch.float32)
    g = torch.ones(1, device="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        _cb().rbf_stats(x.transpose(1, 2).contiguous().transpose(1, 2), y, g, g)
    with pytest.raises(TypeError, match="dtype"):
        _cb().rbf_stats(x, y.double(), g, g)
    with pytest.raises(ValueError, match="rows"):
        _cb().rbf_stats(x, y[:, :9].contiguous(), g, g)
    with pytest.raises(ValueError, match="features"):
        _cb().rbf_mmd_sums(x, y, g)
    with pytest.raises(ValueError, match="shape"):
        _cb().rbf_stats(x, y, torch.ones(2, device="cuda"), g)


# ----------------------------------------------------------------------------- public API


def _pair(n, p, q, dtype, batch=()):
    x = torch.randn(*batch, n, p, dtype=torch.float64)
    y = 0.5 * torch.randn(*batch, n, q, dtype=torch.float64)
    k = min(p, q)
    y[..., :k] += x[..., :k]
    return (x * 3.0 + 1.5).to(dtype).cuda(), y.to(dtype).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", None), ("rbf", 1.3)])
@pytest.mark.parametrize("n,p,q", SHAPES + [(200, 20, 9)])
def test_cka_matches_reference(n, p, q, kernel, sigma, debiased, dtype):
    if debiased and n < 4:
        pytest.skip("the debiased estimator needs n >= 4")
    x, y = _pair(n, p, q, dtype)
    xg, yg = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    out = rk.cka(xg, yg, kernel=kernel, sigma=sigma, debiased=debiased, backend="cuda")
    # the reference sees the same quantised inputs, in float64 on the CPU
    xr, yr = x.double().cpu().requires_grad_(), y.double().cpu().requires_grad_()
    ref = reference.cka(xr, yr, kernel, sigma, debiased)
    assert_close(out.cpu(), ref.detach(), dtype, scale=5.0)
    w = torch.tensor(0.7, dtype=torch.float64)
    (out * w.to(out.dtype).cuda()).backward()
    (ref * w).backward()
    _rel_close(xg.grad, xr.grad, 10 * GRAD_TOL[dtype], "dcka/dx")
    _rel_close(yg.grad, yr.grad, 10 * GRAD_TOL[dtype], "dcka/dy")


@pytest.mark.parametrize("debiased", [False, True])
def test_batched_groups_match_reference(debiased):
    x, y = _pair(20, 6, 5, torch.float32, batch=(4, 3))
    out = rk.cka(x, y, kernel="rbf", debiased=debiased, backend="cuda")
    ref = reference.cka(x.double().cpu(), y.double().cpu(), "rbf", None, debiased)
    assert out.shape == (4, 3)
    assert_close(out.cpu(), ref, torch.float32, scale=5.0)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("n,m,p", [(5, 7, 3), (60, 90, 8), (300, 130, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mmd_matches_reference(n, m, p, unbiased, dtype):
    x = torch.randn(n, p, dtype=torch.float64)
    y = torch.randn(m, p, dtype=torch.float64) * 1.2 + 0.4
    xg, yg = x.to(dtype).cuda().requires_grad_(), y.to(dtype).cuda().requires_grad_()
    out = rk.mmd(xg, yg, sigma=1.5, unbiased=unbiased, backend="cuda")
    xr, yr = x.to(dtype).double().requires_grad_(), y.to(dtype).double().requires_grad_()
    ref = reference.mmd(xr, yr, "rbf", 1.5, unbiased)
    assert_close(out.cpu(), ref.detach(), dtype, scale=5.0)
    out.backward()
    ref.backward()
    _rel_close(xg.grad, xr.grad, 10 * GRAD_TOL[dtype], "dmmd/dx")
    _rel_close(yg.grad, yr.grad, 10 * GRAD_TOL[dtype], "dmmd/dy")


@pytest.mark.parametrize("n", [7, 131])
def test_gradcheck_float64(n):
    x, y = _pair(n, 3, 2, torch.float64)
    x.requires_grad_()
    y.requires_grad_()
    assert gradcheck(lambda a, b: rk.cka(a, b, kernel="rbf", sigma=1.1, backend="cuda"), (x, y), eps=1e-6, atol=1e-6)
    assert gradcheck(lambda a, b: rk.hsic(a, b, kernel="rbf", sigma=0.9, debiased=True, backend="cuda"), (x, y), eps=1e-6, atol=1e-6)
    z = (torch.randn(n + 2, 3, dtype=torch.float64) + 0.2).cuda().requires_grad_()
    assert gradcheck(lambda a, b: rk.mmd(a, b, sigma=1.3, unbiased=True, backend="cuda"), (x, z), eps=1e-6, atol=1e-6)
