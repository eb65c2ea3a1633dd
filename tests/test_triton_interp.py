"""The Triton kernels themselves, run by Triton's interpreter on CPU tensors.

TRITON_INTERPRET=1 must be in the environment before triton is imported: the
``interpreter`` marker has tests/conftest.py run these tests' bodies in one child
pytest with the variable set, each reported as its own test here (or run the file
directly: ``TRITON_INTERPRET=1 pytest tests/test_triton_interp.py``).
Shapes are small (the interpreter runs every program in NumPy);
RCKA_TRITON_MAX_BLOCK=16 forces several tiles at these sizes so the symmetric
tiling, the partial tiles and the feature/sample loops are all exercised. The
interpreter's bf16 ``tl.dot`` is wrong (triton 3.9), so bf16 is left to the GPU tests.
"""

import pytest
import torch
from torch.autograd import gradcheck

import rcka_kernels as rk
from rcka_kernels import reference
from rcka_kernels.ops import torch_backend, triton_backend

if triton_backend.unavailable_reason():
    pytest.skip(triton_backend.unavailable_reason(), allow_module_level=True)

from .utils import TOL, assert_close, assert_grads_within_torch_error, fp32_matmul_precision  # noqa: E402

pytestmark = pytest.mark.interpreter

# (n, p, q): n < tile, n not a multiple of the tile, p = 1, p != q, both linear paths,
# features wider than 64 (the backward's 128-column chunks on 32-row blocks)
SHAPES = [(4, 1, 1), (5, 3, 2), (7, 1, 9), (33, 17, 5), (33, 40, 48), (70, 6, 3), (40, 80, 12)]
KERNELS = [("linear", None), ("rbf", None), ("rbf", "mean")]


@pytest.fixture
def tiles16(monkeypatch):
    monkeypatch.setenv("RCKA_TRITON_MAX_BLOCK", "16")


def _pair(n, p, q, dtype, batch=(2,)):
    x = torch.randn(*batch, n, p, dtype=torch.float64)
    y = 0.5 * torch.randn(*batch, n, q, dtype=torch.float64)
    k = min(p, q)
    y[..., :k] += x[..., :k]
    return (x * 2.0 + 0.7).to(dtype), y.to(dtype)


def _grads(fn, x, y, w):
    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
    (fn(a, b) * w).sum().backward()
    return a.grad, b.grad


def _check_grads(f, r, x, y, w, dtype):
    """Gradients against the float64 reference, judged against the torch backend's
    own error in the same precision (FlashAttention's rule): the estimators at tiny
    n are ill-conditioned, so a fixed tolerance would test the problem, not the kernel."""
    wl = w.to(torch.float32)
    got = _grads(lambda a, b: f(a, b, "triton"), x, y, wl)
    base = _grads(lambda a, b: f(a, b, "torch"), x, y, wl)
    want = _grads(r, x, y, w)
    rtol = TOL[dtype][1]
    assert_grads_within_torch_error(got, base, want, (x, y), rtol)


def _cka_case(x, y, kernel, sigma, debiased):
    dtype = x.dtype
    for fn, ref in ((rk.cka, reference.cka), (rk.hsic, reference.hsic)):
        got = fn(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend="triton")
        want = ref(x, y, kernel, sigma, debiased)
        scale = 1.0 if fn is rk.cka else float(want.abs().max()) or 1.0
        assert_close(got / scale, want / scale, dtype)
    f = lambda a, b, be: rk.cka(a, b, kernel=kernel, sigma=sigma, debiased=debiased, backend=be)  # noqa: E731
    r = lambda a, b: reference.cka(a.double(), b.double(), kernel, sigma, debiased)  # noqa: E731
    _check_grads(f, r, x, y, torch.randn(x.shape[0], dtype=torch.float64), dtype)


@pytest.mark.parametrize("n,p,q", SHAPES)
@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_hsic_values_and_gradients(n, p, q, kernel, sigma, debiased):
    if debiased and n < 4:
        pytest.skip("debiased needs n >= 4")
    _cka_case(*_pair(n, p, q, torch.float32), kernel, sigma, debiased)


@pytest.mark.parametrize("n,p,q", [(33, 17, 5), (21, 3, 40)])
@pytest.mark.parametrize("kernel,sigma", KERNELS[:2])
def test_many_tiles(tiles16, n, p, q, kernel, sigma):
    """16-row tiles: upper-triangle tiles, partial last tiles, several feature chunks."""
    _cka_case(*_pair(n, p, q, torch.float32), kernel, sigma, True)


@pytest.mark.parametrize("kernel,sigma,n", [("linear", None, 37), ("linear", None, 70), ("rbf", None, 37)])
def test_float16_inputs(kernel, sigma, n):
    """n = 37: the sample-space linear path (p + q > n); n = 70: feature space."""
    x, y = _pair(n, 20, 24, torch.float16)
    got = rk.cka(x, y, kernel=kernel, sigma=sigma, backend="triton")
    assert got.dtype == torch.float32
    assert_close(got, reference.cka(x, y, kernel, sigma), torch.float16)
    f = lambda a, b, be: rk.cka(a, b, kernel=kernel, sigma=sigma, backend=be)  # noqa: E731
    r = lambda a, b: reference.cka(a.double(), b.double(), kernel, sigma)  # noqa: E731
    _check_grads(f, r, x, y, torch.randn(2, dtype=torch.float64), torch.float16)


