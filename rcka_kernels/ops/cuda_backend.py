"""The CUDA C++ backend (csrc/, built into ``rcka_kernels._rcka_cuda``).

Each function implements one entry of the backend contract
(``rcka_kernels/ops/_contract.py``; ``torch_backend.py`` is the executable
spec). This layer checks the tensors (CUDA device, one device, shapes, dtype,
contiguity), allocates outputs and workspaces with PyTorch's allocator, and
passes raw pointers, sizes, element strides, the device index and the current
stream to the compiled library, which checks sizes and strides again before it
launches. Per-tile partial sums (float64) come back in a workspace and are
reduced here in float64; as the contract says, RBF sums leave the diagonal out.

Kernels (csrc/pair_kernels.cuh):
- groups of at most ``SMALL_ROWS`` rows (PCKA's many small problems): one
  thread block per group walks all tiles of its Gram matrices on chip and
  writes the final statistics;
- larger groups: one block per 64 x 64 tile (32 x 32 for float64) of the upper
  triangle of the Gram, tensor cores (wmma) for float16/bfloat16, a SIMT tile
  for float32/float64; the backward recomputes tiles, one block per row block
  walking every column block and adding only into its own rows (no atomics:
  the gradient is the same from run to run);
- linear statistics: Gram tiles in sample space, or tiles of X^T Y, X^T X,
  Y^T Y in feature space when p + q <= n. Their backward is two or three
  matrix products, done with torch.matmul (``torch_backend.linear_stats_backward``).

Launch errors raise RuntimeError naming the kernel; with ``RCKA_CUDA_SYNC=1``
every launch is followed by a stream synchronisation, so that a fault inside a
kernel is reported with its name too (for debugging; it costs the overlap).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _cuda
from . import torch_backend

Tensor = torch.Tensor

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def unavailable_reason() -> Optional[str]:
    """Why this backend cannot run on this machine (None when it can)."""
    return _cuda.reason()


compute_dtype = torch_backend.compute_dtype


# ----------------------------------------------------------------------------- checks and views


def _check_operands(fn: str, same_cols: bool, device_types: Tuple[str, ...], **tensors: Tensor) -> None:
    (n0, t0), *_ = tensors.items()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cuda backend {fn}: {name} must be a tensor, got {type(t).__name__}")
        if t.device.type not in device_types:
            raise ValueError(f"cuda backend {fn}: {name} must be a CUDA tensor, got {t.device}")
        if t.device != t0.device:
            raise ValueError(f"cuda backend {fn}: {name} is on {t.device} but {n0} is on {t0.device}")
        if t.dim() != 3:
            raise ValueError(f"cuda backend {fn}: {name} must be (G, n, features), got shape {tuple(t.shape)}")
        if t.dtype not in _CODES:
            raise TypeError(f"cuda backend {fn}: {name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
        if t.dtype != t0.dtype:
            raise TypeError(f"cuda backend {fn}: {name} is {t.dtype} but {n0} is {t0.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"cuda backend {fn}: {name} must be contiguous")
        if t.shape[0] != t0.shape[0]:
            raise ValueError(f"cuda backend {fn}: {name} has {t.shape[0]} groups but {n0} has {t0.shape[0]}")
        if same_cols and t.shape[2] != t0.shape[2]:
            raise ValueError(f"cuda backend {fn}: {name} has {t.shape[2]} features but {n0} has {t0.shape[2]}")


def _vector(fn: str, name: str, t: Tensor, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """t as a contiguous tensor of `shape` and `dtype` on `device` (a scalar broadcasts)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"cuda backend {fn}: {name} must be a tensor")
    if t.device != device:
        raise ValueError(f"cuda backend {fn}: {name} is on {t.device}, the inputs are on {device}")
    if t.numel() == 1 and len(shape) == 1:
        t = t.reshape(1).expand(shape)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"cuda backend {fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t.to(dtype).contiguous()


def _rows(t: Tensor) -> tuple:
    """Matrix view (csrc/api.h) of the rows of a contiguous (G, n, p) tensor."""
    g, n, p = t.shape
    return (t.data_ptr(), 0, n, n, p, n * p, 0, p, 1)


def _stacked(x: Tensor, y: Tensor) -> tuple:
    """Rows of Z = [X; Y] per group, read from x (G, n, p) and y (G, m, p) in place."""
    _, n, p = x.shape
    m = y.shape[1]
    return (x.data_ptr(), y.data_ptr(), n, n + m, p, n * p, m * p, p, 1)


def _cols(t: Tensor) -> tuple:
    """Matrix view of the columns of a contiguous (G, n, p) tensor: rows = features, depth = samples."""
    g, n, p = t.shape
    return (t.data_ptr(), 0, p, p, n, n * p, 0, 1, p)


