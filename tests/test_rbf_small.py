"""The torch backend's dense RBF path (ops/stats.py ``dense_rbf``: the whole n x n Grams, the
gradient in closed form), natively (rcka_kernels/csrc/) and in Python (the "torch-python"
environment of the parity suite): values and gradients against the float64 definitions of
rcka_kernels/reference.py at the sizes the benchmarks measure (benchmarks/bench_efficient.py's
RBF cases, a wide input standing in for the flattened feature maps), either side of the size
at which the streamed path takes over (``functional._dense_fits``), for both branches of the
Grams' products (p = q and p != q), and with a gradient that is differentiated again."""

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import _native, functional, reference

from .utils import REQUIRE, accept, lacks, pair, require, weighted_grads

f32, f64 = torch.float32, torch.float64
FNS = {"cka": (rk.cka, reference.cka), "hsic": (rk.hsic, reference.hsic)}


@pytest.fixture(autouse=True, params=["torch", "torch-python"])
def implementation(request):
    """Every test here runs with the native op (where it is built: CI requires it) and with the
    Python definition it mirrors."""
    if request.param == "torch":
        require(REQUIRE["torch"], lacks("torch"))
        yield request.param
    else:
        with _native.python_path():
            yield request.param


def _check(name, x, y, sigma, debiased, need=(True, False), dtype=f64):
    """rk's value and gradients (torch backend, inputs in ``dtype``) against the reference's on
    the same inputs in float64."""
    ours, ref = FNS[name]
    xq, yq = x.to(dtype), y.to(dtype)
    got = weighted_grads(ours, xq, yq, need, kernel="rbf", sigma=sigma, debiased=debiased, backend="torch")
    want = weighted_grads(lambda a, b, **kw: ref(a, b, "rbf", sigma, debiased), xq.double(), yq.double(), need)
    accept(got[0], want[0], dtype, what=f"{name} value")
    for i, what in ((1, "dx"), (2, "dy")):
        if need[i - 1]:
            accept(got[i], want[i], dtype, what=f"{name} {what}")
        else:
            assert got[i] is None


@pytest.mark.parametrize("name", list(FNS))
@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
@pytest.mark.parametrize("n,p,q,sigma", [(64, 100, 100, None), (64, 100, 100, 10.0), (256, 100, 100, None),
                                         (64, 3136, 3136, None), (64, 100, 37, "mean")],
                         ids=["64x100-median", "64x100-sigma10", "256x100-median", "64-wide-maps", "64-p!=q-mean"])
@pytest.mark.parametrize("dtype", [f64, f32], ids=["float64", "float32"])
def test_measured_sizes_match_the_definition(name, debiased, n, p, q, sigma, dtype):
    x, y = pair(n, p, q)
    assert functional._dense_fits(x[None], "torch")
    _check(name, x, y, sigma, debiased, dtype=dtype)


@pytest.mark.parametrize("need", [(True, True), (False, True)], ids=["both", "y"])
@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_gradient_of_either_input(need, debiased):
    x, y = pair(40, 7, 5)
    _check("cka", x, y, 1.3, debiased, need)
    _check("hsic", x, y, None, debiased, need)


@pytest.mark.parametrize("p,q", [(6, 6), (6, 4)], ids=["p=q", "p!=q"])
@pytest.mark.parametrize("sigma", [None, "mean", 1.3, "tensor"])
def test_groups_match_the_definition(p, q, sigma):
    x, y = pair(17, p, q, batch=(3, 2))
    if sigma == "tensor":
        sigma = torch.tensor([0.9, 1.3, 2.0, 1.1, 1.7, 2.5], dtype=f64).view(3, 2)
    for debiased in (False, True):
        _check("cka", x, y, sigma, debiased, (True, True))


@pytest.mark.parametrize("name", list(FNS))
@pytest.mark.parametrize("sigma", [None, 1.3])
@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_either_side_of_the_dense_size(monkeypatch, name, sigma, debiased):
    """The size rule stated in ``functional._dense_fits``: G n^2 <= block is dense, beyond it
    streamed; values and gradients are the definition's on both sides."""
    from rcka_kernels.ops import stats

    g, n = 2, 23
    x, y = pair(n, 5, 4, batch=(g,))
    calls = []
    real = stats.dense_rbf
    monkeypatch.setattr(stats, "dense_rbf", lambda *a: calls.append(1) or real(*a))
    for block, dense in ((g * n * n, True), (g * n * n - 1, False)):
        monkeypatch.setenv("RCKA_TORCH_BLOCK_ELEMS", str(block))
        calls.clear()
        _check(name, x, y, sigma, debiased, (True, True))
        assert bool(calls) == dense, (block, calls)


