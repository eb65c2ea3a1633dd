"""The lean linear path (rcka_kernels/ops/linear.py): values and gradients against the
float64 reference for every combination of which inputs require grad, stacked
(p = q) and separate inputs, sample and feature space, groups, both estimators and
the uncentred alignment; scale invariance; NaN policy; and op counts (deterministic,
never a time) against the efficient plain-PyTorch formula."""

import contextlib
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

import rcka_kernels as rk
from rcka_kernels import _native, _validate, reference
from rcka_kernels.losses import official_alignment
from rcka_kernels.ops import linear

from .utils import accept, pair

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import efficient  # noqa: E402

# (batch, n, p, q): sample space (n < p + q) and feature space, stacked (p = q) and not
CASES = [((), 9, 6, 6), ((2,), 7, 3, 9), ((), 30, 4, 4), ((2, 3), 30, 4, 7), ((3,), 5, 1, 1)]
GRADS = [(True, False), (False, True), (True, True), (False, False)]


@pytest.fixture(autouse=True, params=["native", "native-aten", "python"])
def impl(request, monkeypatch):
    """Every test here runs on each implementation of the torch backend's op: the
    native C++ op (rcka_kernels/csrc/), with its CPU loops for the small stacked inputs and
    with the ATen calls it makes on other devices ("native-aten"), and the Python
    Function (ops/linear.py), which runs where the native op is not built and while
    torch.compile traces."""
    if request.param == "python":
        with _native.python_path():
            yield request.param
        return
    if _native.reason() is not None:
        if os.environ.get("RCKA_REQUIRE_NATIVE") == "1":
            pytest.fail(f"RCKA_REQUIRE_NATIVE=1 but the native op is unavailable: {_native.reason()}")
        pytest.skip(f"native op unavailable: {_native.reason()}")
    torch.ops.rcka_native.set_cpu_loops(request.param == "native")
    try:
        yield request.param
    finally:
        torch.ops.rcka_native.set_cpu_loops(True)


def _pair(batch, n, p, q, dtype=torch.float64, seed=0):
    return pair(n, p, q, dtype, batch, seed)


STATS = {
    "cka": (lambda x, y, deb: rk.cka(x, y, debiased=deb), lambda x, y, deb: reference.cka(x, y, "linear", None, deb)),
    "hsic": (lambda x, y, deb: rk.hsic(x, y, debiased=deb), lambda x, y, deb: reference.hsic(x, y, "linear", None, deb)),
    "alignment": (lambda x, y, deb: official_alignment(x, y), lambda x, y, deb: reference.official_alignment(x, y, False)),
}


def _stat_cases():
    for name in STATS:
        for deb in ((False, True) if name != "alignment" else (False,)):
            yield name, deb


@pytest.mark.parametrize("name,debiased", list(_stat_cases()))
@pytest.mark.parametrize("batch,n,p,q", CASES)
@pytest.mark.parametrize("grads", GRADS)
def test_values_and_gradients_match_reference(name, debiased, batch, n, p, q, grads):
    if debiased and n < 4:
        pytest.skip("the debiased estimator needs n >= 4")
    ours, ref = STATS[name]
    x, y = _pair(batch, n, p, q)
    w = torch.randn(batch, dtype=torch.float64)  # an upstream gradient that is not all ones
    a, b = x.clone().requires_grad_(grads[0]), y.clone().requires_grad_(grads[1])
    got = ours(a, b, debiased)
    assert got.shape == batch and got.dtype == torch.float64
    accept(got, ref(x, y, debiased), torch.float64)
    leaves = [t for t in (a, b) if t.requires_grad]
    if not leaves:
        assert not got.requires_grad
        return
    g = torch.autograd.grad((got * w).sum(), leaves)
    ra, rb = x.clone().requires_grad_(grads[0]), y.clone().requires_grad_(grads[1])
    want = torch.autograd.grad((ref(ra, rb, debiased) * w).sum(), [t for t in (ra, rb) if t.requires_grad])
    for gi, wi in zip(g, want):
        accept(gi, wi, torch.float64)


@pytest.mark.parametrize("name,debiased", list(_stat_cases()))
@pytest.mark.parametrize("batch,n,p,q", [((2,), 6, 4, 4), ((2,), 7, 3, 5), ((), 12, 2, 2), ((), 12, 2, 3)])
def test_gradcheck(name, debiased, batch, n, p, q):
    ours, _ = STATS[name]
    x, y = _pair(batch, n, p, q)
    x.requires_grad_(), y.requires_grad_()
    assert gradcheck(lambda a, b: ours(a, b, debiased), (x, y))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,n,p,q", CASES + [((), 6, 700, 700), ((), 5, 1100, 300)])
