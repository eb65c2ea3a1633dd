"""Ahead-of-time compilation of the Triton backend's launches for a GPU that is
not there: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``.

The launches come from the backend's own ``plan_*`` functions called on "meta"
tensors, so what is compiled here is exactly what the launchers would launch
(kernel, argument dtypes, constexprs, warps, stages) for those sizes.
Runs on triton 3.6 through 3.9 (``ASTSource`` took ``constants`` before it
took ``constexprs``); 3.8 and 3.9 pass these checks, 3.6 spills registers in the
half-precision RBF backward (see triton_backend.MIN_TRITON).
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# usable shared memory per block (opt-in maximum), bytes
SHARED_LIMIT = {80: 166912, 90: 232448}

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64", torch.int32: "*i32"}


def signature(launch):
    """(signature, constexprs) of a backend Launch, in kernel argument order."""
    sig = {}
    for name, v in launch.args.items():
        if isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(v)}")
    for name in launch.consts:
        sig[name] = "constexpr"
    return sig, dict(launch.consts)


def divisibility(launch) -> dict:
    """The JIT's specialisation at launch: pointers (torch allocations are 256-byte
    aligned) and integers that are multiples of 16 are marked divisible by 16,
    which is what lets loads vectorise."""
    attrs = {}
    for i, v in enumerate(launch.args.values()):
        if isinstance(v, torch.Tensor) or (isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0 and v != 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def ast_source(fn, sig, consts, attrs=None):
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return ASTSource(fn=fn, signature=sig, constants=consts, attrs=attrs)  # older triton


def compile_launch(launch, cc: int):
    sig, consts = signature(launch)
    src = ast_source(launch.kernel, sig, consts, divisibility(launch))
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=launch.options())


def _tool(name: str) -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"no {name}: triton's bundled one is missing and none is on PATH")
    return found


def resource_usage(compiled) -> dict:
    """Registers, stack and local memory of the compiled cubin (``cuobjdump -res-usage``).

    Triton kernels keep no local arrays, so a stack frame or local memory means
    ptxas spilled registers."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.cubin"
        f.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", str(f)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert m, out
    reg, stack, shared, local = (int(v) for v in m.groups())
    return {"registers": reg, "stack": stack, "local": local, "report": out}
