"""Global-batch CKA under torch.distributed: 2 gloo processes on the CPU give the
single-process value and gradients on the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import rcka_kernels as rk
from rcka_kernels import distributed as rkd

from .utils import join_group, spawn_ranks

WORLD = 2
SPLIT = [7, 6]  # uneven shards
CASES = [("linear", False), ("linear", True), ("rbf", False)]
WIDE_ROWS, WIDE_P, WIDE_Q = 16, 4096, 2048  # per rank: wide features, small global batch (sample space)


class BytesAllocated(TorchDispatchMode):
    """The bytes of every new tensor the ops create (views and in-place results left
    out): a count, independent of the machine's load, that p x p products cannot hide in."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def _wide():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(WORLD * WIDE_ROWS, WIDE_P, generator=g)
    y = torch.randn(WORLD * WIDE_ROWS, WIDE_Q, generator=g)
    y[:, :100] += x[:, :100]
    return x, y


def _wide_data_small(p):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(sum(SPLIT), p, dtype=torch.float64, generator=g)
    return x, x[:, :3] + torch.randn(sum(SPLIT), 3, dtype=torch.float64, generator=g)


def _penalty(data, rows, fn):
    """The gradient of a gradient penalty |d cka / dx|^2 (create_graph=True), for x's rows."""
    x, y = (t[rows].clone().requires_grad_(True) for t in data)
    (g,) = torch.autograd.grad(fn(x, y), x, create_graph=True)
    g.square().sum().backward()
    return x.grad, y.grad


def _wide_cka(x, y, fn, debiased):
    """(value, grad of x, grad of y, bytes allocated by forward + backward)."""
    x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    with BytesAllocated() as b:
        v = fn(x, y, debiased=debiased)
        v.backward()
    return v.detach(), x.grad, y.grad, b.bytes


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SPLIT), 5, dtype=torch.float64, generator=g)
    y = x[:, :3] @ torch.randn(3, 4, dtype=torch.float64, generator=g) + torch.randn(sum(SPLIT), 4, dtype=torch.float64, generator=g)
    w = torch.randn(5, 3, dtype=torch.float64, generator=g)
    return x, y, w



def _worker(rank, port, out_dir):
    join_group(rank, port, WORLD)
    try:
        x, y, w = _data()
        lo = sum(SPLIT[:rank])
        rows = slice(lo, lo + SPLIT[rank])
        res = {}
        for kernel, debiased in CASES:
            xr = x[rows].clone().requires_grad_(True)
            yr = y[rows].clone().requires_grad_(True)
            v = rkd.cka(xr, yr, kernel=kernel, sigma=None if kernel == "linear" else 2.0, debiased=debiased)
            v.backward()
            res[(kernel, debiased)] = (v.detach(), xr.grad, yr.grad)
        res["hsic"] = rkd.hsic(x[rows], y[rows], debiased=True).detach()
        # DDP: parameters receive the gradient of the global-batch loss
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(5, 3, bias=False).double())
        with torch.no_grad():
            model.module.weight.copy_(w.T)
        loss = rkd.cka_loss(model(x[rows]), y[rows])
        loss.backward()
        res["ddp"] = (loss.detach(), model.module.weight.grad.clone())
        # a global batch whose rows are all the same: CKA 0 (as functional.cka), on every rank
        const = torch.full((SPLIT[rank], 4), 0.1, dtype=torch.float64)
        res["const"] = torch.stack([rkd.cka(const, y[rows]), rkd.cka(y[rows], const, debiased=True), rkd.hsic(const, y[rows])])
        g = rkd.all_gather(x[rows].clone().requires_grad_(True))
        res["gather"] = g.detach()
        xw, yw = _wide()
        wide = slice(rank * WIDE_ROWS, (rank + 1) * WIDE_ROWS)
        for debiased in (False, True):
            res[("wide", debiased)] = _wide_cka(xw[wide], yw[wide], rkd.cka, debiased)
        res["wide-hsic"] = rkd.hsic(xw[wide], yw[wide], debiased=True)
        for width in (5, 20):  # feature space (p + q <= n) and sample space
            res[("penalty", width)] = _penalty(_wide_data_small(width), rows, rkd.cka)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears the group down while its peer is mid-exchange
    finally:
        dist.destroy_process_group()
    # The results are on disk. Leave without the interpreter's teardown, where this
    # torch build's gloo threads sometimes abort the process (SIGABRT, "terminate
    # called without an active exception") after all the work is done.
    os._exit(0)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return spawn_ranks(_worker, out, WORLD)


