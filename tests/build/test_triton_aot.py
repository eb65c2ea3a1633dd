"""Every Triton kernel in every launch configuration compiles for sm_80 and sm_90
with no GPU, fits in shared memory, spills no registers, and uses the tensor-core
instructions it is meant to (wgmma on sm_90 / mma on sm_80 for fp16 and bf16).
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces the kernels; AOT compilation needs the real JIT functions", allow_module_level=True)
from rcka_kernels.ops import triton_backend as tb  # noqa: E402

from ..utils import require  # noqa: E402

require("RCKA_REQUIRE_TRITON", tb.unavailable_reason(), module=True)

from ._triton_aot import SHARED_LIMIT, compile_launch, resource_usage, signature  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# sizes that reach every branch of the block-size tables: n, m rows, p, q features
# (16, 32, 64-row tiles; 32, 64, 128-column backward chunks; row strides that
# are and are not multiples of 16)
SIZES = [(10, 12, 3, 5), (20, 30, 32, 16), (1000, 900, 64, 48), (1000, 900, 192, 128), (1000, 900, 300, 20)]


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _add(out: dict, launch) -> None:
    """Record one launch under its configuration (kernel, signature, constants, warps, stages)."""
    sig, consts = signature(launch)
    key = (launch.kernel.__name__, tuple(sig.items()), tuple((k, str(v)) for k, v in consts.items()),
           launch.num_warps, launch.num_stages)
    out.setdefault(key, launch)


def _launches():
    out = {}
    for dtype in DTYPES:
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                for n, m, p, q in SIZES:
                    x, y, z = _meta(1, n, p, dtype=dtype), _meta(1, n, q, dtype=dtype), _meta(1, m, p, dtype=dtype)
                    g1, gs, r = _meta(1, dtype=cd), _meta(1, 3, dtype=cd), _meta(1, n, dtype=cd)
                    plans = [
                        tb.plan_hsic_fwd(x, y, g1, g1, rbf=True),
                        tb.plan_hsic_fwd(x, y, None, None, rbf=False),
                        tb.plan_hsic_bwd(x, y, g1, g1, gs, r, r, rbf=True),
                        tb.plan_hsic_bwd(x, y, None, None, gs, None, None, rbf=False),
                        tb.plan_mmd_fwd(x, z, g1),
                        tb.plan_mmd_bwd(x, z, g1, gs),
                        tb.plan_linear_fwd(x, y),
                    ]
                    for launch in plans:
                        _add(out, launch)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
    # the fused centered_gram: a few configurations (64-row fp32 tiles with and
    # without tf32, both kernels and modes; small n; fp16 and fp64)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for dtype, n, p, tf32, rbf, deb in [
            (torch.float32, 1000, 64, False, True, False), (torch.float32, 1000, 64, False, True, True),
            (torch.float32, 1000, 64, False, False, False), (torch.float32, 1000, 300, True, False, True),
            (torch.float32, 20, 3, False, True, True), (torch.float16, 1000, 64, False, True, False),
            (torch.float64, 1000, 64, False, True, True),
        ]:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            cd = torch.float64 if dtype == torch.float64 else torch.float32
            launch = tb.plan_centered_gram(_meta(1, n, p, dtype=dtype), _meta(1, dtype=cd), _meta(1, n, dtype=cd),
                                           _meta(1, dtype=cd), rbf, deb)
            _add(out, launch)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return out


LAUNCHES = _launches()


def _id(key):
    name, sig, consts, warps, stages = key
    dt = dict(sig)["x_ptr"][1:]
    c = ",".join(f"{k}={v}" for k, v in consts if k not in ("ACC",))
    return f"{name.replace('_kernel', '')}-{dt}-{c}-w{warps}s{stages}"


@pytest.mark.parametrize("cc", [90, 80])
@pytest.mark.parametrize("key", list(LAUNCHES), ids=[_id(k) for k in LAUNCHES])
def test_compiles_fits_and_uses_tensor_cores(key, cc):
    launch = LAUNCHES[key]
    compiled = compile_launch(launch, cc)
    assert compiled.metadata.shared <= SHARED_LIMIT[cc]
    ptx = compiled.asm["ptx"]
    use = resource_usage(compiled)
    assert use["stack"] == 0 and use["local"] == 0, f"register spills: {use['report']}"
    dtype = dict(key[1])["x_ptr"]
    consts = launch.consts
    block = consts.get("BM", consts.get("BF"))
    tensor_cores = dtype in ("*fp16", "*bf16", "*fp64") or consts["PREC"] == "tf32"
    if tensor_cores:
        if cc == 90 and dtype != "*fp64" and block >= 64:
            assert "wgmma" in ptx  # a warpgroup MMA needs 64 rows
        else:
            assert "mma.sync" in ptx