@pytest.mark.parametrize("statistic,centered,debiased", [("cka", True, False), ("cka", True, True), ("hsic", True, False),
                                                         ("hsic", True, True), ("cka", False, False)])
def test_native_op_implements_the_python_definition(impl, statistic, centered, debiased, batch, n, p, q, dtype):
    """The C++ op against ops/linear.py's Function on the same inputs: value and both
    gradients, to the rounding of the dtype (the same steps in the same precision)."""
    if not impl.startswith("native"):
        pytest.skip("compares the native op with the Python definition")
    if debiased and n < 4:
        pytest.skip("the debiased estimator needs n >= 4")
    x, y = _pair(batch, n, p, q, dtype=dtype)
    w = torch.randn(batch, dtype=dtype)
    out = []
    for run in (lambda a, b: _native.op()(a, b, _native.STATISTICS[statistic], centered, debiased, None),
                lambda a, b: linear._LinearAlignment.apply(a, b, statistic, centered, debiased, "torch")):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        v = run(a, b)
        out.append((v.detach(), *torch.autograd.grad((v * w).sum(), (a, b))))
    eps = 1e-12 if dtype == torch.float64 else 2e-5  # the preparation's rounding differs (the CPU loop sums in double)
    for got, want in zip(*out):
        torch.testing.assert_close(got, want, rtol=eps, atol=eps * float(want.abs().max()))


# ----------------------------------------------------------------------------- RCKA's two axes in one op


def _rcka_reference(s, t, ws, wc, official, temperature):
    ss, ts = (s, t) if temperature is None else ((s / temperature).softmax(-1), (t / temperature).softmax(-1))
    if official:
        return -ws * reference.official_alignment(ss, ts, False) - wc * reference.official_alignment(s.mT, t.mT, False)
    return ws * (1 - reference.cka(ss, ts, "linear", None, False)) + wc * (1 - reference.cka(s.mT, t.mT, "linear", None, False))


@pytest.mark.parametrize("n,p", [(9, 6), (6, 9), (7, 7), (2, 5), (40, 3)])
@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("temperature", [None, 2.0])
@pytest.mark.parametrize("grads", GRADS[:3])
def test_rcka_loss_both_axes_match_reference(n, p, official, temperature, grads):
    """RCKALoss's sample- and class-axis terms (one op at small sizes, natively)."""
    x, y = _pair((), n, p, p)
    loss = rk.RCKALoss(intra_weight=3.0, inter_weight=2.0, official=official, temperature=temperature)
    ws, wc = 3.0, 3.0 if official else 2.0  # official: the class axis takes intra_weight
    a, b = x.clone().requires_grad_(grads[0]), y.clone().requires_grad_(grads[1])
    got = loss(a, b)
    accept(got, _rcka_reference(x, y, ws, wc, official, temperature), torch.float64)
    g = torch.autograd.grad(got, [t for t in (a, b) if t.requires_grad])
    ra, rb = x.clone().requires_grad_(grads[0]), y.clone().requires_grad_(grads[1])
    want = torch.autograd.grad(_rcka_reference(ra, rb, ws, wc, official, temperature), [t for t in (ra, rb) if t.requires_grad])
    for gi, wi in zip(g, want):
        accept(gi, wi, torch.float64)


@pytest.mark.parametrize("n,p", [(6, 5), (5, 6)])
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("needs", [(1, 1, 1, 1), (1, 0, 1, 0), (0, 1, 0, 1), (1, 0, 0, 1)])
@pytest.mark.parametrize("weights", [(0.7, -1.3), (2.0, 2.0), (0.0, 1.5)])
def test_axis_pair_gradcheck(n, p, centered, needs, weights):
    """Four independent inputs (sample-axis pair, class-axis pair), any of them requiring
    grad, both sides of m = min(n, p), equal, unequal and zero weights."""
    gen = torch.Generator().manual_seed(1)
    xs, ys, xc, yc = (torch.randn(n, p, generator=gen, dtype=torch.float64, requires_grad=bool(k)) for k in needs)
    assert gradcheck(lambda *t: linear.axis_pair_alignment(*t, *weights, 2.0, centered, "torch"), (xs, ys, xc, yc))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,p", [(9, 6), (6, 9), (64, 100), (300, 220)])
