"""Argument checks and the precision policy shared by every public function.

Shape, dtype and device checks read only metadata. NaN/Inf inputs: see
``Config.check_finite``; the check is skipped while torch.compile traces.

Precision policy: two floating inputs of different dtypes are computed as if both
were their common (wider) dtype (``promote``), and inside ``torch.autocast`` every
public function and loss runs with autocast off on its inputs' device
(``autocast_off``): the inputs are used as they come and the library's own rules
(half-precision inputs, float32 accumulation) set the dtype of every product.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._dispatch import BACKENDS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNELS = ("linear", "rbf")
SIGMA_HEURISTICS = ("median", "mean")


@dataclass
class Config:
    """Library-wide switches.

    ``check_finite``: what a NaN or Inf input does.
      - None (default): raise ``ValueError`` for CPU tensors, where the check is free;
        on a GPU no host synchronisation is made and the result is NaN (NaN/Inf
        input always gives a NaN value, never a finite wrong number).
      - True: raise on every device (one host synchronisation per call on a GPU).
      - False: never check; the result is NaN.
    """

    check_finite: Optional[bool] = None


config = Config()


def _is_compiling() -> bool:
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling())


def autocast_off(fn):
    """``fn`` run with autocast off on the device of its first tensor argument, when any
    autocast is on: autocast would lower the products inside (matrix products, distances)
    to its half dtype, which the library's statistics do not expect. When autocast is off
    (the common case) the cost is one C call. torch.compile traces both branches."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch._C._is_any_autocast_enabled():
            return fn(*args, **kwargs)
        device = "cpu"
        for a in args:
            if isinstance(a, torch.Tensor):
                device = a.device.type
                break
        if not torch.amp.is_autocast_available(device):  # e.g. meta tensors: nothing to turn off
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run


def promote(x, y):
    """(x, y) in their common dtype when both are floating tensors of different dtypes: a
    float16/bfloat16 input with a float32 (or float64) one is computed as if both were the
    wider type (autograd hands each gradient back in its input's own dtype). Anything else
    comes back as it is, for the checks to name."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.dtype == y.dtype:
        return x, y
    if x.dtype not in FLOAT_DTYPES or y.dtype not in FLOAT_DTYPES:
        return x, y
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def check_flag(fn: str, name: str, value) -> None:
    """A True/False option (``debiased``, ``centered``, ...) that is neither."""
    if value is not True and value is not False:
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")


def check_tensor(fn: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim < 2:
        raise ValueError(f"{fn}: {name} must have shape (n, features) or (..., n, features), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {tuple(t.shape)})")


def check_pair(fn: str, x, y, *, same_rows: bool, same_cols: bool, min_rows: int, why: str = "", finite: bool = True) -> None:
    """Checks for a pair of sample matrices x (..., n, p), y (..., m, q).
    ``finite=False`` leaves the NaN/Inf check to the caller (``scan_groups``, ``check_statistics``)."""
    check_tensor(fn, "x", x)
    check_tensor(fn, "y", y)
    if x.device != y.device:
        raise ValueError(f"{fn}: x is on {x.device} and y is on {y.device}; move both to one device")
    if x.dtype != y.dtype:  # the public functions ``promote`` first; a caller that does not must match
        raise TypeError(f"{fn}: x is {x.dtype} and y is {y.dtype}; cast both to one dtype")
    if x.shape[:-2] != y.shape[:-2]:
        raise ValueError(
            f"{fn}: the leading (batch) dims of x and y differ: {tuple(x.shape[:-2])} vs {tuple(y.shape[:-2])}"
        )
    if same_rows and x.shape[-2] != y.shape[-2]:
        raise ValueError(
            f"{fn}: x and y must have the same number of samples (rows), got {x.shape[-2]} and {y.shape[-2]}"
        )
    if same_cols and x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{fn}: x and y must have the same number of features, got {x.shape[-1]} and {y.shape[-1]}")
    for name, t in (("x", x), ("y", y)):
        if t.shape[-2] < min_rows:
            raise ValueError(f"{fn}: {name} has {t.shape[-2]} samples; at least {min_rows} are needed{why}")
    if finite:
        check_finite(fn, x, y)


def plain_pair(x, y, min_rows: int) -> bool:
    """Whether x and y are the common valid case of ``check_pair(same_rows=True)``
    (two float (n, p), (n, q) tensors on one device, n >= min_rows), read from
    metadata in a few attribute lookups; False sends the caller to ``check_pair``."""
    if type(x) is not torch.Tensor or type(y) is not torch.Tensor:
        return False
    sx, sy = x.shape, y.shape
    return (len(sx) == 2 and len(sy) == 2 and sx[0] == sy[0] and sx[0] >= min_rows and sx[1] > 0 and sy[1] > 0
            and x.dtype == y.dtype and x.dtype in FLOAT_DTYPES
            and x.is_cpu == y.is_cpu and x.is_cuda == y.is_cuda and x.get_device() == y.get_device())  # no device objects


def wants_finite_check(device: torch.device, compiling: Optional[bool] = None) -> bool:
    """Whether to read the data for NaN/Inf on this device (see ``Config.check_finite``);
    ``compiling``: whether torch.compile traces, if the caller knows."""
    c = config.check_finite
    if c is False or (c is None and device.type != "cpu"):
        return False
    return not (_is_compiling() if compiling is None else compiling)


def non_finite_error(fn: str) -> ValueError:
    return ValueError(f"{fn}: input contains NaN or Inf (set rcka_kernels.config.check_finite = False to skip this check)")


def _raise_non_finite(fn: str, ok: torch.Tensor) -> None:
    if not wants_finite_check(ok.device):
        return
    if not bool(ok):
        raise non_finite_error(fn)


def check_finite(fn: str, *tensors: torch.Tensor) -> None:
    if not wants_finite_check(tensors[0].device):
        return
    _raise_non_finite(fn, torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def rows_equal(t: torch.Tensor) -> torch.Tensor:
    """Per group of t (G, n, p), whether all its rows are equal (no variation: CKA is 0 there):
    every column's largest value is its smallest (a NaN makes both NaN, and unequal)."""
    return (t.amax(1) == t.amin(1)).all(-1)