@pytest.mark.parametrize("kernel,debiased", CASES)
def test_value_and_gradients_match_single_process(results, kernel, debiased):
    x, y, _ = _data()
    x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    want = rk.cka(x, y, kernel=kernel, sigma=None if kernel == "linear" else 2.0, debiased=debiased)
    want.backward()
    for r in range(WORLD):
        v, gx, gy = results[r][(kernel, debiased)]
        torch.testing.assert_close(v, want.detach(), rtol=1e-10, atol=1e-12)
        lo = sum(SPLIT[:r])
        rows = slice(lo, lo + SPLIT[r])
        # every rank's loss is the global CKA; backward gives the gradient of their sum
        torch.testing.assert_close(gx, WORLD * x.grad[rows], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(gy, WORLD * y.grad[rows], rtol=1e-8, atol=1e-10)


def test_hsic_matches_single_process(results):
    x, y, _ = _data()
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["hsic"], rk.hsic(x, y, debiased=True), rtol=1e-10, atol=1e-12)


def test_ddp_parameter_gradients_match_single_process(results):
    x, y, w = _data()
    w = w.T.clone().requires_grad_(True)
    loss = rk.cka_loss(x @ w.T, y)
    loss.backward()
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["ddp"][0], loss.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(results[r]["ddp"][1], w.grad, rtol=1e-8, atol=1e-10)


def test_constant_global_batch_gives_zero(results):
    for r in range(WORLD):
        assert results[r]["const"].tolist() == [0.0, 0.0, 0.0]


def test_all_gather_uneven(results):
    x, _, _ = _data()
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["gather"], x)


def test_single_process_fallback():
    x, y, _ = _data()
    assert not rkd.is_distributed()
    torch.testing.assert_close(rkd.cka(x, y), rk.cka(x, y))
    assert rkd.all_gather(x) is x
    with pytest.raises(ValueError, match="same number of samples"):
        rkd.cka(x, y[:3])


@pytest.mark.parametrize("debiased", [False, True])
def test_wide_features_gather_rows_with_single_process_value_and_memory(results, debiased):
    """p = 4096, q = 2048, 2 x 16 rows: the ranks gather the rows and run the single-process
    op (no p x p products): its value and gradients, and no more than twice its bytes
    allocated plus the gathered rows."""
    x, y = _wide()
    want, gx, gy, single = _wide_cka(x, y, rk.cka, debiased)
    gathered = 4 * x.shape[0] * (WIDE_P + WIDE_Q) * x.element_size()
    for r in range(WORLD):
        v, rgx, rgy, used = results[r][("wide", debiased)]
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6)
        rows = slice(r * WIDE_ROWS, (r + 1) * WIDE_ROWS)
        torch.testing.assert_close(rgx, WORLD * gx[rows], rtol=1e-4, atol=1e-6 * float(gx.abs().max()))
        torch.testing.assert_close(rgy, WORLD * gy[rows], rtol=1e-4, atol=1e-6 * float(gy.abs().max()))
        assert used <= 2 * single + gathered, (used, single, gathered)
        assert used < WIDE_P * WIDE_P * x.element_size()  # a single p x p product would exceed it
    if debiased:
        for r in range(WORLD):
            torch.testing.assert_close(results[r]["wide-hsic"], rk.hsic(x, y, debiased=True), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("width", [5, 20])
def test_second_derivatives_match_single_process(results, width):
    """Each rank's penalty is |WORLD d cka / dx_r|^2 (the gradient of the ranks' summed losses),
    and its backward sums over the ranks: WORLD^2 times the single-process penalty's gradient."""
    data = _wide_data_small(width)
    want = _penalty(data, slice(None), rk.cka)
    for r in range(WORLD):
        lo = sum(SPLIT[:r])
        rows = slice(lo, lo + SPLIT[r])
        for got, w in zip(results[r][("penalty", width)], want):
            torch.testing.assert_close(got, WORLD**2 * w[rows], rtol=1e-8, atol=1e-10)


def test_mixed_dtypes_and_autocast_follow_the_precision_rule():
    """As rk.cka: a bfloat16 input with a float32 one computes in float32, and autocast does not lower the products."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 5, generator=g), torch.randn(10, 4, generator=g)
    want = rk.cka(x.bfloat16().float(), y)
    assert rk.distributed.cka(x.bfloat16(), y).item() == pytest.approx(want.item(), abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rk.distributed.hsic(x, y, debiased=True)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(rk.hsic(x, y, debiased=True).item(), rel=1e-6)
