"""Float32 linear CKA and HSIC, both estimators, against float64 values of the definitions
on the same inputs, over widths up to a flattened 256 x 56 x 56 feature map (issue 20,
item 1: the debiased estimator cancels the Grams' diagonals, which must not cost digits
that grow with the width). Native op and Python path alike."""

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import _native, reference
from rcka_kernels.ops import linear

CKA_ATOL = 1e-5  # the target: float32 CKA within 1e-5 of float64 at every width
HSIC_RTOL = 1e-5


def _inputs(n, p, seed=0):
    """y = randn + 0.3 x: a weak relation (CKA about 0.1), where a lost digit shows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g)
    return x, torch.randn(n, p, generator=g) + 0.3 * x


def _paths():
    """(name, cka(x, y, debiased), hsic(x, y, debiased)) for the public functions (native op
    where built) and the Python Function called directly."""
    paths = [("python", lambda x, y, d: linear._LinearAlignment.apply(x, y, "cka", True, d, "torch"),
              lambda x, y, d: linear._LinearAlignment.apply(x, y, "hsic", True, d, "torch"))]
    if _native.op() is not None:
        paths.append(("public", lambda x, y, d: rk.cka(x, y, debiased=d), lambda x, y, d: rk.hsic(x, y, debiased=d)))
    return paths


def _grams(x, y):
    """The float64 Grams of the float32 inputs (the reference's definitions start from them)."""
    x64, y64 = x.double(), y.double()
    return x64 @ x64.T, y64 @ y64.T


def _check(x, y, debiased, grams=None, hsic_too=True):
    k, l = _grams(x, y) if grams is None else grams
    want_hsic = reference._hsic_grams(k, l, debiased)
    want_cka = want_hsic / (reference._hsic_grams(k, k, debiased) * reference._hsic_grams(l, l, debiased)).sqrt()
    for name, cka, hsic in _paths():
        got = cka(x, y, debiased)
        assert got.dtype == torch.float32
        assert abs(float(got) - float(want_cka)) <= CKA_ATOL, (name, debiased, float(got), float(want_cka))
        if not hsic_too:
            continue
        h = float(hsic(x, y, debiased))
        assert abs(h - float(want_hsic)) <= HSIC_RTOL * abs(float(want_hsic)), (name, debiased, h, float(want_hsic))


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,p", [(64, 1), (64, 100), (64, 4096), (64, 65536), (4, 65536), (6, 20000), (300, 50)])
def test_float32_matches_float64_over_widths(n, p, debiased):
    _check(*_inputs(n, p), debiased)


def test_float32_matches_float64_at_a_flattened_256x56x56_map():
    """The widest case, once: n = 64 rows of 802,816 features."""
    x, y = _inputs(64, 256 * 56 * 56, seed=1)
    grams = _grams(x, y)
    _check(x, y, True, grams)
    _check(x, y, False, grams, hsic_too=False)


@pytest.mark.parametrize("n,p,q", [(16, 3000, 3000), (16, 3000, 700), (40, 10, 20)])
def test_float32_debiased_gradient_matches_float64(n, p, q):
    """The debiased gradient in float32 (sample space: from the U-centred Grams) against
    the float64 gradient of the reference."""
    x, y = _inputs(n, max(p, q))
    x, y = x[:, :p].contiguous(), y[:, :q].contiguous()
    a = x.double().requires_grad_()
    (want,) = torch.autograd.grad(reference.cka(a, y.double(), "linear", None, True), a)
    for name, cka, _ in _paths():
        b = x.clone().requires_grad_()
        (got,) = torch.autograd.grad(cka(b, y, True), b)
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * float(want.abs().max()), msg=name)


@pytest.mark.parametrize("groups,n,p", [(3, 8, 5000), (40, 6, 1100)])
def test_float32_debiased_groups_match_float64(groups, n, p):
    """Groups (PCKA's channels): the Grams' column blocks taken per group or per block,
    whichever is fewer; every group's value within the target."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(groups, n, p, generator=g)
    y = torch.randn(groups, n, p, generator=g) + 0.3 * x
    want = reference.cka(x.double(), y.double(), "linear", None, True)
    for name, cka, _ in _paths():
        torch.testing.assert_close(cka(x, y, True).double(), want, rtol=0.0, atol=CKA_ATOL, msg=name)
