"""What only the Triton backend on a GPU shows: many tiny groups (PCKA) in one launch,
determinism, memory that stays linear in n (no n x n matrix), the tensors' device
rather than the current one, and half-precision gradients under tf32. Its values and
gradients (bf16 included, which the interpreter cannot check) are held to the
reference by tests/test_parity.py and its bad inputs by tests/test_catalogue.py (the
triton-cuda environment)."""

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import reference

from .utils import accept, fp32_matmul_precision, pair

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")


def _pair(n, p, q, dtype, batch=()):
    return pair(n, p, q, dtype, batch, device="cuda")


def _grads(fn, x, y, w):
    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
    (fn(a, b) * w).sum().backward()
    return a.grad, b.grad


@pytest.mark.parametrize("n", [16, 49, 128])
def test_tiny_groups_pcka(n):
    """Many tiny groups (PCKA's per-channel CKA) in one launch equal per-group calls."""
    x, y = _pair(n, 7, 5, torch.float32, batch=(300,))
    for kernel in ("linear", "rbf"):
        got = rk.cka(x, y, kernel=kernel, backend="triton")
        want = reference.cka(x.double().cpu(), y.double().cpu(), kernel, None)
        accept(got, want, torch.float32)


def test_deterministic():
    x, y = _pair(3001, 40, 24, torch.float32)
    a = rk.cka(x, y, kernel="rbf", backend="triton")
    b = rk.cka(x, y, kernel="rbf", backend="triton")
    assert torch.equal(a, b)
    ga = _grads(lambda u, v: rk.cka(u, v, kernel="rbf", backend="triton"), x, y, torch.ones((), device="cuda"))
    gb = _grads(lambda u, v: rk.cka(u, v, kernel="rbf", backend="triton"), x, y, torch.ones((), device="cuda"))
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_memory_is_linear_in_n():
    """n = 32768: an n x n fp32 Gram is 4 GiB; forward + backward must stay far below it."""
    n = 32768
    x, y = _pair(n, 64, 32, torch.float16)
    x.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rk.cka(x, y, kernel="rbf", sigma=8.0, backend="triton").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 4 * n * n / 16, peak  # the row-sum workspace is 2 n^2 / BM floats; an n x n matrix would be 4 n^2 bytes


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_tensors_device_not_the_current_one():
    x = torch.randn(2, 40, 5, device="cuda:1")
    y = torch.randn(2, 40, 3, device="cuda:1")
    want = rk.cka(x.cpu().double(), y.cpu().double(), kernel="rbf", sigma=1.0, backend="reference")
    with torch.cuda.device(0):
        got = rk.cka(x, y, kernel="rbf", sigma=1.0, backend="triton")
    assert got.device == x.device
    accept(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_backward_keeps_its_precision_with_tf32_on(dtype):
    """rowsum(W) x_i - W X cancels: W X must use the fp32 weights the row sums were
    taken from (tf32x3), not tf32-rounded ones, or the half gradient loses its digits."""
    with fp32_matmul_precision("tf32"):
        x = (torch.randn(2, 200, 48, dtype=torch.float64) * 2 + 0.5).to(dtype)
        y = torch.randn(2, 200, 40, dtype=torch.float64).to(dtype)
        w = torch.randn(2, dtype=torch.float64)
        a = x.cuda().requires_grad_()
        (rk.cka(a, y.cuda(), kernel="rbf", sigma=3.0, backend="triton") * w.cuda()).sum().backward()
        b = x.double().requires_grad_()
        (reference.cka(b, y.double(), "rbf", 3.0) * w).sum().backward()
        scale = float(b.grad.abs().max())
        accept(a.grad.cpu().double() / scale, b.grad / scale, dtype)