def scan_groups(fn: str, *groups: torch.Tensor):
    """The NaN/Inf check of the (G, n, p) group batches, and per group whether all its rows are
    equal (``rows_equal``). Returns the flags."""
    check_finite(fn, *groups)
    return [rows_equal(t) for t in groups]


def check_statistics(fn: str, stats: torch.Tensor, *inputs: torch.Tensor) -> None:
    """The NaN/Inf check of an op that reads its inputs once, read off float64 statistics of them
    (a few values: HSIC of its Grams) that a NaN or Inf anywhere in the inputs turns into NaN:
    a sum of the statistics and one host read, where ``check_finite`` reads all the inputs. A NaN
    statistic from finite inputs is an overflow of their dtype, named as such."""
    if math.isfinite(stats.sum().item()):
        return
    check_finite(fn, *inputs)
    raise ValueError(f"{fn}: the inputs' squared distances overflow their dtype; scale the inputs down or pass float64")


def check_kernel(fn: str, kernel: str, sigma) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"{fn}: kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "linear":
        if sigma is not None:
            raise ValueError(f"{fn}: sigma is a bandwidth of the 'rbf' kernel; the linear kernel takes none")
        return
    if sigma is None or isinstance(sigma, torch.Tensor):
        return
    if isinstance(sigma, str):
        if sigma not in SIGMA_HEURISTICS:
            raise ValueError(f"{fn}: sigma must be a positive float, a tensor, or one of {SIGMA_HEURISTICS}, got {sigma!r}")
        return
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"{fn}: sigma must be a positive finite float, got {sigma!r}")


def check_sigma_tensor(fn: str, sigma, batch: torch.Size, device: torch.device) -> None:
    if not isinstance(sigma, torch.Tensor):
        return
    if sigma.device != device and sigma.numel() != 1:
        raise ValueError(f"{fn}: sigma is on {sigma.device} and the inputs on {device}")
    if sigma.numel() not in (1, math.prod(batch)):
        raise ValueError(f"{fn}: sigma must have 1 or {math.prod(batch)} values (one per group), got {sigma.numel()}")
    if wants_finite_check(sigma.device):
        check_sigma_values(fn, sigma)


def check_sigma_values(fn: str, sigma: torch.Tensor) -> None:
    """A bandwidth tensor's values: positive and finite (reads the data: one host sync)."""
    if not bool((torch.isfinite(sigma) & (sigma > 0)).all()):
        raise ValueError(f"{fn}: sigma must be positive and finite")


def check_options(fn: str, kernel: str, sigma, debiased, backend: str) -> None:
    """The options a loss module passes to the functions, checked when it is built (a
    mistake in a config then fails at once, not at the first forward pass)."""
    check_kernel(fn, kernel, sigma)
    check_flag(fn, "debiased", debiased)
    if isinstance(sigma, torch.Tensor) and sigma.device.type != "meta":
        if sigma.numel() == 0:
            raise ValueError(f"{fn}: sigma must be positive and finite")
        check_sigma_values(fn, sigma)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{fn}: unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
