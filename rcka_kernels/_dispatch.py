"""Backend registry and selection.

``backend="auto"`` picks the fastest available backend for the tensors' device;
naming a backend explicitly either uses it or raises with the reason it is
unavailable. When "auto" has to fall back from the backend it prefers, it warns
once per (backend, reason).

Nothing here touches a GPU or imports a compiled module at import time; the
checks run on first use.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

BACKENDS = ("reference", "torch", "triton", "cuda")


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: Optional[str] = None

    def __bool__(self) -> bool:
        return self.available


def _module_loader(module: str) -> Callable[[], object]:
    return lambda: importlib.import_module(module, __package__)


# name -> loader of the kernels object; a module may define unavailable_reason() -> str | None
_LOADERS: Dict[str, Callable[[], object]] = {
    "torch": _module_loader(".ops.torch_backend"),
    "triton": _module_loader(".ops.triton_backend"),
    "cuda": _module_loader(".ops.cuda_backend"),
}
_loaded: Dict[str, object] = {}
_load_errors: Dict[str, str] = {}
_warned = set()
# name -> (kernels, device types) set by use_kernels() for a block
_substitutes: Dict[str, Tuple[object, Tuple[str, ...]]] = {}


@contextlib.contextmanager
def use_kernels(name: str, kernels: object, device_types: Tuple[str, ...]) -> Iterator[object]:
    """Within the block, backend ``name`` runs ``kernels`` (an object with the functions of
    ops/_contract.py), available for tensors of ``device_types`` whatever this machine has.

    This is how the tests run a backend's kernels in an emulator: the CUDA C++ compiled for
    the CPU is ``use_kernels("cuda", cuda_backend.Kernels(emulation, ("cpu",)), ("cpu",))``
    (tests/conftest.py). Blocks nest; on exit the backend is what it was before. Not
    thread-safe: the choice is global to the process while the block runs."""
    if name not in _LOADERS:
        raise ValueError(f"use_kernels: unknown backend {name!r}; choose from {tuple(_LOADERS)}")
    previous = _substitutes.get(name)
    _substitutes[name] = (kernels, tuple(device_types))
    try:
        yield kernels
    finally:
        if previous is None:
            del _substitutes[name]
        else:
            _substitutes[name] = previous


@torch.compiler.assume_constant_result
def _load_error(name: str) -> str:
    """Load backend ``name`` once: "" when it loaded, else why it cannot. Run for real
    even while torch.compile traces the caller (an import cannot be traced), its
    result taken as a constant."""
    if name in _loaded:
        return ""
    if name not in _load_errors:
        try:
            mod = _LOADERS[name]()
            reason = getattr(mod, "unavailable_reason", lambda: None)()
        except Exception as e:  # an optional backend that cannot load is unavailable, not an error
            mod, reason = None, f"{type(e).__name__}: {e}"
        if reason:
            _load_errors[name] = reason
        else:
            _loaded[name] = mod
    return _load_errors.get(name, "")


def _load(name: str):
    return None if _load_error(name) else _loaded[name]


def _device_reason(name: str, device: Optional[torch.device]) -> Optional[str]:
    if name in ("reference", "torch"):
        return None
    if device is None:
        if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        if not torch.cuda.is_available():
            return "no CUDA device is visible to PyTorch"
        return None
    if device.type == "cuda":
        return None
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    hint = " (or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)" if name == "triton" else ""
    return f"runs on CUDA tensors only, got a {device.type} tensor{hint}"


def status(name: str, device: Optional[torch.device] = None) -> BackendStatus:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {('auto',) + BACKENDS}")
    if name in _substitutes:
        types = _substitutes[name][1]
        if device is None or device.type in types:
            return BackendStatus(True)
        return BackendStatus(False, f"runs on {' or '.join(types)} tensors here (use_kernels), got a {device.type} tensor")
    if name in _LOADERS and _load(name) is None:
        return BackendStatus(False, _load_errors[name])
    reason = _device_reason(name, device)
    return BackendStatus(reason is None, reason)


def available_backends(device=None) -> Dict[str, BackendStatus]:
    """Name -> BackendStatus(available, reason) for every backend.

    ``device`` (a torch.device or string) asks about tensors on that device; by
    default the question is whether the backend can run on this machine at all."""
    dev = torch.device(device) if device is not None else None
    return {name: status(name, dev) for name in BACKENDS}


# a debugging switch, read once: "auto" picks Triton's interpreter on the CPU
_AUTO_INTERPRETER = os.environ.get("RCKA_AUTO_TRITON") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def _preferred(device: torch.device, kernel: str):
    if device.type == "cuda":
        # linear statistics are GEMMs: cuBLAS (the torch backend) until a committed GPU
        # measurement shows a compiled backend faster (benchmarks/bench_efficient.py)
        return () if kernel == "linear" else ("triton", "cuda")
    return ("triton",) if _AUTO_INTERPRETER else ()


def resolve(backend: str, device: torch.device, kernel: str = "rbf") -> str:
    """The backend to run for tensors on ``device`` and statistics of ``kernel``."""
    if backend == "auto" and kernel == "linear" and not _AUTO_INTERPRETER:
        return "torch"  # the common case, without a lookup (see _preferred)
    if backend != "auto":
        st = status(backend, device)
        if not st.available:
            raise RuntimeError(f"backend {backend!r} is unavailable: {st.reason}")
        return backend
    for name in _preferred(device, kernel):
        st = status(name, device)
        if st.available:
            return name
        key = (name, st.reason)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"rcka_kernels: backend {name!r} unavailable ({st.reason}); using 'torch'", RuntimeWarning, stacklevel=3)
    return "torch"


def native_status() -> BackendStatus:
    """Whether the torch backend's native ops (rcka_kernels/csrc/) are built and load,
    and why not; without them the same arithmetic runs in Python (slower per call)."""
    from . import _native

    why = _native.reason()
    return BackendStatus(why is None, why)


def provides(name: str, function: str) -> bool:
    """Whether backend ``name`` implements an optional contract member (the "Optional" part of ops/_contract.py)."""
    return hasattr(kernels(name), function)


def kernels(name: str):
    """The kernels object of a backend (see ops/_contract.py)."""
    if name in _substitutes:
        return _substitutes[name][0]
    mod = _load(name)
    if mod is None:
        raise RuntimeError(f"backend {name!r} is unavailable: {_load_errors.get(name)}")
    return mod
