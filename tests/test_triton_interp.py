"""What only the Triton backend has, run by Triton's interpreter on CPU tensors: its ops
inside torch.compile, an empty batch of groups, the current tf32 API, and the fused
one-pass centered_gram being what runs. Its values and gradients are held to the
reference by tests/test_parity.py (the triton-interpreter environment).

TRITON_INTERPRET=1 must be in the environment before triton is imported: the
``interpreter`` marker has tests/conftest.py run these tests' bodies in one child
pytest with the variable set, each reported as its own test here (or run the file
directly: ``TRITON_INTERPRET=1 pytest tests/test_triton_interp.py``).
"""

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import reference
from rcka_kernels.ops import torch_backend, triton_backend

from .utils import accept, fp32_matmul_precision, pair, require

require("RCKA_REQUIRE_TRITON", triton_backend.interpreter_reason(), module=True)

pytestmark = pytest.mark.interpreter


def test_torch_compile_fullgraph_traces():
    """The custom ops are opaque to dynamo: the whole function is one graph."""

    def f(a, b):
        return rk.cka(a, b, kernel="rbf", sigma=1.0, backend="triton") + rk.cka(a, b, backend="triton")

    x, y = pair(12, 3, 4, torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = x.clone().requires_grad_()
    out = compiled(a, y)
    torch.testing.assert_close(out, f(x, y))
    out.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_empty_batch_of_groups():
    """G = 0 (an empty leading batch) launches nothing and returns empty results, as the torch backend does."""
    x, y, z = torch.randn(0, 5, 3), torch.randn(0, 5, 2), torch.randn(0, 4, 3)
    gam, gs, r = torch.ones(0), torch.ones(0, 3, dtype=torch.float64), torch.ones(0, 5)
    for name, args in [
        ("linear_stats", (x, y)),
        ("linear_stats_backward", (x, y, gs)),
        ("rbf_stats", (x, y, gam, gam)),
        ("rbf_stats_backward", (x, y, gam, gam, gs, r, r)),
        ("rbf_mmd_sums", (x, z, gam)),
        ("rbf_mmd_sums_backward", (x, z, gam, gs)),
    ]:
        got, want = getattr(triton_backend, name)(*args), getattr(torch_backend, name)(*args)
        if name == "linear_stats":
            got, want = (got,), (want[0] if isinstance(want, tuple) else want,)
        assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]


def test_rbf_under_the_current_tf32_api():
    """torch.backends.cuda.matmul.fp32_precision = "tf32" (PyTorch's current API): the
    backend runs (it used to raise "mix of the legacy and new APIs")."""
    with fp32_matmul_precision("tf32", current_api=True):
        x, y = pair(12, 3, 4, torch.float32)
        got = rk.cka(x, y, kernel="rbf", sigma=1.3, backend="triton")
        accept(got, reference.cka(x.double(), y.double(), "rbf", 1.3), torch.float32)


def test_centered_gram_runs_the_fused_kernel(monkeypatch):
    """(..., n, p) with two batch dims, default (64-row) tiles, n over one tile: the
    Triton backend's one-pass centered_gram runs (not the torch fallback)."""
    seen = []
    orig = triton_backend.centered_gram
    monkeypatch.setattr(triton_backend, "centered_gram", lambda *a, **k: seen.append(a[0].shape) or orig(*a, **k))
    x = (torch.randn(6, 70, 5, dtype=torch.float64) * 2 + 0.7).float().reshape(2, 3, 70, 5)
    got = rk.centered_gram(x, kernel="rbf", debiased=True, backend="triton")
    assert seen and got.shape == (2, 3, 70, 70)
    accept(got, reference.centered_gram(x.double(), "rbf", None, True), torch.float32)
