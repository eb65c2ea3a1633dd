"""Second derivatives (issue 20, item 2): ``torch.autograd.gradgradcheck`` in float64 for
every differentiable public function and loss, linear and RBF kernels, on the native op and
the Python path. A backward that runs with grad mode on (create_graph=True) computes its
gradient from a recomputation autograd can differentiate again."""

import pytest
import torch
from torch.autograd import gradgradcheck

import rcka_kernels as rk
from rcka_kernels import _native
from rcka_kernels import distributed as rkd
from rcka_kernels.losses import official_alignment


@pytest.fixture(params=["native", "python"])
def impl(request, monkeypatch):
    """The native C++ op (where built) and the Python Function."""
    if request.param == "python":
        with _native.python_path():
            yield request.param
        return
    if _native.op() is None:
        pytest.skip(f"native op unavailable: {_native.reason()}")
    yield request.param


def _xy(n=7, p=4, q=5, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, p, generator=g, dtype=torch.float64)
    y = torch.randn(*batch, n, q, generator=g, dtype=torch.float64)
    y[..., :2] += x[..., :2]
    return x.requires_grad_(), y.requires_grad_()


RBF = {"kernel": "rbf", "sigma": 1.7}
# the linear op's paths (native C++ and Python), in sample and feature space
LINEAR = {
    "cka": lambda x, y: rk.cka(x, y),
    "cka-debiased": lambda x, y: rk.cka(x, y, debiased=True),
    "hsic": lambda x, y: rk.hsic(x, y),
    "hsic-debiased": lambda x, y: rk.hsic(x, y, debiased=True),
    "cka_loss": lambda x, y: rk.cka_loss(x, y),
    "gram_discrepancy": lambda x, y: rk.gram_discrepancy(x, y),
    "gram_discrepancy-uncentred": lambda x, y: rk.gram_discrepancy(x, y, centered=False),
    "official_alignment": lambda x, y: official_alignment(x, y),
    "official_alignment-l2": lambda x, y: official_alignment(x, y, l2_norm=True),
    "distributed.cka": lambda x, y: rkd.cka(x, y),
    "distributed.hsic-debiased": lambda x, y: rkd.hsic(x, y, debiased=True),
    "CKALoss": lambda x, y: rk.CKALoss()(x, y),
    "CKALoss-debiased": lambda x, y: rk.CKALoss(debiased=True)(x, y),
    "RCKALoss": lambda x, y: rk.RCKALoss(intra_weight=2.0, inter_weight=1.5)(x, y[..., : x.shape[-1]]),
    "RCKALoss-official": lambda x, y: rk.RCKALoss(intra_weight=2.0, inter_weight=1.5, official=True)(x, y[..., : x.shape[-1]]),
    "RCKALoss-temperature": lambda x, y: rk.RCKALoss(intra_weight=2.0, inter_weight=1.5, temperature=2.0)(x, y[..., : x.shape[-1]]),
}
# the RBF custom ops (ops/stats.py) and the plain-torch functions
OTHER = {
    "cka-rbf": lambda x, y: rk.cka(x, y, **RBF),
    "cka-rbf-debiased": lambda x, y: rk.cka(x, y, debiased=True, **RBF),
    "hsic-rbf": lambda x, y: rk.hsic(x, y, **RBF),
    "gram_discrepancy-rbf": lambda x, y: rk.gram_discrepancy(x, y, **RBF),
    "CKALoss-rbf": lambda x, y: rk.CKALoss(**RBF)(x, y),
    "mmd-linear": lambda x, y: rk.mmd(x, y[..., : x.shape[-1]], kernel="linear"),
    "mmd-rbf": lambda x, y: rk.mmd(x, y[..., : x.shape[-1]], sigma=1.7),
    "mmd-rbf-unbiased": lambda x, y: rk.mmd(x, y[..., : x.shape[-1]], sigma=1.7, unbiased=True),
    "gram": lambda x, y: rk.gram(x) * rk.gram(y).mean(),
    "gram-rbf": lambda x, y: rk.gram(x, **RBF) + rk.gram(y, **RBF),
    "centered_gram": lambda x, y: rk.centered_gram(x) + rk.centered_gram(y, debiased=True),
    "centered_gram-rbf": lambda x, y: rk.centered_gram(x, **RBF) * rk.centered_gram(y, debiased=True, **RBF),
}


@pytest.mark.parametrize("name", list(LINEAR))
@pytest.mark.parametrize("shape", [(5, 3, 4), (8, 2, 3)], ids=["sample-space", "feature-space"])
def test_gradgradcheck_linear(impl, name, shape):
    x, y = _xy(*shape)
    assert gradgradcheck(LINEAR[name], (x, y))


@pytest.mark.parametrize("name", list(OTHER))
def test_gradgradcheck_rbf_and_plain(name):
    x, y = _xy(5, 2, 3)
    assert gradgradcheck(OTHER[name], (x, y))


@pytest.mark.parametrize("grads", [(True, False), (False, True)])
@pytest.mark.parametrize("debiased", [False, True])
def test_gradgradcheck_one_input_and_groups(impl, grads, debiased):
    """A detached teacher (only one input differentiated), groups, both estimators."""
    x, y = _xy(6, 3, 8, batch=(2,))
    x.requires_grad_(grads[0]), y.requires_grad_(grads[1])
    assert gradgradcheck(lambda *t: rk.cka(*t, debiased=debiased), (x, y))


@pytest.mark.parametrize("official", [False, True])
def test_gradgradcheck_pcka_loss(impl, official):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = rk.PCKALoss(patch_size=2, intra_weight=1.0, inter_weight=0.5, official=official)
    assert gradgradcheck(loss, (s, t))


def test_gradient_penalty_matches_the_plain_formula(impl):
    """A gradient penalty |d loss / dx|^2, differentiated: the plain formula's autograd."""
    x, y = _xy(9, 6, 6)

    def plain(a, b):
        a, b = a - a.mean(0), b - b.mean(0)
        return 1 - (a.T @ b).square().sum() / ((a.T @ a).square().sum() * (b.T @ b).square().sum()).sqrt()

    def penalty(fn):
        (g,) = torch.autograd.grad(fn(x, y), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), (x, y))

    for got, want in zip(penalty(rk.cka_loss), penalty(plain)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
