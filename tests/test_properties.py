"""What CKA is supposed to be, checked numerically; Theorem 2 of Zhou et al. (2024)."""

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import reference

from .utils import accept

KERNELS = [("linear", None), ("rbf", "median"), ("rbf", "mean")]


def _xy(n=40, p=6, q=5):
    x = torch.randn(n, p, dtype=torch.float64)
    y = torch.tanh(x[:, :q] @ torch.randn(q, q, dtype=torch.float64)) + 0.3 * torch.randn(n, q, dtype=torch.float64)
    return x, y


def _orthogonal(p):
    q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64))
    return q


@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("debiased", [False, True])
def test_self_cka_is_one(kernel, sigma, debiased):
    x, _ = _xy()
    assert rk.cka(x, x, kernel=kernel, sigma=sigma, debiased=debiased).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(kernel, sigma, debiased):
    x, y = _xy()
    kw = dict(kernel=kernel, sigma=sigma, debiased=debiased)
    base = rk.cka(x, y, **kw)
    assert 0.05 < base.item() < 0.999  # a non-trivial value, or the checks below prove nothing
    perm = torch.randperm(x.shape[0])
    accept(rk.cka(x @ _orthogonal(6), y @ _orthogonal(5), **kw), base, torch.float64)
    accept(rk.cka(3.7 * x, 0.2 * y, **kw), base, torch.float64)
    accept(rk.cka(x[perm], y[perm], **kw), base, torch.float64)
    accept(rk.cka(x + 5.0, y - 2.0, **kw), base, torch.float64)
    # permuting only one side breaks the pairing, so the value must move
    assert (rk.cka(x[perm], y, **kw) - base).abs() > 1e-3


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_is_not_invariant_to_general_invertible_maps(debiased):
    x, y = _xy()
    a = torch.eye(6, dtype=torch.float64) + torch.diag(torch.tensor([9.0, 0, 0, 0, 0, 0], dtype=torch.float64))
    a[0, 1] = 4.0
    assert torch.linalg.matrix_rank(a) == 6
    base = rk.cka(x, y, debiased=debiased)
    assert (rk.cka(x @ a, y, debiased=debiased) - base).abs() > 1e-2


@pytest.mark.parametrize("kernel,sigma", KERNELS)
def test_cka_is_bounded(kernel, sigma):
    for _ in range(5):
        x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
        v = rk.cka(x, y, kernel=kernel, sigma=sigma).item()
        assert 0.0 <= v <= 1.0 + 1e-12


# ----------------------------------------------------------------------------- Theorem 2


@pytest.mark.parametrize("kernel,sigma", KERNELS)
def test_theorem2_identity(kernel, sigma):
    """With Frobenius-normalised centred Grams, CKA = 1 - 1/2 |K^ - L^|_F^2."""
    x, y = _xy()
    explicit = reference.gram_discrepancy(x, y, kernel, sigma)  # builds K^, L^
    accept(explicit, 1.0 - reference.cka(x, y, kernel, sigma), torch.float64)
    accept(rk.gram_discrepancy(x, y, kernel=kernel, sigma=sigma), explicit, torch.float64)
    torch.testing.assert_close(rk.gram_discrepancy(x, y, kernel=kernel, sigma=sigma), rk.cka_loss(x, y, kernel=kernel, sigma=sigma))


@pytest.mark.parametrize("kernel,sigma", KERNELS)
@pytest.mark.parametrize("centered", [True, False])
def test_theorem2_bound(kernel, sigma, centered):
    """1/2 |K^ - L^|_F^2 >= (n^2/2)(mean K^ - mean L^)^2 (Jensen), on many draws."""
    for trial in range(10):
        x = torch.randn(15, 3, dtype=torch.float64) * (1 + trial)
        y = torch.randn(15, 2, dtype=torch.float64) + trial * 0.5
        kw = dict(kernel=kernel, sigma=sigma, centered=centered)
        gap = rk.gram_discrepancy(x, y, **kw)
        bound = rk.mmd_upper_bound(x, y, **kw)
        accept(gap, reference.gram_discrepancy(x, y, kernel, sigma, centered), torch.float64)
        accept(bound, reference.mmd_upper_bound(x, y, kernel, sigma, centered), torch.float64)
        assert gap >= bound - 1e-12
        if centered:
            assert bound == 0  # mean of a centred Gram is 0
    if not centered:
        assert bound > 0  # uncentred: the bound is informative


def test_uncentered_discrepancy_is_the_official_alignment():
    x, y = _xy()
    accept(rk.gram_discrepancy(x, y, centered=False), 1.0 - reference.official_alignment(x, y), torch.float64)
