"""The bad-input catalogue, run for every backend that runs here (issue 11): the reference,
the torch backend (its native op and its Python path) and Triton in its interpreter. Each
input gets a clear error or the documented finite value, never a silent NaN; values are
held to the float64 reference by the shared tolerance table (tests/utils.py)."""

import os

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import _native, reference

from .utils import TOL

BACKENDS = [
    "reference",
    "torch",
    pytest.param("torch-python", id="torch-python"),
    pytest.param("triton", marks=pytest.mark.interpreter),
]
RBF_RULES = [None, "mean", 1.0]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend name to pass; "torch-python" is the torch backend without its native op."""
    name = request.param
    if name == "torch-python":
        monkeypatch.setattr(_native, "op", lambda: None)
        monkeypatch.setattr(_native, "pair_op", lambda: None)
        return "torch"
    if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        return name  # the body runs in the interpreter's child pytest (tests/conftest.py), which checks
    st = rk.available_backends("cpu")[name]
    if not st.available:
        pytest.skip(f"{name}: {st.reason}")
    return name


def _pair(n, p, q, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = 0.5 * torch.randn(n, q, generator=g, dtype=torch.float64)
    y[:, : min(p, q)] += x[:, : min(p, q)]
    return x.to(dtype), y.to(dtype)


def _close(got, want, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=atol * scale, rtol=rtol * scale)


@pytest.mark.parametrize("kernel,sigma", [("linear", None)] + [("rbf", s) for s in RBF_RULES])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("which", ["x", "y", "both"])
def test_constant_input_gives_zero_with_finite_gradient(backend, kernel, sigma, debiased, which):
    x, y = _pair(12, 4, 3)
    if which in ("x", "both"):
        x = torch.full_like(x, 2.5)
    if which in ("y", "both"):
        y = torch.full_like(y, -1.0)
    x.requires_grad_()
    for fn in (rk.cka, rk.hsic):
        v = fn(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)
        assert v.item() == pytest.approx(0.0, abs=1e-12), (fn.__name__, v)
        (g,) = torch.autograd.grad(v, x)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("sigma", [None, "mean"])
def test_a_median_bandwidth_of_zero_on_partly_constant_data(backend, sigma):
    """Most rows identical: the median squared distance is 0; the value is finite and the reference's."""
    x, y = _pair(20, 3, 3, dtype=torch.float64)
    x[3:] = x[0]
    v = rk.cka(x, y, kernel="rbf", sigma=sigma, backend=backend)
    assert torch.isfinite(v)
    _close(v, reference.cka(x, y, "rbf", sigma, False), torch.float64)


@pytest.mark.parametrize("sigma", [None, "mean", 1.0])
@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_of_identical_and_of_constant_samples(backend, sigma, unbiased):
    x, _ = _pair(10, 3, 3, dtype=torch.float64)
    same = rk.mmd(x, x.clone(), kernel="rbf", sigma=sigma, unbiased=unbiased, backend=backend)
    assert torch.isfinite(same)
    _close(same, reference.mmd(x, x.clone(), "rbf", sigma, unbiased), torch.float64)
    const = rk.mmd(torch.zeros(20, 3, dtype=torch.float64), torch.zeros(30, 3, dtype=torch.float64),
                   kernel="rbf", sigma=sigma, unbiased=unbiased, backend=backend)
    assert const.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("scale", [1e-15, 1e-8, 1e8, 1e15])
def test_linear_cka_does_not_see_the_scale_in_float32(backend, scale):
    x, y = _pair(40, 6, 5)
    want = reference.cka(x.double(), y.double(), "linear", None, False)
    _close(rk.cka(x * scale, y, backend=backend), want, torch.float32)
    _close(rk.cka(x, y * scale, backend=backend), want, torch.float32)


def test_float16_inputs_whose_squares_overflow_float16(backend):
    x, y = _pair(30, 5, 5)
    x16, y16 = (x * 300).half(), (y * 300).half()  # entries ~1e3: squares and sums overflow float16
    v = rk.cka(x16, y16, backend=backend)
    assert torch.isfinite(v)
    _close(v, reference.cka(x16.double(), y16.double(), "linear", None, False), torch.float16)


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 1.0)])
@pytest.mark.parametrize("debiased,n", [(False, 2), (True, 4)])
def test_the_smallest_n_of_each_estimator(backend, kernel, sigma, debiased, n):
    x, y = _pair(n, 3, 2, dtype=torch.float64)
    v = rk.cka(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)
    assert torch.isfinite(v)
    _close(v, reference.cka(x, y, kernel, sigma, debiased), torch.float64)
    with pytest.raises(ValueError, match="samples"):
        rk.cka(x[:-1], y[:-1], kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 1.0)])
def test_nan_and_inf_raise(backend, bad, kernel, sigma):
    x, y = _pair(12, 3, 3)
    y[4, 1] = bad
    for fn in (rk.cka, rk.hsic):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(x, y, kernel=kernel, sigma=sigma, backend=backend)


@pytest.mark.parametrize("x,y,error", [
    (torch.zeros(0, 3), torch.zeros(0, 3), ValueError),          # empty batch
    (torch.zeros(5, 0), torch.zeros(5, 2), ValueError),          # zero features
    (torch.zeros(5, 3), torch.zeros(5, 3, dtype=torch.float64), TypeError),  # mixed dtypes
    (torch.zeros(5, 3, dtype=torch.int64), torch.zeros(5, 3, dtype=torch.int64), TypeError),
    (torch.zeros(5, 3, dtype=torch.complex64), torch.zeros(5, 3, dtype=torch.complex64), TypeError),
    (torch.zeros(5, 3), torch.zeros(5, 3, device="meta"), ValueError),  # mixed devices
])
def test_inputs_no_backend_takes(backend, x, y, error):
    with pytest.raises(error):
        rk.cka(x, y, backend=backend)
