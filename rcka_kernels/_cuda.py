"""Guarded access to the compiled CUDA library ``rcka_kernels._rcka_cuda``.

Importing this module never fails and never touches a GPU: the compiled module
is imported, and the device queried, on the first call to :func:`library`,
:func:`available` or :func:`reason`. The library links the CUDA runtime
statically, so it loads on machines without a GPU and says why it cannot run.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

NOT_BUILT = "not built (no nvcc at install time / RCKA_SKIP_CUDA)"
MIN_COMPUTE_CAPABILITY = 80  # the kernels use bf16 wmma and are built for sm_80 and sm_90


@functools.lru_cache(maxsize=None)
def _import():
    """(module, None) or (None, why it could not be imported)."""
    try:
        return importlib.import_module("rcka_kernels._rcka_cuda"), None
    except ModuleNotFoundError as e:
        if e.name in ("rcka_kernels._rcka_cuda", None):
            return None, NOT_BUILT
        return None, f"failed to load: {type(e).__name__}: {e}"
    except Exception as e:  # a broken build (bad symbol, wrong Python) must not break the package
        return None, f"failed to load: {type(e).__name__}: {e}"


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def reason_from_status(st: dict) -> Optional[str]:
    """Why a library with this device_status() cannot run, or None."""
    drv, rt = st.get("driver_version", 0), st.get("runtime_version", 0)
    if drv == 0:
        return "no GPU (no CUDA driver found)"
    if rt and drv < rt:
        return f"driver too old (the driver supports CUDA {_version(drv)}, the library was built with CUDA {_version(rt)})"
    if st.get("device_count", 0) == 0:
        err = st.get("error") or ""
        return "no GPU" + (f" ({err})" if err else "")
    cc = st.get("min_compute_capability", 0)
    if cc and cc < MIN_COMPUTE_CAPABILITY:
        return f"GPU compute capability {cc // 10}.{cc % 10} is below {MIN_COMPUTE_CAPABILITY // 10}.0 (the kernels need sm_80+)"
    return None


@functools.lru_cache(maxsize=None)
def reason() -> Optional[str]:
    """None when the CUDA library is built and a usable GPU is present, else why not."""
    mod, why = _import()
    if mod is None:
        return why
    try:
        st = dict(mod.device_status())
    except Exception as e:  # noqa: BLE001
        return f"device query failed: {type(e).__name__}: {e}"
    return reason_from_status(st)


def available() -> bool:
    return reason() is None


def library():
    """The compiled module; raises RuntimeError with the reason when it cannot run."""
    why = reason()
    if why is not None:
        raise RuntimeError(f"rcka_kernels CUDA library unavailable: {why}")
    return _import()[0]
