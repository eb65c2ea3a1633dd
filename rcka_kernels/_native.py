"""Guarded access to the native (C++, ATen) ops.

The ops (rcka_kernels/csrc/native.cpp) are the torch backend's linear CKA, HSIC
and alignment, RCKA's two axes in one op, and its small RBF CKA and HSIC (the Grams formed
whole), with forward and closed-form backward in C++: the arithmetic of ops/linear.py and of
ops/stats.py's dense RBF path without their per-call Python, which costs more than the
arithmetic at the paper's batch sizes. Where the library comes from, in this order:

1. ``rcka_kernels._rcka_native``, prebuilt at install time when PyTorch was importable in the
   build environment (``pip install --no-build-isolation``);
2. otherwise (a plain ``pip install``, whose isolated build has no torch, or a prebuilt library
   that does not load, e.g. built against another PyTorch) the C++ source shipped in the package,
   compiled against the installed torch by ``torch.utils.cpp_extension`` at the first call, into a
   cache directory per PyTorch version and Python ABI (``cache_dir()``), so that an upgraded torch
   builds its own copy. One line on stderr says that it is being built.

Where neither works, one RuntimeWarning at the first call says what is lost and how to get it,
and ops/linear.py and ops/stats.py run the same arithmetic in Python. Importing this module never fails and
never compiles. ``RCKA_NATIVE=0`` turns the ops off (the Python path runs, without a warning);
``RCKA_NATIVE_CACHE`` sets the cache directory.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import sys
import sysconfig
import warnings
from typing import Optional

import torch

NOT_BUILT = "not built at install time"
STATISTICS = {"cka": 0, "hsic": 1}  # the linear op's statistic argument
RULES = {"median": 0, "mean": 1, "given": 2}  # the dense RBF op's bandwidth rule argument
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "native.cpp")
NAME = "rcka_native"  # the library built on first use (cpp_extension's name for it and its build directory)
# the flags the install-time build compiles with (setup.py's -O3; Python's CFLAGS carry -DNDEBUG)
FLAGS = ["-O3", "-DNDEBUG"]
HOW_TO_GET_IT = ("To get it: a C++ compiler and ninja on this machine (pip install ninja), and the next first call builds it; "
                 "or install with torch already there: pip install --no-build-isolation rcka-kernels. "
                 "RCKA_NATIVE=0 turns it off without this warning.")


@functools.lru_cache(maxsize=None)
def _load():
    """(the ops, None) or (None, why they cannot run); the first call may compile (``_build``)."""
    if os.environ.get("RCKA_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "turned off (RCKA_NATIVE=0)"
    why = _prebuilt()
    if why is not None:
        failed = _build()
        if failed is not None:
            return _unavailable(f"{why}; {failed}")
    try:
        ops = torch.ops.rcka_native
        # the overloads' C++ callables (what OpOverload.__call__ calls, one Python frame less)
        overloads = (ops.linear_alignment.default, ops.axis_pair_alignment.default, ops.dense_rbf.default)
        return tuple(getattr(o, "_op", o) for o in overloads), None
    except Exception as e:  # noqa: BLE001 - e.g. a prebuilt library from older sources
        return _unavailable(f"loaded but an op is not registered (built from older sources? reinstall): {type(e).__name__}: {e}")


def _unavailable(why: str):
    warnings.warn(f"rcka_kernels: the native ops are unavailable ({why}). The torch backend's linear CKA, HSIC, RCKA "
                  f"and small RBF CKA run the same arithmetic in Python instead, slower per call. {HOW_TO_GET_IT}",
                  RuntimeWarning, stacklevel=4)
    return None, why


def _prebuilt() -> Optional[str]:
    """Import the library built at install time: None, or why it is not there."""
    try:
        importlib.import_module("rcka_kernels._rcka_native")
    except ModuleNotFoundError as e:
        if e.name in ("rcka_kernels._rcka_native", None):
            return NOT_BUILT
        return f"the prebuilt library failed to load: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - e.g. built against another torch (undefined symbol)
        return f"the prebuilt library failed to load (built against another PyTorch?): {type(e).__name__}: {e}"
    return None


def cache_dir() -> str:
    """Where the first-use build lives: ``$RCKA_NATIVE_CACHE``, else ``$TORCH_EXTENSIONS_DIR/rcka_native``,
    else torch's extension cache (~/.cache/torch_extensions/rcka_native), then one folder per PyTorch
    version and Python ABI (the library links against both)."""
    root = os.environ.get("RCKA_NATIVE_CACHE")
    if not root:
        base = os.environ.get("TORCH_EXTENSIONS_DIR")
        if not base:
            from torch.utils.cpp_extension import get_default_build_root

            base = get_default_build_root()
        root = os.path.join(base, NAME)
    abi = os.path.splitext(sysconfig.get_config_var("EXT_SUFFIX") or "")[0].strip(".") or f"py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(root, f"torch-{torch.__version__}-{abi}")


def _build() -> Optional[str]:
    """Compile the shipped source into ``cache_dir()`` (unless built there already) and load it: None, or why not."""
    failed = "building it on first use failed: "
    try:
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - it imports setuptools
        return f"{failed}torch.utils.cpp_extension does not import ({type(e).__name__}: {e}; pip install setuptools)"
    with _tools_on_path() as path:
        compiler = os.environ.get("CXX", "cl" if os.name == "nt" else "c++")
        if shutil.which(compiler, path=path) is None:
            return f"{failed}no C++ compiler ({compiler!r} not found: install g++ or clang, or set CXX)"
        if shutil.which("ninja", path=path) is None:
            return f"{failed}ninja not found (pip install ninja)"
        if _registered():  # by a library loaded earlier in this process: loading another one would abort it
            return None
        try:
            where = cache_dir()
            os.makedirs(where, exist_ok=True)
            with _exclusive(where):
                library = os.path.join(where, NAME + (".pyd" if os.name == "nt" else ".so"))
                if not os.path.exists(library) or os.path.getmtime(library) < os.path.getmtime(SOURCE):
                    print(f"rcka-kernels: building the native ops for torch {torch.__version__} in {where} "
                          "(once per PyTorch version)", file=sys.stderr, flush=True)
                cpp_extension.load(NAME, [SOURCE], extra_cflags=FLAGS, build_directory=where, is_python_module=False)
        except Exception as e:  # noqa: BLE001 - a compile error, an unwritable cache, a library that does not load
            return failed + _summary(e)
    return None


def _registered() -> bool:
    try:
        torch.ops.rcka_native.linear_alignment
    except (AttributeError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def _tools_on_path():
    """PATH while building, with the interpreter's scripts directory appended: pip puts ``ninja``
    there, which is not on PATH when a virtual environment is used without activating it."""
    old = os.environ.get("PATH", "")
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in old.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(p for p in (old, scripts) if p)
    try:
        yield os.environ["PATH"]
    finally:
        os.environ["PATH"] = old


@contextlib.contextmanager
def _exclusive(where: str):
    """One build per cache directory at a time, across processes. cpp_extension's own lock file
    (``lock``) stays behind when a build is killed, and every later build then waits on it forever;
    an flock ends with its process, so a ``lock`` found while holding it is such a leftover."""
    try:
        import fcntl
    except ImportError:  # Windows: cpp_extension's lock file alone
        yield
        return
    with open(os.path.join(where, "rcka.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(where, "lock"))
        yield


def _summary(e: Exception) -> str:
    """The exception's first line (without ninja's command line) and the compiler's first error."""
    lines = str(e).splitlines() or [""]
    head = lines[0].split(": [", 1)[0][:300]
    error = next((s.strip() for s in lines[1:] if "error" in s.lower()), None)
    return f"{type(e).__name__}: {head}" + (f" ... {error[:300]}" if error else "")


