"""Values and gradients of the public API against the float64 reference, for every
backend that can run here, over the awkward shapes of tests/utils.py."""

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import rcka_kernels as rk
from rcka_kernels import _bandwidth, reference

from .conftest import devices
from .utils import SHAPES, assert_close

BACKENDS = ["torch", "reference"]
KERNELS = [("linear", None), ("rbf", None), ("rbf", "mean"), ("rbf", 1.3)]


def _pair(n, p, q, dtype=torch.float64, device="cpu", batch=()):
    x = torch.randn(*batch, n, p, dtype=torch.float64)
    y = 0.5 * torch.randn(*batch, n, q, dtype=torch.float64)
    k = min(p, q)
    y[..., :k] += x[..., :k]  # correlated, so CKA is far from 0
    x = x * 3.0 + 1.5  # an offset and a scale: the centring must be exact
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n,p,q", SHAPES)
@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_hsic_match_reference_float64(device, n, p, q, kernel, sigma, debiased):
    x, y = _pair(n, p, q, device=device)
    for fn, ref in ((rk.cka, reference.cka), (rk.hsic, reference.hsic)):
        got = fn(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend="torch")
        want = ref(x, y, kernel, sigma, debiased)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,sigma", KERNELS[:3])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_low_precision(device, dtype, kernel, sigma, debiased):
    x, y = _pair(257, 24, 40, dtype=dtype, device=device)
    got = rk.cka(x, y, kernel=kernel, sigma=sigma, debiased=debiased)
    assert got.dtype == torch.float32  # accumulation dtype for half inputs, input dtype for fp32
    # the reference sees the same (quantised) inputs: what is left is our accumulation error
    assert_close(got, reference.cka(x, y, kernel, sigma, debiased), dtype)


@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("debiased", [False, True])
def test_batched_groups_equal_per_group_calls(kernel, sigma, debiased):
    x, y = _pair(9, 5, 3, batch=(2, 3))
    got = rk.cka(x, y, kernel=kernel, sigma=sigma, debiased=debiased)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            want = reference.cka(x[i, j], y[i, j], kernel, sigma, debiased)
            torch.testing.assert_close(got[i, j], want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kernel,sigma", KERNELS)
def test_many_blocks_match_reference(monkeypatch, kernel, sigma):
    """Force blocks far smaller than n, so every block boundary case is exercised."""
    monkeypatch.setenv("RCKA_TORCH_BLOCK_ELEMS", "97")
    x, y = _pair(61, 7, 4, batch=(3,))
    for debiased in (False, True):
        got = rk.cka(x, y, kernel=kernel, sigma=sigma, debiased=debiased)
        torch.testing.assert_close(got, reference.cka(x, y, kernel, sigma, debiased), rtol=1e-10, atol=1e-13)
    z = torch.randn(3, 45, 7, dtype=torch.float64)
    if kernel == "rbf":
        torch.testing.assert_close(rk.mmd(x, z, sigma=sigma), reference.mmd(x, z, "rbf", sigma), rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- gradients


def _weights(shape):
    """An upstream gradient that is not all ones."""
    return torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("n,p,q", [(4, 1, 2), (7, 3, 9), (12, 5, 4)])
@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 1.1)])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("fn", ["cka", "hsic"])
def test_gradcheck_cka_hsic(n, p, q, kernel, sigma, debiased, fn):
    x, y = _pair(n, p, q, batch=(2,))
    x.requires_grad_(), y.requires_grad_()
    f = getattr(rk, fn)
    assert gradcheck(lambda a, b: f(a, b, kernel=kernel, sigma=sigma, debiased=debiased), (x, y))


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 0.9)])
def test_gradcheck_mmd(unbiased, kernel, sigma):
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    z = (torch.randn(2, 9, 3, dtype=torch.float64) + 0.3).requires_grad_()
    assert gradcheck(lambda a, b: rk.mmd(a, b, kernel=kernel, sigma=sigma, unbiased=unbiased), (x, z))


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 1.7)])
def test_gradcheck_theorem2_and_grams(kernel, sigma):
    x, y = _pair(8, 3, 5)
    x.requires_grad_(), y.requires_grad_()
    kw = dict(kernel=kernel, sigma=sigma)
    assert gradcheck(lambda a, b: rk.gram_discrepancy(a, b, **kw), (x, y))
    assert gradcheck(lambda a, b: rk.gram_discrepancy(a, b, centered=False, **kw), (x, y))
    assert gradcheck(lambda a, b: rk.mmd_upper_bound(a, b, centered=False, **kw), (x, y))
    assert gradcheck(lambda a: rk.gram(a, **kw), (x,))
    assert gradcheck(lambda a: rk.centered_gram(a, **kw), (x,))
    assert gradcheck(lambda a: rk.centered_gram(a, debiased=True, **kw), (x,))


