"""Bad and degenerate input: a clear error or a documented finite value, never a silent NaN.
Also: backend selection, the loss module, and torch.compile tracing."""

import math

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import reference

from .utils import accept

FNS = {
    "cka": rk.cka,
    "hsic": rk.hsic,
    "cka_loss": rk.cka_loss,
    "gram_discrepancy": rk.gram_discrepancy,
    "mmd_upper_bound": rk.mmd_upper_bound,
}


@pytest.mark.parametrize("name", list(FNS))
def test_mismatched_samples(name):
    with pytest.raises(ValueError, match="same number of samples"):
        FNS[name](torch.randn(10, 3), torch.randn(11, 3))


@pytest.mark.parametrize("name", list(FNS) + ["mmd"])
def test_one_dimensional_input(name):
    fn = rk.mmd if name == "mmd" else FNS[name]
    with pytest.raises(ValueError, match=r"shape \(n, features\)"):
        fn(torch.randn(10), torch.randn(10))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_too_few_samples_for_the_unbiased_estimator(n):
    x = torch.randn(n, 3)
    with pytest.raises(ValueError, match="at least 4"):
        rk.cka(x, x, debiased=True)
    with pytest.raises(ValueError, match="at least 4"):
        rk.hsic(x, x, debiased=True)
    with pytest.raises(ValueError, match="at least 2"):
        rk.mmd(x[:1], x[:1], unbiased=True)


def test_one_sample_is_too_few_for_hsic():
    with pytest.raises(ValueError, match="at least 2"):
        rk.cka(torch.randn(1, 3), torch.randn(1, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", list(FNS) + ["mmd"])
def test_non_finite_input_raises(bad, name):
    fn = rk.mmd if name == "mmd" else FNS[name]
    x, y = torch.randn(8, 3), torch.randn(8, 3)
    y[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(x, y)


def test_non_finite_check_can_be_switched_off():
    x, y = torch.randn(8, 3), torch.randn(8, 3)
    y[0, 0] = float("nan")
    rk.config.check_finite = False
    try:
        assert torch.isnan(rk.cka(x, y))  # the caller asked for no check and gets IEEE semantics
    finally:
        rk.config.check_finite = True


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", None), ("rbf", "mean"), ("rbf", 1.0)])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_input_gives_zero_not_nan(kernel, sigma, debiased, dtype):
    x = torch.full((9, 4), 0.1, dtype=dtype)  # 0.1 is not exact in binary: the mean is not exact either
    y = torch.randn(9, 3, dtype=dtype)
    kw = dict(kernel=kernel, sigma=sigma, debiased=debiased)
    for a, b in ((x, y), (y, x), (x, x)):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        v = rk.cka(a, b, **kw)
        assert v.item() == 0.0
        assert rk.hsic(a, b, **kw).item() == 0.0
        v.backward()
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert reference.cka(x, y, kernel, sigma, debiased).item() == 0.0  # the oracle says the same


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_some_constant_features_are_fine(kernel):
    x = torch.randn(20, 5, dtype=torch.float64)
    x[:, 2] = 7.0
    y = torch.randn(20, 3, dtype=torch.float64) + x[:, :3]
    accept(rk.cka(x, y, kernel=kernel), reference.cka(x, y, kernel), torch.float64)


def test_all_zero_input():
    z = torch.zeros(6, 2)
    assert rk.cka(z, torch.randn(6, 3)).item() == 0.0
    assert rk.gram_discrepancy(z, torch.randn(6, 3), centered=False).item() == 1.0


@pytest.mark.parametrize("shape", [(0, 3), (5, 0), (2, 0, 3)])
def test_empty_input(shape):
    with pytest.raises(ValueError, match="empty"):
        rk.cka(torch.randn(shape), torch.randn(shape))


def test_mixed_float_dtypes_promote():
    """float32 with float64 computes in float64 (tests/test_autocast.py: every function, half dtypes)."""
    x, y = torch.randn(5, 3), torch.randn(5, 3, dtype=torch.float64)
    got = rk.cka(x, y)
    assert got.dtype == torch.float64
    assert got.item() == rk.cka(x.double(), y).item()


@pytest.mark.parametrize("other", [torch.int64, torch.complex64])
def test_integer_and_complex_input(other):
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        rk.cka(torch.ones(5, 3, dtype=other), torch.ones(5, 3, dtype=other))
    with pytest.raises(TypeError, match="y must be float16, bfloat16, float32 or float64"):
        rk.cka(torch.randn(5, 3), torch.ones(5, 3, dtype=other))
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        rk.mmd(torch.ones(5, 3, dtype=other), torch.randn(5, 3, dtype=torch.bfloat16))


def test_mixed_devices():
    with pytest.raises(ValueError, match="one device"):
        rk.cka(torch.randn(5, 3), torch.randn(5, 3, device="meta"))


def test_batch_dims_must_agree():
    with pytest.raises(ValueError, match="batch"):
        rk.cka(torch.randn(2, 5, 3), torch.randn(3, 5, 3))


def test_mmd_needs_equal_widths():
    with pytest.raises(ValueError, match="same number of features"):
        rk.mmd(torch.randn(5, 3), torch.randn(6, 4))


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), "average", True])
def test_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        rk.cka(torch.randn(5, 3), torch.randn(5, 3), kernel="rbf", sigma=sigma)


