"""The bad-input catalogue, run for every backend that runs here (issue 11): the reference,
the torch backend (its native op and its Python path), Triton in its interpreter and the
CUDA C++ kernels under the CPU emulation; on a GPU, torch, Triton and CUDA C++ there. Each
input gets a clear error or the documented finite value, never a silent NaN; values are
held to the float64 reference by the one acceptance rule (tests/utils.py); the
``env`` fixture (tests/conftest.py) yields each environment."""

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import reference

from .utils import accept, cpu64

RBF_RULES = [None, "mean", 1.0]


@pytest.mark.parametrize("kernel,sigma", [("linear", None)] + [("rbf", s) for s in RBF_RULES])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("which", ["x", "y", "both"])
def test_constant_input_gives_zero_with_finite_gradient(env, kernel, sigma, debiased, which):
    x, y = env.pair(12, 4, 3)
    if which in ("x", "both"):
        x = torch.full_like(x, 2.5)
    if which in ("y", "both"):
        y = torch.full_like(y, -1.0)
    x.requires_grad_()
    for fn in (rk.cka, rk.hsic):
        v = fn(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend=env.backend)
        assert v.item() == pytest.approx(0.0, abs=1e-12), (fn.__name__, v)
        (g,) = torch.autograd.grad(v, x)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("sigma", [None, "mean"])
def test_a_median_bandwidth_of_zero_on_partly_constant_data(env, sigma):
    """Most rows identical: the median squared distance is 0; the value is finite and the reference's."""
    x, y = env.pair(20, 3, 3, dtype=torch.float64)
    x[3:] = x[0]
    v = rk.cka(x, y, kernel="rbf", sigma=sigma, backend=env.backend)
    assert torch.isfinite(v)
    accept(v, reference.cka(cpu64(x), cpu64(y), "rbf", sigma, False), torch.float64)


@pytest.mark.parametrize("sigma", [None, "mean", 1.0])
@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_of_identical_and_of_constant_samples(env, sigma, unbiased):
    x, _ = env.pair(10, 3, 3, dtype=torch.float64)
    same = rk.mmd(x, x.clone(), kernel="rbf", sigma=sigma, unbiased=unbiased, backend=env.backend)
    assert torch.isfinite(same)
    accept(same, reference.mmd(cpu64(x), cpu64(x), "rbf", sigma, unbiased), torch.float64)
    zeros = (torch.zeros(20, 3, dtype=torch.float64, device=env.device), torch.zeros(30, 3, dtype=torch.float64, device=env.device))
    const = rk.mmd(*zeros, kernel="rbf", sigma=sigma, unbiased=unbiased, backend=env.backend)
    assert const.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("scale", [1e-15, 1e-8, 1e8, 1e15])
def test_linear_cka_does_not_see_the_scale_in_float32(env, scale):
    x, y = env.pair(40, 6, 5)
    want = reference.cka(cpu64(x), cpu64(y), "linear", None, False)
    accept(rk.cka(x * scale, y, backend=env.backend).cpu(), want, torch.float32)
    accept(rk.cka(x, y * scale, backend=env.backend).cpu(), want, torch.float32)


def test_float16_inputs_whose_squares_overflow_float16(env):
    x, y = env.pair(30, 5, 5)
    x16, y16 = (x * 300).half(), (y * 300).half()  # entries ~1e3: squares and sums overflow float16
    v = rk.cka(x16, y16, backend=env.backend)
    assert torch.isfinite(v)
    accept(v.cpu(), reference.cka(cpu64(x16), cpu64(y16), "linear", None, False), torch.float16)


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 1.0)])
@pytest.mark.parametrize("debiased,n", [(False, 2), (True, 4)])
def test_the_smallest_n_of_each_estimator(env, kernel, sigma, debiased, n):
    x, y = env.pair(n, 3, 2, dtype=torch.float64)
    v = rk.cka(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend=env.backend)
    assert torch.isfinite(v)
    accept(v.cpu(), reference.cka(cpu64(x), cpu64(y), kernel, sigma, debiased), torch.float64)
    with pytest.raises(ValueError, match="samples"):
        rk.cka(x[:-1], y[:-1], kernel=kernel, sigma=sigma, debiased=debiased, backend=env.backend)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 1.0)])
def test_nan_and_inf_raise_or_give_nan(env, bad, kernel, sigma):
    """A ValueError on the CPU; on a GPU (no host synchronisation by default) the value is NaN."""
    x, y = env.pair(12, 3, 3)
    y[4, 1] = bad
    for fn in (rk.cka, rk.hsic):
        if env.device == "cpu":
            with pytest.raises(ValueError, match="NaN or Inf"):
                fn(x, y, kernel=kernel, sigma=sigma, backend=env.backend)
        else:
            assert torch.isnan(fn(x, y, kernel=kernel, sigma=sigma, backend=env.backend)).item()


@pytest.mark.parametrize("shapes,dtypes,error", [
    (((0, 3), (0, 3)), (torch.float32, torch.float32), ValueError),   # empty batch
    (((5, 0), (5, 2)), (torch.float32, torch.float32), ValueError),   # zero features
    (((5, 3), (5, 3)), (torch.float32, torch.int64), TypeError),      # mixed floats promote; an integer does not
    (((5, 3), (5, 3)), (torch.int64, torch.int64), TypeError),
    (((5, 3), (5, 3)), (torch.complex64, torch.complex64), TypeError),
])
def test_inputs_no_backend_takes(env, shapes, dtypes, error):
    x, y = (torch.zeros(sh, dtype=dt, device=env.device) for sh, dt in zip(shapes, dtypes))
    with pytest.raises(error):
        rk.cka(x, y, backend=env.backend)


def test_mixed_devices(env):
    x, _ = env.pair(5, 3, 3)
    with pytest.raises(ValueError, match="device"):
        rk.cka(x, torch.zeros(5, 3, device="meta"), backend=env.backend)