def reason() -> Optional[str]:
    """None when the native op can run, else why not (the first call may build it)."""
    return _load()[1]


_python_only = False


@contextlib.contextmanager
def python_path():
    """Inside this context ``op()``, ``pair_op()`` and ``dense_rbf_op()`` give None, so the torch
    backend runs the Python definitions of the ops (ops/linear.py, ops/stats.py) in this process:
    the test suite's "torch-python" environment, and comparisons of the two implementations."""
    global _python_only
    before, _python_only = _python_only, True
    try:
        yield
    finally:
        _python_only = before


def op():
    """``rcka_native::linear_alignment(x, y, statistic, centered, debiased, check)``, or None."""
    ops = None if _python_only else _load()[0]
    return None if ops is None else ops[0]


def pair_op():
    """``rcka_native::axis_pair_alignment(xs, ys, xc, yc, ws, wc, offset, centered, check)``
    (RCKA's sample and class axes in one op), or None."""
    ops = None if _python_only else _load()[0]
    return None if ops is None else ops[1]


def dense_rbf_op():
    """``rcka_native::dense_rbf(x, y, sigma, sigma_value, rule, debiased, cka, check)`` (ops/stats.py's
    dense RBF CKA and HSIC; ``rule`` from RULES), or None."""
    ops = None if _python_only else _load()[0]
    return None if ops is None else ops[2]
