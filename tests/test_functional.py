"""The public API beyond what tests/test_parity.py holds every backend to: the torch
backend's blocking, the ops only it implements (gram, gram_discrepancy,
mmd_upper_bound: values and gradcheck), the exact median selection, per-group
tensor bandwidths, and two derivations of the unbiased HSIC that must agree."""

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import rcka_kernels as rk
from rcka_kernels import _bandwidth, reference

from .utils import KERNELS, accept, pair

f64 = torch.float64


@pytest.mark.parametrize("kernel,sigma", KERNELS)
def test_many_blocks_match_reference(monkeypatch, kernel, sigma):
    """Force blocks far smaller than n, so every block boundary case is exercised."""
    monkeypatch.setenv("RCKA_TORCH_BLOCK_ELEMS", "97")
    x, y = pair(61, 7, 4, batch=(3,))
    for debiased in (False, True):
        got = rk.cka(x, y, kernel=kernel, sigma=sigma, debiased=debiased)
        accept(got, reference.cka(x, y, kernel, sigma, debiased), f64)
    z = torch.randn(3, 45, 7, dtype=torch.float64)
    if kernel == "rbf":
        accept(rk.mmd(x, z, sigma=sigma), reference.mmd(x, z, "rbf", sigma), f64)


@pytest.mark.parametrize("sigma", [None, "mean", 1.3])
@pytest.mark.parametrize("debiased", [False, True])
def test_rbf_whole_grams_where_they_fit_one_block(monkeypatch, sigma, debiased):
    """The torch backend's RBF statistics: the whole n x n Grams (plain autograd) when the
    group batch's Grams fit one block of its streamed path, else streamed; the same values
    either side of the boundary, both the reference's."""
    from rcka_kernels.ops import stats

    g, n = 3, 13
    x, y = pair(n, 4, 6, batch=(g,))
    calls = []
    real = stats.rbf_stats
    monkeypatch.setattr(stats, "rbf_stats", lambda *a: calls.append(1) or real(*a))
    want = reference.cka(x, y, "rbf", sigma, debiased)
    for block, streamed in ((g * n * n, False), (g * n * n - 1, True)):
        monkeypatch.setenv("RCKA_TORCH_BLOCK_ELEMS", str(block))
        calls.clear()
        accept(rk.cka(x, y, kernel="rbf", sigma=sigma, debiased=debiased), want, f64)
        accept(rk.gram_discrepancy(x, y, kernel="rbf", sigma=sigma, centered=False),
               reference.gram_discrepancy(x, y, "rbf", sigma, False), f64)
        assert bool(calls) == streamed, (block, calls)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 1.7)])
def test_gradcheck_theorem2_and_grams(kernel, sigma):
    x, y = pair(8, 3, 5)
    x.requires_grad_(), y.requires_grad_()
    kw = dict(kernel=kernel, sigma=sigma)
    assert gradcheck(lambda a, b: rk.gram_discrepancy(a, b, **kw), (x, y))
    assert gradcheck(lambda a, b: rk.gram_discrepancy(a, b, centered=False, **kw), (x, y))
    assert gradcheck(lambda a, b: rk.mmd_upper_bound(a, b, centered=False, **kw), (x, y))
    assert gradcheck(lambda a: rk.gram(a, **kw), (x,))


# ----------------------------------------------------------------------------- other ops


def test_mmd_is_zero_for_identical_samples_and_positive_otherwise():
    x = torch.randn(50, 4, dtype=torch.float64)
    assert rk.mmd(x, x).abs() < 1e-12
    assert rk.mmd(x, x + 1.0) > 1e-3


@pytest.mark.parametrize("kernel,sigma", KERNELS)
def test_gram_matches_reference(kernel, sigma):
    x = torch.randn(2, 11, 4, dtype=torch.float64)
    accept(rk.gram(x, kernel=kernel, sigma=sigma), reference.gram(x, kernel, sigma), f64)


@pytest.mark.parametrize("kernel,sigma", KERNELS)
def test_u_centering_gives_the_unbiased_hsic(kernel, sigma):
    """<K_u, L_u> / (n (n-3)) is Song et al.'s estimator: two derivations agree."""
    x, y = pair(10, 3, 2)
    ku = rk.centered_gram(x, kernel=kernel, sigma=sigma, debiased=True)
    lu = rk.centered_gram(y, kernel=kernel, sigma=sigma, debiased=True)
    want = reference.hsic(x, y, kernel, sigma, debiased=True)
    accept((ku * lu).sum() / (10 * 7), want, f64)


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
    accept(_bandwidth.sigma2(x, "median"), reference.bandwidth(x, "median"), f64)
    accept(_bandwidth.sigma2(x, "mean"), reference.bandwidth(x, "mean"), f64)


def test_tensor_sigma_per_group():
    x, y = pair(12, 3, 3, batch=(2,))
    s = torch.tensor([0.7, 2.0], dtype=torch.float64)
    got = rk.cka(x, y, kernel="rbf", sigma=s)
    for g in range(2):
        accept(got[g], reference.cka(x[g], y[g], "rbf", float(s[g])), f64)


def test_uncentred_statistics_of_wide_inputs_take_the_sample_side():
    """gram_discrepancy(centered=False) and mmd_upper_bound on p >> n: the n x n Grams, not p x p products."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3000, generator=g, dtype=torch.float64), torch.randn(6, 2000, generator=g, dtype=torch.float64)
    for fn in (rk.gram_discrepancy, rk.mmd_upper_bound):
        torch.testing.assert_close(fn(x, y, centered=False), fn(x, y, centered=False, backend="reference"))