@pytest.mark.parametrize("centered", [True, False])
def test_native_axis_pair_implements_the_python_definition(impl, n, p, centered, dtype):
    """The native two-axis op against its definition, ops/linear.axis_pair_alignment's two
    calls of the Python op: value and the four gradients, to the rounding of the dtype
    (stacked small inputs and, at 300 x 220, separately prepared ones)."""
    if not impl.startswith("native"):
        pytest.skip("compares the native op with the Python definition")
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(n, p, generator=gen, dtype=dtype) for _ in range(4)]
    out = []
    for python in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with _native.python_path() if python else contextlib.nullcontext():
            v = linear.axis_pair_alignment(*leaves, 0.7, -1.3, 2.0, centered, "torch") * 1.7
            out.append((v.detach(), *torch.autograd.grad(v, leaves)))
    assert out[0][0].dtype == dtype
    eps = 1e-12 if dtype == torch.float64 else 2e-5
    for got, want in zip(*out):
        torch.testing.assert_close(got, want, rtol=eps, atol=eps * float(want.abs().max()))


@pytest.mark.parametrize("official", [False, True])
def test_rcka_loss_runs_both_axes_in_one_op(impl, official, monkeypatch):
    """Natively, RCKALoss at the paper's size is one op (the per-axis path is not
    called) and runs fewer ops than the official code's plain formula."""
    if not impl.startswith("native"):
        pytest.skip("the one-op path is the native op's")
    x, y = _pair((), 64, 100, 100, dtype=torch.float32)
    loss = rk.RCKALoss(intra_weight=15, inter_weight=15, official=official)
    ours = efficient.count_ops(lambda: loss(x.clone().requires_grad_(), y))
    monkeypatch.setattr(linear, "linear_alignment", lambda *a, **k: pytest.fail("per-axis path ran"))
    loss(x.clone().requires_grad_(), y).backward()
    base = efficient.count_ops(lambda: efficient.rcka_loss(x.clone().requires_grad_(), y, 15.0, official=True))
    assert len(ours) <= len(base), (ours, base)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rcka_loss_non_finite_input(bad):
    x, y = _pair((), 12, 5, 5, dtype=torch.float32)
    y[3, 1] = bad
    loss = rk.RCKALoss(intra_weight=1.0, inter_weight=1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss(x, y)
    old = rk.config.check_finite
    rk.config.check_finite = False
    try:
        assert torch.isnan(loss(x, y))
    finally:
        rk.config.check_finite = old


@pytest.mark.parametrize("scale", [1e-15, 1e-8, 1e8, 1e15])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,p,q", [(64, 100, 100), (300, 16, 8)])
def test_float32_scale_invariance(scale, debiased, n, p, q):
    """CKA does not depend on the scale of either input, and neither does our float32
    result: sums of squares are taken after a per-group rescaling."""
    x, y = _pair((), n, p, q, dtype=torch.float32)
    want = reference.cka(x, y, "linear", None, debiased)
    for a, b in ((x * scale, y), (x, y * scale), (x * scale, y * scale)):
        accept(rk.cka(a, b, debiased=debiased), want, torch.float32)
    # HSIC scales as the squared scales: compare with the float64 reference of the same input
    h = rk.hsic(x * scale, y, debiased=debiased)
    assert torch.isfinite(h)
    accept(h / scale**2, reference.hsic(x, y, "linear", None, debiased), torch.float32)
    # the gradient of cka(c x) with respect to x is that of cka(x)
    a = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(rk.cka(a * scale, y, debiased=debiased), a)
    (g1,) = torch.autograd.grad(rk.cka(a, y, debiased=debiased), a)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g1, rtol=1e-3, atol=1e-3 * float(g1.abs().max()))


def test_float16_inputs_whose_squares_overflow_float16():
    x, y = _pair((), 40, 12, 12, dtype=torch.float16)
    x = x * 300.0  # |x|^2 ~ 1e6 > 65504
    got = rk.cka(x, y)
    assert got.dtype == torch.float32
    accept(got, reference.cka(x, y, "linear", None, False), torch.float16)