def _launch_ctx(t: Tensor) -> Tuple[int, int]:
    dev = t.device
    if dev.type != "cuda":  # the CPU emulation: device 0, no stream
        return 0, 0
    return dev.index if dev.index is not None else torch.cuda.current_device(), torch.cuda.current_stream(dev).cuda_stream


def _empty_inputs(*ts: Tensor) -> bool:
    return any(t.numel() == 0 for t in ts)


# ----------------------------------------------------------------------------- the contract


class Kernels:
    """The backend contract on one CUDA library.

    ``Kernels()`` runs the compiled ``rcka_kernels._rcka_cuda`` on CUDA tensors (the
    module-level functions below are its methods). ``Kernels(lib, device_types)`` runs a
    stand-in with the same entry points on tensors of ``device_types``: the tests'
    CPU emulation of the kernels (tests/build/cuda_host/emu.h) is ``Kernels(emulation, ("cpu",))``,
    selected with ``rcka_kernels._dispatch.use_kernels``."""

    def __init__(self, lib=None, device_types: Tuple[str, ...] = ("cuda",)):
        self.library, self.device_types = lib, tuple(device_types)

    def _lib(self):
        return _cuda.library() if self.library is None else self.library

    # ------------------------------------------------------------------------- linear

    def linear_stats(self, x: Tensor, y: Tensor) -> Tensor:
        _check_operands("linear_stats", False, self.device_types, x=x, y=y)
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"cuda backend linear_stats: x has {x.shape[1]} rows but y has {y.shape[1]}")
        if _empty_inputs(x, y):
            return torch_backend.linear_stats(x, y)
        lib, code = self._lib(), _CODES[x.dtype]
        g, n, p = x.shape
        q = y.shape[2]
        device, stream = _launch_ctx(x)
        _, _, tri, small = lib.plan(code, n)
        if small or not torch_backend.use_feature_space(n, p, q):
            # sample space: sum over tiles of the Grams K = X X^T, L = Y Y^T
            if small:
                s = torch.empty(g, 3, dtype=torch.float64, device=x.device)
            else:
                s = torch.empty(g, tri, 3, dtype=torch.float64, device=x.device)
            lib.pair_forward(lib.HSIC_LINEAR, code, g, _rows(x), _rows(y), 0, 0, s.data_ptr(), 0, 0, device, stream)
            return s if small else s.sum(1)
        out = []
        for a, b, sym in ((x, y, False), (x, x, True), (y, y, True)):
            _, _, nt = lib.cross_plan(code, a.shape[2], b.shape[2], sym)
            ws = torch.empty(g, nt, dtype=torch.float64, device=x.device)
            lib.cross_sq(code, g, _cols(a), _cols(b), sym, ws.data_ptr(), device, stream)
            out.append(ws.sum(1))
        return torch.stack(out, -1)

    def linear_stats_backward(self, x: Tensor, y: Tensor, g: Tensor) -> Tuple[Tensor, Tensor]:
        """Matrix products only (torch.matmul on the GPU): shared with the torch backend."""
        _check_operands("linear_stats_backward", False, self.device_types, x=x, y=y)
        _vector("linear_stats_backward", "g", g, (x.shape[0], 3), torch.float64, x.device)
        return torch_backend.linear_stats_backward(x, y, g)

    # ------------------------------------------------------------------------- rbf HSIC statistics

    def rbf_stats(self, x: Tensor, y: Tensor, gx: Tensor, gy: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        fn = "rbf_stats"
        _check_operands(fn, False, self.device_types, x=x, y=y)
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"cuda backend {fn}: x has {x.shape[1]} rows but y has {y.shape[1]}")
        if _empty_inputs(x, y):
            return torch_backend.rbf_stats(x, y, gx, gy)
        lib, code, cd = self._lib(), _CODES[x.dtype], compute_dtype(x.dtype)
        g, n, _ = x.shape
        gx = _vector(fn, "gamma_x", gx, (g,), cd, x.device)
        gy = _vector(fn, "gamma_y", gy, (g,), cd, x.device)
        device, stream = _launch_ctx(x)
        _, tiles, tri, small = lib.plan(code, n)
        if small:
            s = torch.empty(g, 3, dtype=torch.float64, device=x.device)
            rx = torch.empty(g, n, dtype=cd, device=x.device)
            ry = torch.empty(g, n, dtype=cd, device=x.device)
            lib.pair_forward(lib.HSIC_RBF, code, g, _rows(x), _rows(y), gx.data_ptr(), gy.data_ptr(), s.data_ptr(), rx.data_ptr(),
                             ry.data_ptr(), device, stream)
            return s, rx, ry
        ws = torch.empty(g, tri, 3, dtype=torch.float64, device=x.device)
        wr = torch.empty(2, g, tiles, n, dtype=cd, device=x.device)  # every (slot, row) is written once
        lib.pair_forward(lib.HSIC_RBF, code, g, _rows(x), _rows(y), gx.data_ptr(), gy.data_ptr(), ws.data_ptr(), wr[0].data_ptr(),
                         wr[1].data_ptr(), device, stream)
        # one sum per side: two views of one tensor would alias the op's outputs, which
        # torch.library forbids (no float64 copy of the workspace either way)
        rx, ry = (wr[i].sum(1, dtype=torch.float64).to(cd) for i in range(2))
        return ws.sum(1), rx, ry

    def rbf_stats_backward(self, x: Tensor, y: Tensor, gx: Tensor, gy: Tensor, gs: Tensor, grx: Tensor,
                           gry: Tensor) -> Tuple[Tensor, Tensor]:
        fn = "rbf_stats_backward"
        _check_operands(fn, False, self.device_types, x=x, y=y)
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"cuda backend {fn}: x has {x.shape[1]} rows but y has {y.shape[1]}")
        if _empty_inputs(x, y):
            return torch_backend.rbf_stats_backward(x, y, gx, gy, gs, grx, gry)
        lib, code, cd = self._lib(), _CODES[x.dtype], compute_dtype(x.dtype)
        g, n, _ = x.shape
        gx = _vector(fn, "gamma_x", gx, (g,), cd, x.device)
        gy = _vector(fn, "gamma_y", gy, (g,), cd, x.device)
        gs = _vector(fn, "gS", gs, (g, 3), torch.float64, x.device)
        grx = _vector(fn, "grx", grx, (g, n), cd, x.device)
        gry = _vector(fn, "gry", gry, (g, n), cd, x.device)
        dx = torch.zeros(x.shape, dtype=cd, device=x.device)
        dy = torch.zeros(y.shape, dtype=cd, device=x.device)
        device, stream = _launch_ctx(x)
        lib.pair_backward(
            lib.HSIC_RBF, code, g, _rows(x), _rows(y), gx.data_ptr(), gy.data_ptr(), gs.data_ptr(),
            grx.data_ptr(), gry.data_ptr(), dx.data_ptr(), dy.data_ptr(), device, stream,
        )
        return dx.to(x.dtype), dy.to(y.dtype)

    # ------------------------------------------------------------------------- rbf MMD sums

    def rbf_mmd_sums(self, x: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        fn = "rbf_mmd_sums"
        _check_operands(fn, True, self.device_types, x=x, y=y)
        if _empty_inputs(x, y):
            return torch_backend.rbf_mmd_sums(x, y, gamma)
        lib, code, cd = self._lib(), _CODES[x.dtype], compute_dtype(x.dtype)
        g, n, _ = x.shape
        m = y.shape[1]
        gamma = _vector(fn, "gamma", gamma, (g,), cd, x.device)
        device, stream = _launch_ctx(x)
        _, _, tri, small = lib.plan(code, n + m)
        if small:
            s = torch.empty(g, 3, dtype=torch.float64, device=x.device)
        else:
            s = torch.empty(g, tri, 3, dtype=torch.float64, device=x.device)
        lib.pair_forward(lib.MMD_RBF, code, g, _stacked(x, y), (), gamma.data_ptr(), 0, s.data_ptr(), 0, 0, device, stream)
        s = s if small else s.sum(1)
        # the kernel sums the whole K_ZZ: its cross blocks hold sum K_XY twice (a scalar:
        # no host-to-device copy, which CUDA-graph capture forbids)
        s[:, 2] *= 0.5
        return s

    def rbf_mmd_sums_backward(self, x: Tensor, y: Tensor, gamma: Tensor, gs: Tensor) -> Tuple[Tensor, Tensor]:
        fn = "rbf_mmd_sums_backward"
        _check_operands(fn, True, self.device_types, x=x, y=y)
        if _empty_inputs(x, y):
            return torch_backend.rbf_mmd_sums_backward(x, y, gamma, gs)
        lib, code, cd = self._lib(), _CODES[x.dtype], compute_dtype(x.dtype)
        g = x.shape[0]
        gamma = _vector(fn, "gamma", gamma, (g,), cd, x.device)
        gs = _vector(fn, "gS", gs, (g, 3), torch.float64, x.device)
        dx = torch.zeros(x.shape, dtype=cd, device=x.device)
        dy = torch.zeros(y.shape, dtype=cd, device=x.device)
        device, stream = _launch_ctx(x)
        lib.pair_backward(lib.MMD_RBF, code, g, _stacked(x, y), (), gamma.data_ptr(), 0, gs.data_ptr(), 0, 0, dx.data_ptr(), dy.data_ptr(),
                          device, stream)
        return dx.to(x.dtype), dy.to(y.dtype)


_COMPILED = Kernels()
linear_stats = _COMPILED.linear_stats
linear_stats_backward = _COMPILED.linear_stats_backward
rbf_stats = _COMPILED.rbf_stats
rbf_stats_backward = _COMPILED.rbf_stats_backward
rbf_mmd_sums = _COMPILED.rbf_mmd_sums
rbf_mmd_sums_backward = _COMPILED.rbf_mmd_sums_backward