def test_bad_sigma_tensor():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="one per group"):
        rk.cka(x, x, kernel="rbf", sigma=torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        rk.cka(x, x, kernel="rbf", sigma=torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("name", ["cka", "hsic", "centered_gram"])
def test_debiased_must_be_a_bool(name):
    """Not truthiness: debiased="no" would silently be the debiased estimator."""
    x = torch.randn(6, 3)
    fn = getattr(rk, name)
    with pytest.raises(TypeError, match=f"{name}: debiased must be True or False, got 'no'"):
        fn(x, debiased="no") if name == "centered_gram" else fn(x, x, debiased="no")
    with pytest.raises(TypeError, match="mmd: unbiased must be True or False"):
        rk.mmd(x, x, unbiased="yes")
    with pytest.raises(TypeError, match="gram_discrepancy: centered must be True or False"):
        rk.gram_discrepancy(x, x, centered=1.0)


def test_sigma_with_linear_kernel():
    with pytest.raises(ValueError, match="linear kernel takes none"):
        rk.cka(torch.randn(5, 3), torch.randn(5, 3), sigma=1.0)


def test_unknown_kernel_and_backend():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="kernel must be one of"):
        rk.cka(x, x, kernel="poly")
    with pytest.raises(ValueError, match="unknown backend"):
        rk.cka(x, x, backend="numpy")


def test_median_falls_back_to_mean_when_most_pairs_coincide():
    x = torch.zeros(10, 2, dtype=torch.float64)
    x[0, 0] = 1.0  # 82 of 100 distances are 0: the median is 0
    y = torch.randn(10, 2, dtype=torch.float64)
    v = rk.cka(x, y, kernel="rbf")
    assert torch.isfinite(v)
    accept(v, reference.cka(x, y, "rbf"), torch.float64)


# ----------------------------------------------------------------------------- backends


def test_available_backends_say_why():
    st = rk.available_backends()
    assert set(st) == {"reference", "torch", "triton", "cuda"}
    assert st["torch"].available and st["reference"].available
    for s in st.values():
        assert s.available or (isinstance(s.reason, str) and s.reason)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_explicit_unavailable_backend_raises_with_reason():
    x = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        rk.cka(x, x, backend="cuda")


def test_reference_backend_through_the_api():
    x, y = torch.randn(7, 3), torch.randn(7, 2)
    got = rk.cka(x, y, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rk.cka(x, y, backend="torch"), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- module and compile


def test_cka_loss_module_is_a_drop_in():
    feats_s = torch.randn(16, 8, 4, 4, requires_grad=True)  # (n, C, H, W) feature maps
    feats_t = torch.randn(16, 32)
    loss = rk.CKALoss()(feats_s, feats_t)
    want = 1 - reference.cka(feats_s.detach().reshape(16, -1), feats_t)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert feats_s.grad is not None and torch.isfinite(feats_s.grad).all()


def test_cka_loss_module_groups_and_reduction():
    x, y = torch.randn(3, 9, 4), torch.randn(3, 9, 5)
    per_group = rk.CKALoss(flatten=False, reduction="none")(x, y)
    assert per_group.shape == (3,)
    torch.testing.assert_close(rk.CKALoss(flatten=False)(x, y), per_group.mean())
    torch.testing.assert_close(rk.CKALoss(flatten=False, reduction="sum")(x, y), per_group.sum())
    with pytest.raises(ValueError, match="reduction"):
        rk.CKALoss(reduction="max")


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 1.5), ("rbf", "median")])
@pytest.mark.parametrize("n,p,q", [(12, 5, 3), (6, 5, 3), (12, 4, 4)])  # feature and sample space, stacked p = q
def test_torch_compile_traces_without_graph_breaks(kernel, sigma, n, p, q):
    torch._dynamo.reset()  # each case compiles the package's code afresh (not toward dynamo's recompile limit)
    x, y = torch.randn(2, n, p), torch.randn(2, n, q)

    def f(a, b):
        return rk.cka(a, b, kernel=kernel, sigma=sigma).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = compiled(a, b)
    out.backward()
    a2, b2 = x.clone().requires_grad_(), y.clone().requires_grad_()
    want = f(a2, b2)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(a.grad, a2.grad)
    assert math.isfinite(out.item())


