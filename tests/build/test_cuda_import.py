"""The compiled CUDA library is optional: importing rcka_kernels never fails,
and a machine without a GPU (or without the library) reports the cuda backend
unavailable with the reason. The library's entry points reject bad arguments
before anything reaches the GPU, so those checks run on any machine."""

import subprocess
import sys
import textwrap

import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import _cuda
from rcka_kernels.ops import cuda_backend

built = _cuda._import()[0] is not None


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_reason_is_consistent_with_dispatch():
    st = rk.available_backends()["cuda"]
    assert st.available == (_cuda.reason() is None)
    if not st.available:
        assert st.reason == _cuda.reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            rk.cka(torch.randn(6, 3), torch.randn(6, 2), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report")
def test_no_gpu_reports_reason():
    why = _cuda.reason()
    assert why is not None and not _cuda.available()
    if built:
        # the library loads (static CUDA runtime) and explains itself
        assert why.startswith(("no GPU", "driver too old")), why
    else:
        assert why == _cuda.NOT_BUILT
    with pytest.raises(RuntimeError, match="unavailable"):
        _cuda.library()


def test_package_imports_without_the_library():
    out = _run(
        """
        import sys
        sys.modules["rcka_kernels._rcka_cuda"] = None  # as if it had not been built
        import torch, rcka_kernels as rk
        st = rk.available_backends()["cuda"]
        print(st.available, st.reason)
        x = torch.randn(8, 3)
        print(float(rk.cka(x, x)))
        """
    )
    first, second = out.splitlines()
    assert first == f"False {_cuda.NOT_BUILT}"
    assert abs(float(second) - 1.0) < 1e-6


def test_package_imports_with_a_broken_library():
    out = _run(
        """
        import importlib.abc, sys
        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "rcka_kernels._rcka_cuda":
                    raise ImportError("undefined symbol: _ZN4rcka9something")
        sys.meta_path.insert(0, Broken())
        import rcka_kernels as rk
        st = rk.available_backends()["cuda"]
        print(st.available, st.reason)
        """
    )
    assert out.startswith("False failed to load: ImportError: undefined symbol"), out


@pytest.mark.parametrize(
    "status,expected",
    [
        ({"driver_version": 0, "runtime_version": 13000, "device_count": 0}, "no GPU (no CUDA driver found)"),
        ({"driver_version": 12040, "runtime_version": 13000, "device_count": 1}, "driver too old"),
        ({"driver_version": 13000, "runtime_version": 13000, "device_count": 0,
          "error": "cudaErrorNoDevice: no CUDA-capable device is detected"}, "no GPU (cudaErrorNoDevice"),
        ({"driver_version": 13000, "runtime_version": 13000, "device_count": 2, "min_compute_capability": 75},
         "GPU compute capability 7.5"),
    ],
)
def test_reason_from_status(status, expected):
    assert _cuda.reason_from_status(status).startswith(expected)


def test_reason_from_status_usable():
    status = {"driver_version": 13000, "runtime_version": 13000, "device_count": 1, "min_compute_capability": 90}
    assert _cuda.reason_from_status(status) is None


def test_wrapper_rejects_cpu_tensors():
    x = torch.randn(1, 6, 3)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_backend.rbf_stats(x, x, torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_backend.rbf_mmd_sums(x, x, torch.ones(1))
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_backend.linear_stats(x, x)


# ----------------------------------------------------------------------------- C++ argument checks

needs_lib = pytest.mark.skipif(not built, reason="CUDA library not built")
P = 256  # a fake, aligned device address: every call below must be rejected before it is used


def rows(n, p, ptr=P):
    return (ptr, 0, n, n, p, n * p, 0, p, 1)


@needs_lib
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dtype=7), "unknown dtype"),
        (dict(mode=5), "unknown mode"),
        (dict(groups=0), "groups"),
        (dict(x=rows(10, 4, 0)), "x is a null pointer"),
        (dict(x=rows(10, 4, P + 2)), "not aligned"),
        (dict(x=(P, 0, 10, 10, 4, 40, 0, 5, 1)), "contiguous"),
        (dict(x=(P, 0, 10, 10, 4, 44, 0, 4, 1)), "contiguous"),
        (dict(x=(P, 0, 10, 10, 4, 40, 0, 4)), "9-tuple"),
        (dict(y=rows(11, 4)), "same number of rows"),
        (dict(s=0), "s is a null pointer"),
        (dict(r0=0), "r0 is a null pointer"),
        (dict(gamma_y=0), "gamma_y is a null pointer"),
    ],
)
def test_pair_forward_checks(kwargs, match):
    lib = _cuda._import()[0]
    args = dict(mode=lib.HSIC_RBF, dtype=lib.F32, groups=2, x=rows(10, 4), y=rows(10, 3), gamma_x=P, gamma_y=P, s=P, r0=P, r1=P,
                device=0, stream=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lib.pair_forward(**args)


@needs_lib
def test_pair_backward_and_cross_checks():
    lib = _cuda._import()[0]
    common = dict(dtype=lib.F32, groups=1, gamma_x=P, gamma_y=P, gs=P, grx=P, gry=P, dx=P, dy=P, device=0, stream=0)
    with pytest.raises(ValueError, match="no backward"):
        lib.pair_backward(mode=lib.HSIC_LINEAR, x=rows(5, 2), y=rows(5, 2), **common)
    with pytest.raises(ValueError, match="two parts"):
        lib.pair_backward(mode=lib.MMD_RBF, x=rows(5, 2), y=(), **common)
    with pytest.raises(ValueError, match="gs is a null pointer"):
        lib.pair_backward(mode=lib.HSIC_RBF, x=rows(5, 2), y=rows(5, 2), **{**common, "gs": 0})
    cols = (P, 0, 4, 4, 10, 40, 0, 1, 4)
    with pytest.raises(ValueError, match="columns of a contiguous"):
        lib.cross_sq(dtype=lib.F16, groups=1, a=rows(10, 4), b=cols, sym=False, s=P, device=0, stream=0)
    with pytest.raises(ValueError, match="same number of samples"):
        lib.cross_sq(dtype=lib.F16, groups=1, a=cols, b=(P, 0, 4, 4, 11, 44, 0, 1, 4), sym=False, s=P, device=0, stream=0)


@needs_lib
def test_plan_matches_tile_arithmetic():
    lib = _cuda._import()[0]
    for code, edge in ((lib.F32, 64), (lib.F16, 64), (lib.BF16, 64), (lib.F64, 32)):
        for n in (1, 63, 64, 65, 128, 129, 1000):
            e, t, tri, small = lib.plan(code, n)
            assert e == edge and (t - 1) * e < n <= t * e and tri == t * (t + 1) // 2
            assert small == (n <= lib.SMALL_ROWS)
