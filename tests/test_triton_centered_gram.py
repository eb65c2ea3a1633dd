"""The fused one-pass Triton centered_gram, run by Triton's interpreter on CPU.

Like tests/test_triton_interp.py this needs TRITON_INTERPRET=1 before triton is
imported: its tests are marked ``interpreter``, and tests/conftest.py runs them in
a child pytest with the variable set, each reported as its own test.
RCKA_TRITON_MAX_BLOCK=16 gives several (partial) tiles at n = 33 and 70.
"""

import pytest
import torch
from torch.autograd import gradcheck

import rcka_kernels as rk
from rcka_kernels import reference
from rcka_kernels.ops import triton_backend

if triton_backend.unavailable_reason():
    pytest.skip(triton_backend.unavailable_reason(), allow_module_level=True)

from .utils import assert_close  # noqa: E402

pytestmark = pytest.mark.interpreter

# (n, p, G): n below, at and across 16-row tiles, p = 1, G = 1 and 3
SHAPES = [(4, 1, 1), (5, 7, 3), (33, 7, 3), (33, 1, 1), (70, 7, 1), (70, 1, 3)]
KERNELS = [("linear", None), ("rbf", None), ("rbf", 1.3)]


@pytest.fixture
def tiles16(monkeypatch):
    monkeypatch.setenv("RCKA_TRITON_MAX_BLOCK", "16")


@pytest.fixture
def calls(monkeypatch):
    """Counts the Triton backend's centered_gram launches (the fused path was taken)."""
    seen = []
    orig = triton_backend.centered_gram

    def spy(*a, **k):
        seen.append(a[0].shape)
        return orig(*a, **k)

    monkeypatch.setattr(triton_backend, "centered_gram", spy)
    return seen


def _x(g, n, p, dtype=torch.float32):
    return (torch.randn(g, n, p, dtype=torch.float64) * 2.0 + 0.7).to(dtype)


@pytest.mark.parametrize("n,p,g", SHAPES)
@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("debiased", [False, True])
def test_values_and_gradients(tiles16, calls, n, p, g, kernel, sigma, debiased):
    dtype = torch.float32
    x = _x(g, n, p, dtype)
    got = rk.centered_gram(x, kernel=kernel, sigma=sigma, debiased=debiased, backend="triton")
    want = reference.centered_gram(x, kernel, sigma, debiased)
    assert calls, "the fused Triton kernel was not used"
    assert got.dtype == dtype and got.shape == (g, n, n)
    scale = float(want.abs().max()) or 1.0
    assert_close(got / scale, want / scale, dtype)
    if debiased:
        assert torch.all(torch.diagonal(got, dim1=-2, dim2=-1) == 0)

    w = torch.randn(g, n, n, dtype=torch.float64)  # a random upstream gradient, not all ones
    a = x.clone().requires_grad_()
    (rk.centered_gram(a, kernel=kernel, sigma=sigma, debiased=debiased, backend="triton") * w.to(dtype)).sum().backward()
    b = x.double().clone().requires_grad_()
    (reference.centered_gram(b, kernel, sigma, debiased) * w).sum().backward()
    assert a.grad.dtype == dtype and a.grad.shape == x.shape
    gscale = float(b.grad.abs().max()) or 1.0
    assert_close(a.grad / gscale, b.grad / gscale, dtype)


def test_batch_dims_and_default_tiles(calls):
    """(..., n, p) input with two batch dims, default (64-row) tiles, n over one tile."""
    x = _x(6, 70, 5).reshape(2, 3, 70, 5)
    got = rk.centered_gram(x, kernel="rbf", debiased=True, backend="triton")
    assert calls and got.shape == (2, 3, 70, 70)
    want = reference.centered_gram(x, "rbf", None, True)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_gradcheck_float64(tiles16, kernel, debiased):
    x = _x(2, 7, 2, torch.float64).requires_grad_()  # small: the interpreter runs 2 forwards per input
    sigma = 1.7 if kernel == "rbf" else None
    out = rk.centered_gram(x.detach(), kernel=kernel, sigma=sigma, debiased=debiased, backend="triton")
    assert out.dtype == torch.float64
    assert_close(out, reference.centered_gram(x.detach(), kernel, sigma, debiased), torch.float64)
    assert gradcheck(lambda a: rk.centered_gram(a, kernel=kernel, sigma=sigma, debiased=debiased, backend="triton"), (x,))


def test_half_input_gives_float32():
    x = _x(1, 20, 4, torch.float16)
    got = rk.centered_gram(x, kernel="linear", backend="triton")
    assert got.dtype == torch.float32
    want = reference.centered_gram(x, "linear", None, False)
    scale = float(want.abs().max())
    assert_close(got / scale, want / scale, torch.float16)
