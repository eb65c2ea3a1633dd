"""The Triton backend from the outside: its behaviour when triton cannot be
imported at all, and what it checks before any launch. The kernels themselves run
in Triton's interpreter (tests/test_parity.py, tests/test_triton_interp.py,
marked ``interpreter``: see tests/conftest.py) and on GPUs (tests/test_triton_gpu.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rcka_kernels.ops import triton_backend

from .utils import require

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def needs_triton():
    require("RCKA_REQUIRE_TRITON", triton_backend.unavailable_reason())


def test_without_triton_the_backend_is_unavailable_with_a_reason():
    code = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
import torch, rcka_kernels as rk
from rcka_kernels.ops import triton_backend
reason = triton_backend.unavailable_reason()
assert reason and "triton" in reason, reason
st = rk.available_backends()["triton"]
assert not st.available and "triton" in st.reason, st
x = torch.randn(10, 3)
assert rk.cka(x, x, backend="auto").item() > 0.99  # falls back to torch
try:
    rk.cka(x, x, backend="triton")
except RuntimeError as e:
    assert "triton" in str(e)
else:
    raise AssertionError("backend='triton' ran without triton")
"""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tf32_setting_is_read_through_the_current_api(needs_triton):
    """After torch.backends.cuda.matmul.fp32_precision = "tf32" (PyTorch's current API),
    reading the legacy allow_tf32 raises; the backend reads the current setting."""
    import torch

    from .utils import fp32_matmul_precision

    with fp32_matmul_precision("tf32", current_api=True):
        assert triton_backend._prec(torch.float32) == "tf32" and triton_backend._prec(torch.float64) == "ieee"
    with fp32_matmul_precision("ieee", current_api=True):
        assert triton_backend._prec(torch.float32) == "ieee"


def test_sizes_beyond_int32_offsets_are_refused_before_any_launch(needs_triton):
    """Meta tensors: the sizes are real, no memory is allocated."""
    import torch

    from rcka_kernels.ops import triton_backend as tb

    wide = torch.empty(1, 1 << 16, 1 << 15, device="meta")  # n p = 2**31
    with pytest.raises(ValueError, match="int32"):
        tb.plan_linear_fwd(wide, wide)
    with pytest.raises(ValueError, match="int32"):
        tb.plan_hsic_bwd(wide, wide, None, None, torch.empty(1, 3, device="meta"), None, None, rbf=False)
    tall = torch.empty(1, 1 << 18, 1, device="meta")  # the RBF workspace 2 n^2 / BM
    gam = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match="workspace"):
        tb.plan_hsic_fwd(tall, tall, gam, gam, rbf=True)
    assert tb.plan_hsic_fwd(tall[:, : 1 << 17], tall[:, : 1 << 17], None, None, rbf=False).grid  # below the limit: planned


def test_triton_older_than_the_checked_minimum_is_refused():
    """triton 3.0 (what torch 2.4 installs) is refused with its version, not half-used; 3.6
    (the GPU check machine's) runs on GPUs, its interpreter is refused."""
    assert triton_backend._version("3.0.0") < triton_backend.MIN_TRITON <= triton_backend._version("3.6.0")
    assert triton_backend._version("3.6.0") < triton_backend.MIN_TRITON_INTERPRETER <= triton_backend._version("3.8.0")
    assert triton_backend._version("3.10.0+git1234") == (3, 10) and triton_backend._version("4.0rc1") == (4, 0)
