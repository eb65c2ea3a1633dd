"""rcka_native::dense_rbf (rcka_kernels/csrc/native.cpp) against the Python definition it mirrors
(ops/stats.py's dense RBF path); tests/test_rbf_small.py holds both to the float64 reference."""

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import _native

from .utils import REQUIRE, lacks, pair, require, weighted_grads

f32, f64 = torch.float32, torch.float64
FNS = {"cka": rk.cka, "hsic": rk.hsic}


@pytest.fixture(params=["cpu-loops", "aten"])
def loops(request):
    """The op's CPU loop (the median's selection) and the ATen path it takes on other devices."""
    require(REQUIRE["torch"], lacks("torch"))
    torch.ops.rcka_native.set_cpu_loops(request.param == "cpu-loops")
    yield
    torch.ops.rcka_native.set_cpu_loops(True)


@pytest.mark.parametrize("p,q,batch", [(9, 9, ()), (9, 4, (3,)), (4, 9, (2, 2))], ids=["p=q", "p>q-groups", "p<q-2d"])
@pytest.mark.parametrize("sigma", [None, "mean", 1.3, "tensor"])
@pytest.mark.parametrize("name", list(FNS))
@pytest.mark.parametrize("dtype", [f64, f32])
def test_the_native_op_is_the_python_definition(loops, p, q, batch, sigma, name, dtype):
    """The C++ op against the Python steps it mirrors on the same inputs, one rounding apart:
    values and gradients, both estimators, a degenerate group among the others."""
    assert _native.dense_rbf_op() is not None
    x, y = pair(11, p, q, batch=batch, dtype=dtype)
    if batch:
        y.view(-1, 11, q)[0] = y.view(-1, 11, q)[0, :1]  # group 0: all rows equal (CKA and HSIC 0)
    if sigma == "tensor":
        sigma = torch.linspace(0.8, 2.0, max(1, x[..., 0, 0].numel()), dtype=dtype).view(batch)
    fn = FNS[name]
    for debiased in (False, True):
        got = weighted_grads(fn, x, y, kernel="rbf", sigma=sigma, debiased=debiased)
        with _native.python_path():
            want = weighted_grads(fn, x, y, kernel="rbf", sigma=sigma, debiased=debiased)
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == f64 else dict(rtol=2e-5, atol=1e-6)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **tol)
        if batch:
            assert float(got[0].view(-1)[0]) == 0.0