@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("debiased", [False, True])
def test_gradients_match_reference(kernel, sigma, debiased):
    """Heuristic bandwidths are constants in backward for every backend alike."""
    x, y = _pair(23, 6, 4, batch=(3,))
    w = _weights(3)
    grads = []
    for fn in (lambda a, b: rk.cka(a, b, kernel=kernel, sigma=sigma, debiased=debiased),
               lambda a, b: reference.cka(a, b, kernel, sigma, debiased)):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        (fn(a, b) * w).sum().backward()
        grads.append((a.grad, b.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- other ops


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (5, 9, 3), (40, 33, 7)])
@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_matches_reference(n, m, d, kernel, sigma, unbiased):
    if unbiased and min(n, m) < 2:
        pytest.skip("the unbiased estimator needs two samples on each side")
    x = torch.randn(2, n, d, dtype=torch.float64)
    z = torch.randn(2, m, d, dtype=torch.float64) * 1.3 + 0.4
    got = rk.mmd(x, z, kernel=kernel, sigma=sigma, unbiased=unbiased)
    torch.testing.assert_close(got, reference.mmd(x, z, kernel, sigma, unbiased), rtol=1e-10, atol=1e-13)


def test_mmd_is_zero_for_identical_samples_and_positive_otherwise():
    x = torch.randn(50, 4, dtype=torch.float64)
    assert rk.mmd(x, x).abs() < 1e-12
    assert rk.mmd(x, x + 1.0) > 1e-3


@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("debiased", [False, True])
def test_grams_match_reference(kernel, sigma, debiased):
    x = torch.randn(2, 11, 4, dtype=torch.float64)
    torch.testing.assert_close(rk.gram(x, kernel=kernel, sigma=sigma), reference.gram(x, kernel, sigma))
    got = rk.centered_gram(x, kernel=kernel, sigma=sigma, debiased=debiased)
    torch.testing.assert_close(got, reference.centered_gram(x, kernel, sigma, debiased), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel,sigma", KERNELS)
def test_u_centering_gives_the_unbiased_hsic(kernel, sigma):
    """<K_u, L_u> / (n (n-3)) is Song et al.'s estimator: two derivations agree."""
    x, y = _pair(10, 3, 2)
    ku = rk.centered_gram(x, kernel=kernel, sigma=sigma, debiased=True)
    lu = rk.centered_gram(y, kernel=kernel, sigma=sigma, debiased=True)
    want = reference.hsic(x, y, kernel, sigma, debiased=True)
    torch.testing.assert_close((ku * lu).sum() / (10 * 7), want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 9, 40, 41])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_median_selection_is_exact(monkeypatch, n, dtype):
    """The radix select returns exactly NumPy's median of the same n^2 distances."""
    monkeypatch.setenv("RCKA_TORCH_BLOCK_ELEMS", "64")
    x = torch.randn(2, n, 3, dtype=dtype)
    x[:, n // 2 :] = x[:, :1]  # ties, and many zero distances
    got = _bandwidth.median_sq_distance(x)
    xc = _bandwidth._center(x)
    d = torch.zeros(2, n, n, dtype=dtype)
    i = 0
    for block, keep in _bandwidth._upper_blocks(xc):
        rows = block.shape[1]
        d[:, i : i + rows, i:] = torch.where(keep, block, 0)
        i += rows
    assert i == n
    d = d + d.transpose(1, 2)  # the full symmetric matrix with a zero diagonal
    want = np.median(d.reshape(2, -1).numpy(), axis=1)
    assert got.numpy().tolist() == want.astype(got.numpy().dtype).tolist()


def test_median_heuristic_matches_reference_value():
    x = torch.randn(3, 30, 5, dtype=torch.float64)
    torch.testing.assert_close(_bandwidth.sigma2(x, "median"), reference.bandwidth(x, "median"), rtol=1e-12, atol=0)
    torch.testing.assert_close(_bandwidth.sigma2(x, "mean"), reference.bandwidth(x, "mean"), rtol=1e-12, atol=0)


def test_tensor_sigma_per_group():
    x, y = _pair(12, 3, 3, batch=(2,))
    s = torch.tensor([0.7, 2.0], dtype=torch.float64)
    got = rk.cka(x, y, kernel="rbf", sigma=s)
    for g in range(2):
        torch.testing.assert_close(got[g], reference.cka(x[g], y[g], "rbf", float(s[g])), rtol=1e-10, atol=0)