@pytest.mark.parametrize("sigma", [1.8, 1.85])
def test_rbf_self_terms_below_float32_range_give_zero_not_nan(sigma):
    """Off-diagonal RBF entries near 1e-20 (bandwidth far below the distances) put
    the debiased HSIC(K, K) below float32's smallest normal number: d CKA / d S
    would overflow float32 in the backends (NaN gradients). Documented value: 0."""
    x = torch.randn(20, 200).requires_grad_()
    y = torch.randn(20, 200).requires_grad_()
    v = rk.cka(x, y, kernel="rbf", sigma=sigma, debiased=True)
    v.backward()
    assert v.item() == 0.0
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # float64 has the range: there the value is the reference's
    xd, yd = x.detach().double(), y.detach().double()
    accept(rk.cka(xd, yd, kernel="rbf", sigma=sigma, debiased=True),
                               reference.cka(xd, yd, "rbf", sigma, True), torch.float64)


@pytest.mark.parametrize("sigma", [None, "median", "mean"])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_constant_input_with_a_heuristic_bandwidth_is_zero_not_nan(sigma, debiased, backend):
    """All distances 0 gives a 0 median and mean: the bandwidth is then immaterial
    (K = 1), not a division by zero."""
    y = torch.randn(60, 3, dtype=torch.float64)
    for a, b in ((torch.ones(60, 7, dtype=torch.float64), y), (y, torch.ones(60, 7, dtype=torch.float64))):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        for fn in (rk.cka, rk.hsic):
            v = fn(a, b, kernel="rbf", sigma=sigma, debiased=debiased, backend=backend)
            assert abs(v.item()) <= (1e-12 if backend == "reference" else 0.0)  # the textbook oracle rounds
            ga, gb = torch.autograd.grad(v, (a, b))
            assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("sigma", [None, "mean"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_of_identical_constant_samples_is_zero(sigma, unbiased):
    z = torch.zeros(20, 3)
    assert rk.mmd(z, torch.zeros(30, 3), sigma=sigma, unbiased=unbiased).item() == 0.0
    assert rk.mmd(z + 2.0, torch.full((30, 3), 2.0), sigma=sigma, unbiased=unbiased).item() == 0.0