def test_debiased_and_biased_match_the_efficient_formulas():
    x, y = _pair((3,), 20, 5, 30)
    accept(rk.cka(x, y), efficient.linear_cka(x, y), torch.float64)
    accept(rk.cka(x, y, debiased=True), efficient.linear_cka_debiased(x, y), torch.float64)
    accept(official_alignment(x, y), efficient.official_alignment(x, y), torch.float64)


# ----------------------------------------------------------------------------- NaN policy


def test_finite_check_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    old = rk.config.check_finite
    try:
        rk.config.check_finite = None  # default: free on the CPU, no host sync on a GPU
        assert _validate.wants_finite_check(cpu) and not _validate.wants_finite_check(cuda)
        rk.config.check_finite = True
        assert _validate.wants_finite_check(cuda)
        rk.config.check_finite = False
        assert not _validate.wants_finite_check(cpu)
    finally:
        rk.config.check_finite = old


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name,debiased", list(_stat_cases()))
def test_non_finite_input_gives_nan_without_a_host_read(bad, name, debiased):
    """With the check off (as on a GPU by default), NaN/Inf input gives NaN, never a
    finite value, and the call reads nothing back to the host."""
    ours, _ = STATS[name]
    x, y = _pair((2,), 8, 3, 3, dtype=torch.float32)
    y[1, 3, 1] = bad
    old = rk.config.check_finite
    rk.config.check_finite = False
    try:
        ops = efficient.count_ops(lambda: ours(x, y, debiased), backward=False)
        v = ours(x, y, debiased)
    finally:
        rk.config.check_finite = old
    assert "_local_scalar_dense" not in ops
    assert torch.isnan(v[1]) and torch.isfinite(v[0])
    fn = {"cka": "cka", "hsic": "hsic", "alignment": "official_alignment"}[name]
    with pytest.raises(ValueError, match=re.escape(str(_validate.non_finite_error(fn)))):  # one message, either language
        ours(x, y, debiased)


# ----------------------------------------------------------------------------- op counts


def _ops(fn, x, y):
    x = x.detach().requires_grad_()
    return efficient.count_ops(lambda: fn(x, y))


@pytest.mark.parametrize("batch,n,p", [((), 64, 100), ((), 128, 100), ((), 300, 20), ((8,), 32, 64)])
def test_no_more_ops_than_the_efficient_formula(batch, n, p):
    """Ops per forward + backward (each a kernel launch on a GPU), student requiring
    grad and teacher detached: at most those of the efficient plain-PyTorch formula."""
    x, y = _pair(batch, n, p, p, dtype=torch.float32)
    ours, base = _ops(rk.cka, x, y), _ops(efficient.linear_cka, x, y)
    assert len(ours) <= len(base), (ours, base)


def test_a_detached_input_gets_no_gradient_work():
    x, y = _pair((), 64, 100, 100, dtype=torch.float32)
    one = efficient.count_ops(lambda: rk.cka(x.clone().requires_grad_(), y))
    both = efficient.count_ops(lambda: rk.cka(x.clone().requires_grad_(), y.clone().requires_grad_()))
    gemms = [op for op in one if "mm" in op]
    assert len(gemms) == len([op for op in both if "mm" in op]) - 1  # one backward GEMM, not two
    assert len(one) < len(both)


def test_each_implementation_carries_the_torch_backend(impl, monkeypatch):
    """The native op runs whenever it is built (the Function is not called), and
    the Function where it is not (the op is not called)."""
    x, y = _pair((2,), 9, 4, 5, dtype=torch.float32)

    def fail(*args, **kwargs):
        raise AssertionError("the other implementation ran")

    if impl.startswith("native"):
        monkeypatch.setattr(linear._LinearAlignment, "apply", fail)
    else:
        monkeypatch.setattr(torch.ops.rcka_native, "linear_alignment", fail, raising=False)
    for fn in (rk.cka, rk.hsic, official_alignment):
        assert torch.isfinite(fn(x.requires_grad_(), y)).all()


def test_native_op_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RCKA_NATIVE", "0")
    _native._load.cache_clear()
    try:
        assert _native.op() is None and "RCKA_NATIVE=0" in _native.reason()
        assert rk.native_status().reason == _native.reason() and not rk.native_status()
    finally:
        monkeypatch.delenv("RCKA_NATIVE")
        _native._load.cache_clear()


