"""Guarded access to the native (C++, ATen) linear-alignment op ``rcka_kernels._rcka_native``.

The ops (rcka_kernels/csrc/linear_alignment.cpp) are the torch backend's linear CKA, HSIC
and alignment, and RCKA's two axes in one op, with forward and closed-form backward in C++: the arithmetic of
ops/linear.py without its per-call Python, which costs more than the arithmetic
at the paper's batch sizes. It is built at install time when PyTorch is importable
in the build environment (``pip install --no-build-isolation``), and links against
that torch; without it ops/linear.py runs the same arithmetic in Python.

Importing this module never fails; the library is imported on first use.
``RCKA_NATIVE=0`` turns the op off (the Python path runs instead).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

NOT_BUILT = "not built (PyTorch was not importable at install time: pip install --no-build-isolation; or RCKA_SKIP_NATIVE)"
STATISTICS = {"cka": 0, "hsic": 1}  # the op's statistic argument


@functools.lru_cache(maxsize=None)
def _load():
    """(the op, None) or (None, why it cannot run)."""
    if os.environ.get("RCKA_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "turned off (RCKA_NATIVE=0)"
    try:
        importlib.import_module("rcka_kernels._rcka_native")
    except ModuleNotFoundError as e:
        if e.name in ("rcka_kernels._rcka_native", None):
            return None, NOT_BUILT
        return None, f"failed to load: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - e.g. built against another torch (undefined symbol)
        return None, f"failed to load (built against another PyTorch?): {type(e).__name__}: {e}"
    try:
        ops = torch.ops.rcka_native
        # the overloads' C++ callables (what OpOverload.__call__ calls, one Python frame less)
        return tuple(getattr(o, "_op", o) for o in (ops.linear_alignment.default, ops.axis_pair_alignment.default)), None
    except Exception as e:  # noqa: BLE001 - e.g. a library built from older sources
        return None, f"loaded but an op is not registered: {type(e).__name__}: {e}"


def reason() -> Optional[str]:
    """None when the native op can run, else why not."""
    return _load()[1]


def op():
    """``rcka_native::linear_alignment(x, y, statistic, centered, debiased, check)``, or None."""
    ops = _load()[0]
    return None if ops is None else ops[0]


def pair_op():
    """``rcka_native::axis_pair_alignment(xs, ys, xc, yc, ws, wc, offset, centered, check)``
    (RCKA's sample and class axes in one op), or None."""
    ops = _load()[0]
    return None if ops is None else ops[1]