@pytest.mark.parametrize("n,m,d,tiles", [(1, 1, 1, 64), (5, 9, 3, 64), (40, 23, 7, 64), (40, 23, 7, 16)])
@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_values_and_gradients(monkeypatch, n, m, d, tiles, unbiased):
    if unbiased and min(n, m) < 2:
        pytest.skip("the unbiased estimator needs two samples on each side")
    monkeypatch.setenv("RCKA_TRITON_MAX_BLOCK", str(tiles))
    dtype = torch.float32
    x = torch.randn(2, n, d).to(dtype)
    z = (torch.randn(2, m, d) * 1.3 + 0.4).to(dtype)
    got = rk.mmd(x, z, unbiased=unbiased, backend="triton")
    assert_close(got, reference.mmd(x, z, "rbf", None, unbiased), dtype)
    f = lambda a, b, be: rk.mmd(a, b, unbiased=unbiased, backend=be)  # noqa: E731
    r = lambda a, b: reference.mmd(a.double(), b.double(), "rbf", None, unbiased)  # noqa: E731
    _check_grads(f, r, x, z, torch.randn(2, dtype=torch.float64), dtype)


@pytest.mark.parametrize("n,p,q", [(33, 5, 3), (3, 40, 2)])  # feature- and sample-space linear
def test_contract_outputs_match_torch_backend(tiles16, n, p, q):
    """Every output of every contract function, including the RBF row sums and
    the raw backward of arbitrary cotangents, equals the torch backend (fp64)."""
    dt = torch.float64
    g = 2
    x = torch.randn(g, n, p, dtype=dt)
    y = torch.randn(g, n, q, dtype=dt)
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    gx, gy = torch.rand(g, dtype=dt) + 0.1, torch.rand(g, dtype=dt) + 0.1
    gs = torch.randn(g, 3, dtype=dt)
    grx, gry = torch.randn(g, n, dtype=dt), torch.randn(g, n, dtype=dt)
    z = torch.randn(g, n + 4, p, dtype=dt)

    def same(a, b):
        a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert u.shape == v.shape and u.dtype == v.dtype
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)

    for name, args in [
        ("linear_stats", (x, y)),
        ("linear_stats_backward", (x, y, gs)),
        ("rbf_stats", (x, y, gx, gy)),
        ("rbf_stats_backward", (x, y, gx, gy, gs, grx, gry)),
        ("rbf_mmd_sums", (x, z, gx)),
        ("rbf_mmd_sums_backward", (x, z, gx, gs)),
    ]:
        want = getattr(torch_backend, name)(*args)
        if name == "linear_stats" and isinstance(want, tuple):
            want = want[0]  # the torch backend may also keep X^T Y etc. for its backward; this one recomputes
        same(getattr(triton_backend, name)(*args), want)


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 0.8)])
@pytest.mark.parametrize("n,p,q", [(6, 2, 3), (5, 4, 3)])  # sample- and feature-space linear paths
def test_gradcheck_float64(monkeypatch, kernel, sigma, n, p, q):
    monkeypatch.setenv("RCKA_TRITON_MAX_BLOCK", "16")
    x, y = _pair(n, p, q, torch.float64, batch=(1,))
    x.requires_grad_(), y.requires_grad_()
    assert gradcheck(lambda a, b: rk.cka(a, b, kernel=kernel, sigma=sigma, debiased=True, backend="triton"), (x, y))


def test_gradcheck_mmd_float64():
    x = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    z = (torch.randn(1, 4, 2, dtype=torch.float64) + 0.3).requires_grad_()
    assert gradcheck(lambda a, b: rk.mmd(a, b, sigma=0.9, unbiased=True, backend="triton"), (x, z))


def test_batched_groups_one_launch_equal_per_group_calls():
    x, y = _pair(19, 4, 6, torch.float64, batch=(2, 3))
    got = rk.cka(x, y, kernel="rbf", backend="triton")
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(got[i, j], reference.cka(x[i, j], y[i, j], "rbf", None), rtol=1e-10, atol=1e-12)


def test_torch_compile_fullgraph_traces():
    """The custom ops are opaque to dynamo: the whole function is one graph."""

    def f(a, b):
        return rk.cka(a, b, kernel="rbf", sigma=1.0, backend="triton") + rk.cka(a, b, backend="triton")

    x, y = _pair(12, 3, 4, torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = x.clone().requires_grad_()
    out = compiled(a, y)
    torch.testing.assert_close(out, f(x, y))
    out.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_empty_batch_of_groups():
    """G = 0 (an empty leading batch) launches nothing and returns empty results, as the torch backend does."""
    x, y, z = torch.randn(0, 5, 3), torch.randn(0, 5, 2), torch.randn(0, 4, 3)
    gam, gs, r = torch.ones(0), torch.ones(0, 3, dtype=torch.float64), torch.ones(0, 5)
    for name, args in [
        ("linear_stats", (x, y)),
        ("linear_stats_backward", (x, y, gs)),
        ("rbf_stats", (x, y, gam, gam)),
        ("rbf_stats_backward", (x, y, gam, gam, gs, r, r)),
        ("rbf_mmd_sums", (x, z, gam)),
        ("rbf_mmd_sums_backward", (x, z, gam, gs)),
    ]:
        got, want = getattr(triton_backend, name)(*args), getattr(torch_backend, name)(*args)
        if name == "linear_stats":
            got, want = (got,), (want[0] if isinstance(want, tuple) else want,)
        assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]


def test_rbf_under_the_current_tf32_api():
    """torch.backends.cuda.matmul.fp32_precision = "tf32" (PyTorch's current API): the
    backend runs (it used to raise "mix of the legacy and new APIs")."""
    with fp32_matmul_precision("tf32", current_api=True):
        x, y = _pair(12, 3, 4, torch.float32)
        got = rk.cka(x, y, kernel="rbf", sigma=1.3, backend="triton")
        assert_close(got, reference.cka(x, y, "rbf", 1.3), torch.float32)