@pytest.mark.parametrize("error,why", [
    (ModuleNotFoundError("No module named 'rcka_kernels._rcka_native'", name="rcka_kernels._rcka_native"), "not built"),
    (ImportError("_rcka_native.so: undefined symbol: _ZN2at4_ops"), "built against another PyTorch"),
])
def test_a_missing_or_stale_native_library_falls_back_with_a_reason(error, why, monkeypatch):
    def fail(name, *args):
        raise error

    monkeypatch.setattr(_native.importlib, "import_module", fail)
    monkeypatch.setattr(_native, "_build", lambda: "building it on first use failed: (test)")  # no first-use build either
    _native._load.cache_clear()
    try:
        assert _native.op() is None and why in rk.native_status().reason
        x, y = _pair((), 9, 4, 5, dtype=torch.float32)
        torch.testing.assert_close(rk.cka(x, y).double(), reference.cka(x, y, "linear", None, False), rtol=1e-5, atol=1e-6)
    finally:
        monkeypatch.undo()
        _native._load.cache_clear()


def test_auto_takes_the_torch_backend_for_linear_statistics_on_cuda():
    """cuBLAS GEMMs until a committed GPU measurement shows a compiled backend faster."""
    from rcka_kernels import _dispatch

    assert _dispatch._preferred(torch.device("cuda"), "linear") == ()
    assert _dispatch._preferred(torch.device("cuda"), "rbf") == ("triton", "cuda")


# ----------------------------------------------------------------------------- on a GPU


def _cuda_backends():
    return [b for b in ("torch", "triton", "cuda") if rk.available_backends("cuda")[b].available] if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.parametrize("name,debiased", list(_stat_cases()))
@pytest.mark.parametrize("batch,n,p,q", CASES)
def test_cuda_values_and_gradients_match_reference(name, debiased, batch, n, p, q):
    if debiased and n < 4:
        pytest.skip("the debiased estimator needs n >= 4")
    ours, ref = STATS[name]
    x, y = _pair(batch, n, p, q)
    w = torch.randn(batch, dtype=torch.float64)
    want = ref(x, y, debiased)
    ra = x.clone().requires_grad_()
    (gref,) = torch.autograd.grad((ref(ra, y, debiased) * w).sum(), ra)
    for backend in _cuda_backends():
        a = x.cuda().requires_grad_()
        fn = {"cka": lambda a, b: rk.cka(a, b, debiased=debiased, backend=backend),
              "hsic": lambda a, b: rk.hsic(a, b, debiased=debiased, backend=backend),
              "alignment": lambda a, b: official_alignment(a, b, backend=backend)}[name]
        got = fn(a, y.cuda())
        accept(got.cpu(), want, torch.float64)
        (g,) = torch.autograd.grad((got * w.cuda()).sum(), a)
        accept(g.cpu(), gref, torch.float64)


@pytest.mark.gpu
def test_cuda_loss_reads_nothing_back_and_launches_no_more_than_the_plain_formula():
    x, y = (t.cuda() for t in _pair((), 64, 100, 100, dtype=torch.float32))
    ours, base = _ops(rk.cka_loss, x, y), _ops(efficient.linear_cka, x, y)
    assert "_local_scalar_dense" not in ours  # no host synchronisation by default
    assert len(ours) <= len(base) + 1, (ours, base)  # cka_loss = 1 - cka: one op more than cka


@pytest.mark.gpu
def test_cuda_graph_capture_of_the_loss():
    x, y = (t.cuda() for t in _pair((), 64, 100, 100, dtype=torch.float32))
    want = rk.cka_loss(x, y)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            rk.cka_loss(x, y)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rk.cka_loss(x, y)
    x.copy_(x * 2.0)  # a new input in the same buffer: CKA does not see the scale
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_cuda_graph_capture_of_rbf_statistics(backend):
    """No host-to-device copy inside the compiled backends' launchers (an MMD scale
    vector, a Triton tile table): RBF MMD and CKA with a given bandwidth capture."""
    if backend not in _cuda_backends():
        pytest.skip(f"{backend} unavailable on this GPU machine")
    x = torch.randn(2, 150, 8, device="cuda")
    z = torch.randn(2, 130, 8, device="cuda") + 0.3
    fns = (lambda: rk.mmd(x, z, sigma=2.0, backend=backend), lambda: rk.cka(x, x.flip(1), kernel="rbf", sigma=2.0, backend=backend))
    wants = [f() for f in fns]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [f() for f in fns]
    graph.replay()
    torch.cuda.synchronize()
    for out, want in zip(outs, wants):
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