@pytest.mark.parametrize("dtype", [f64, f32])
def test_gradient_with_a_graph_is_the_gradient(dtype):
    """A backward with create_graph=True takes the recomputation: the same first derivative, in
    the input's dtype, and one that can be differentiated again."""
    x, y = pair(20, 6, 6, dtype=dtype)
    x.requires_grad_()
    plain = torch.autograd.grad(rk.cka(x, y, kernel="rbf", sigma=1.5), x)[0]
    graph = torch.autograd.grad(rk.cka(x, y, kernel="rbf", sigma=1.5), x, create_graph=True)[0]
    assert graph.dtype == dtype and graph.requires_grad
    torch.testing.assert_close(graph.detach(), plain, rtol=1e-4 if dtype == f32 else 1e-10, atol=1e-7 if dtype == f32 else 1e-13)
    (graph * graph).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_no_grad_and_detached_inputs_give_the_same_value():
    x, y = pair(30, 8, 8)
    xg = x.clone().requires_grad_()
    v = rk.cka(xg, y, kernel="rbf")
    with torch.no_grad():
        v0 = rk.cka(xg, y, kernel="rbf")
    assert not v0.requires_grad
    assert torch.equal(v.detach(), v0)
    assert torch.equal(v0, rk.cka(x, y, kernel="rbf"))


@pytest.mark.parametrize("p,q", [(4, 4), (4, 3)], ids=["p=q", "p!=q"])
@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_second_derivatives(p, q, debiased):
    """Both branches of the Grams' products, differentiated twice (the recomputation) and once
    with plain autograd (the uncentred statistics)."""
    x, y = pair(7, p, q)
    x.requires_grad_(), y.requires_grad_()
    kw = dict(kernel="rbf", sigma=1.7)
    assert torch.autograd.gradgradcheck(lambda a, b: rk.cka(a, b, debiased=debiased, **kw), (x, y))
    assert torch.autograd.gradgradcheck(lambda a, b: rk.hsic(a, b, debiased=debiased, **kw), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: rk.gram_discrepancy(a, b, centered=False, **kw), (x, y))



@pytest.mark.parametrize("where", [(0, 0), (5, 2), "column"], ids=["row0", "inside", "column"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(FNS))
@pytest.mark.parametrize("sigma", [None, 1.3])
def test_non_finite_input_raises_read_off_the_statistics(where, bad, name, sigma):
    """The dense op reads NaN/Inf off its HSIC statistics, not the inputs: every position of a
    bad entry, even beside a constant partner (HSIC 0 whatever x is), raises the input error;
    with the check off the value is NaN."""
    x, y = pair(12, 4, 3)
    const = torch.ones_like(y)
    if where == "column":
        x[:, 1] = bad
    else:
        x[where] = bad
    for partner in (y, const):
        with pytest.raises(ValueError, match="NaN or Inf"):
            FNS[name][0](x, partner, kernel="rbf", sigma=sigma)
    rk.config.check_finite = False
    try:
        assert torch.isnan(FNS[name][0](x, y, kernel="rbf", sigma=sigma))
    finally:
        rk.config.check_finite = None


@pytest.mark.parametrize("dtype", [f32, f64])
def test_finite_inputs_whose_distances_overflow_say_so(dtype):
    """Finite inputs whose squared distances overflow the dtype: a clear error, not a NaN, and
    not the NaN-input message."""
    x, y = pair(10, 3, 3, dtype=dtype)
    big = 1e20 if dtype == f32 else 1e160
    with pytest.raises(ValueError, match="overflow"):
        rk.cka(x * big, y, kernel="rbf")
    assert 0.0 <= float(rk.cka(x * 1e15 if dtype == f32 else x, y, kernel="rbf")) <= 1.0


@pytest.mark.parametrize("sigma", [None, 10.0], ids=["median", "sigma10"])
def test_no_more_ops_than_the_plain_formula(implementation, sigma, monkeypatch):
    """Ops per forward + backward at the benchmarked 64 x 100 (each a kernel launch on a GPU),
    student requiring grad and teacher detached: at most the plain dense formula's
    (benchmarks/efficient.py). Where the native op is built it runs (the Python Function is
    not called)."""
    from benchmarks import efficient
    from rcka_kernels.ops import stats

    if implementation == "torch" and _native.dense_rbf_op() is not None:
        monkeypatch.setattr(stats._DenseRBF, "apply", lambda *a: pytest.fail("the Python Function ran"))
    x, y = pair(64, 100, 100, dtype=f32)
    ours = efficient.count_ops(lambda: rk.cka(x.clone().requires_grad_(), y, kernel="rbf", sigma=sigma))
    base = efficient.count_ops(lambda: efficient.rbf_cka(x.clone().requires_grad_(), y, sigma))
    assert len(ours) <= len(base), (ours, base)
