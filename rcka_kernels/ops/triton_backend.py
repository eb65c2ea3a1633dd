"""The fused Triton backend: the contract of ops/_contract.py on Triton kernels.

Layers: kernels (``triton_kernels.py``) -> launch plans (``plan_*`` here: block
sizes, grid, workspaces; pure host code, also used by the ahead-of-time compile
test with "meta" tensors) -> the contract functions (run the plan, reduce the
per-tile partial sums in float64 with torch) -> ``ops/stats.py`` custom ops.

What runs where (all statistics in one launch for a batch of G groups):
- RBF HSIC statistics: ``hsic_stats_fwd_kernel`` over the upper-triangle tiles
  (i <= j) of the two Grams; ``hsic_stats_bwd_kernel`` recomputes K, L tiles per
  output row block (FlashAttention-style), nothing n x n is stored.
- linear statistics: in feature space (p + q <= n, the same rule as the torch
  backend) ``linear_fro_fwd_kernel`` forms tiles of X^T Y, X^T X, Y^T Y over the
  sample axis and squares them in registers; in sample space (p + q > n) the
  HSIC kernels above run with the linear kernel. The feature-space backward is
  three batched GEMMs through ``torch.matmul`` (cuBLAS already runs these at the
  GEMM roofline; a Triton GEMM would only match it); the sample-space backward
  is ``hsic_stats_bwd_kernel`` (no n x n Gram, unlike the torch backend).
- RBF MMD sums: ``mmd_sums_fwd_kernel`` over a table of XX, YY (upper) and XY
  tiles, ``mmd_sums_bwd_kernel`` per output row block of x and y.

Precision: accumulation in fp32 (fp64 for fp64 inputs, with fp64 ``tl.dot``).
fp32 Gram dots use ``input_precision="ieee"`` unless PyTorch allows TF32 matmuls
(``fp32_precision = "tf32"``, or the legacy ``allow_tf32``). In the backward, the product
of the fp32 tile weights with fp16/bf16 rows runs in three tf32 passes (tf32x3):
the output is rowsum(W) x_i - W X, which cancels, so W X must see the fp32
weights the row sums were taken from (a single tf32 pass rounded W alone, and the
difference lost the half-precision output's accuracy). Those programs take half
the output columns (DC), so the split operands fit in registers.

For benchmarks and profiling: the contract functions below are the launchers
(``rbf_stats(x, y, gamma_x, gamma_y)`` etc., on (G, n, p) CUDA tensors); to time
one kernel alone, build its ``plan_*`` once and call ``Launch.run()``.

Limits: per group, n * p (and the RBF workspace, 2 n^2 / BM, and a centred Gram,
n^2) must stay below 2**31 elements (in-group offsets are int32; group offsets
are int64): larger sizes raise ValueError before any launch.

Memory: inputs and outputs, plus for RBF HSIC a workspace of row-sum partials
of 2 G n ceil(n / BM) floats (each tile's row and column sums; it is what makes
the symmetric tiling deterministic without atomics), 1/BM of an n x n Gram.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from . import torch_backend
from .torch_backend import compute_dtype, use_feature_space

Tensor = torch.Tensor

# The oldest triton the kernels run with on a GPU: 3.6 (the GPU check's machine has it).
# Older ones are refused, not half-used: 3.0 (what torch 2.4 installs) has another compile
# API and fails in its interpreter. With 3.6 the half-precision RBF backward spills
# registers when compiled for sm_80/sm_90 (slower, not wrong; 3.8 and 3.9 do not), and
# its interpreter fails under numpy 2 (a loop bounded by a scalar argument), so the
# interpreter (TRITON_INTERPRET=1, CPU tests) asks for 3.8.
MIN_TRITON = (3, 6)
MIN_TRITON_INTERPRETER = (3, 8)


def _version(v: str) -> Tuple[int, ...]:
    """(major, minor) of a version string: "3.10.0+git1" -> (3, 10), "4.0rc1" -> (4, 0)."""
    return tuple(int(re.match(r"\d*", piece).group() or 0) for piece in v.split("+")[0].split(".")[:2])


try:  # the module must import without triton so the dispatcher can say why it is unavailable
    import triton

    if _version(triton.__version__) < MIN_TRITON:
        raise ImportError(f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, "
                          "the oldest these kernels are checked with")

    from . import triton_kernels as _k

    _IMPORT_ERROR: Optional[str] = None
except Exception as e:  # pragma: no cover - depends on the environment
    triton = None
    _k = None
    _IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"


def interpreter_reason() -> Optional[str]:
    """Why Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) cannot run these kernels
    here, or None; the answer does not depend on whether this process set TRITON_INTERPRET."""
    if _IMPORT_ERROR is None and _version(triton.__version__) < MIN_TRITON_INTERPRETER:
        return (f"triton {triton.__version__}'s interpreter fails under numpy 2; TRITON_INTERPRET=1 needs triton "
                f">= {'.'.join(map(str, MIN_TRITON_INTERPRETER))} (GPUs run with >= {'.'.join(map(str, MIN_TRITON))})")
    return _IMPORT_ERROR


def unavailable_reason() -> Optional[str]:
    """Why this backend cannot run in this process (None when it can)."""
    return interpreter_reason() if os.environ.get("TRITON_INTERPRET") == "1" else _IMPORT_ERROR


# ----------------------------------------------------------------------------- launch plans


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args.values(), **consts, **options())``."""

    kernel: object
    grid: Tuple[int, ...]
    args: Dict[str, object]
    consts: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 2
    extra: Dict[str, Tensor] = field(default_factory=dict)  # workspaces the caller reduces

    def options(self) -> Dict[str, int]:
        # fp fusion (FMA contraction) named explicitly: triton 3.9 warns that its
        # default flips in 3.10, and these kernels are checked with it on
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=MAXNREG, enable_fp_fusion=True)
        return opts

    def run(self) -> None:
        """Launch on the tensors' device and its current stream (Triton launches on the
        current device: with tensors on cuda:1 and cuda:0 current it would run on the
        wrong GPU)."""
        device = next(v.device for v in self.args.values() if isinstance(v, Tensor))
        if device.type != "cuda":  # the interpreter, on CPU tensors
            self.kernel[self.grid](*self.args.values(), **self.consts, **self.options())
            return
        with torch.cuda.device(device):
            self.kernel[self.grid](*self.args.values(), **self.consts, **self.options())


def _acc(dtype: torch.dtype):
    return _k.tl.float64 if dtype == torch.float64 else _k.tl.float32


def tf32_matmul() -> bool:
    """Whether PyTorch lets fp32 matmuls use TF32: the current setting
    (``torch.backends.cuda.matmul.fp32_precision``, then the global
    ``torch.backends.fp32_precision``) where it is set, else the legacy
    ``allow_tf32`` (reading which after the new API was used raises)."""
    m = torch.backends.cuda.matmul
    for prec in (getattr(m, "fp32_precision", None), getattr(torch.backends, "fp32_precision", None)):
        if prec not in (None, "none"):
            return prec == "tf32"
    return bool(m.allow_tf32)


def _prec(dtype: torch.dtype) -> str:
    """input_precision of the Gram dots: tf32 only for fp32 inputs with TF32 matmuls allowed."""
    if dtype == torch.float32 and tf32_matmul():
        return "tf32"
    return "ieee"


def _prec2(dtype: torch.dtype) -> str:
    """input_precision of the backward's fp32 weight @ rows product (see module doc):
    for half inputs three tf32 passes, so the weights it sees are the fp32 ones the
    row sums were taken from (fp32 inputs follow PyTorch's TF32 setting)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32x3"
    return _prec(dtype)


def _p2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _clamp_p2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _p2(v)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Block sizes. Reasoned and checked by compiling for sm_80/sm_90 with no GPU
# (tests/build/test_triton_aot.py: shared memory, register spills, wgmma/mma), not yet
# timed on a GPU (none was available), so not autotuned either: an autotuner
# would pick by timing, and the workspace shape depends on BM. Tiles of 64 rows with 8 warps keep the
# two fp32 K/L accumulators plus the exp epilogue under 255 registers; groups of
# n <= 64 (PCKA's tiny groups) get one program each with the smallest
# power-of-two tile >= n; fp64 (gradchecks) uses 32. Rows whose stride is not a
# multiple of 16 elements load element by element (no vectorisation), so they
# get half the feature step to stay clear of spills.
def _max_block(dtype: torch.dtype) -> int:
    """Largest tile side: 64 (32 for fp64); env RCKA_TRITON_MAX_BLOCK (a power of
    two >= 16) lowers it, so tests reach multi-tile paths at interpreter-sized n."""
    hi = 32 if dtype == torch.float64 else 64
    return min(hi, _clamp_p2(int(os.environ.get("RCKA_TRITON_MAX_BLOCK", hi)), 16, hi))


def _bk(dtype: torch.dtype, aligned: bool = True) -> int:
    """Features per dot step: 128 bytes of an aligned row per load, half that otherwise."""
    bk = {torch.float64: 16, torch.float32: 32}.get(dtype, 64)
    return bk if aligned or dtype == torch.float64 else bk // 2


def _warps(block: int) -> int:
    return 8 if block >= 64 else (4 if block >= 32 else 2)


def hsic_fwd_config(n: int, dtype: torch.dtype, aligned: bool = True) -> Tuple[int, int, int, int]:
    """(BM, BK, num_warps, num_stages) of hsic_stats_fwd_kernel and mmd_sums_fwd_kernel."""
    bm = _clamp_p2(n, 16, _max_block(dtype))
    return bm, _bk(dtype, aligned), _warps(bm), 2


def hsic_bwd_config(n: int, d: int, dtype: torch.dtype, aligned: bool = True) -> Tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, DC, num_warps, num_stages) of the backward kernels; d = widest output.

    A program owns BM output rows and DC output columns and recomputes the K, L
    tiles it needs, so every extra column chunk repeats the Gram work: wide
    features get wide chunks (128) on 32-row blocks; up to 64 features, one chunk
    on 64-row blocks."""
    hi = _max_block(dtype)
    bm = _clamp_p2(n, 16, hi)
    bn = _clamp_p2(n, 16, min(hi, 32))
    dc = _clamp_p2(d, 16, min(hi, 64))
    if d > 64 and dtype != torch.float64:
        bm, dc = min(bm, 32), 128
    if _prec2(dtype) == "tf32x3":  # three tf32 passes hold each operand twice: half the columns
        dc = min(dc, 32 if bm > 32 else 64)
    # fp32 dots without tf32 run on FMAs with both operands in registers: half the step
    bk = _bk(dtype, aligned and dtype != torch.float32)
    return bm, bn, bk, dc, (4 if bm <= 16 else 8), 2


def linear_fwd_config(n: int, p: int, q: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """(BF, BK, num_warps, num_stages) of linear_fro_fwd_kernel (BK runs over samples:
    consecutive rows of one feature column are a row stride apart, never vectorised)."""
    hi = _max_block(dtype)
    bf = _clamp_p2(max(p, q), 16, hi)
    return bf, _clamp_p2(n, 16, max(16, min(hi, _bk(dtype)))), _warps(bf), 2


# Every launch may use 255 registers a thread: left to itself, ptxas caps
# registers to fit more blocks per SM (128 for 8 warps) and then spills a few
# bytes (seen with triton 3.6 and 3.9, sm_80 and sm_90). Occupancy is not what
# these kernels live on: each program walks long dot loops over its tiles.
MAXNREG = 255


def _aligned(*ts: Tensor) -> bool:
    return all(t.stride(1) % 16 == 0 for t in ts)


def _build_table(parts: Tuple[Tuple[int, int, int, bool], ...], device: torch.device) -> Tensor:
    """int32 (3, T) rows kind, i, j; each part (kind, rows, cols, upper-triangle only).
    Built on the device itself: no host-to-device copy (illegal in CUDA-graph capture)."""
    out = []
    for kind, a, b, upper in parts:
        if upper:
            ij = torch.triu_indices(a, a, device=device)
        else:
            ij = torch.stack(torch.meshgrid(torch.arange(a, device=device), torch.arange(b, device=device), indexing="ij")).reshape(2, -1)
        out.append(torch.cat([torch.full((1, ij.shape[1]), kind, dtype=torch.long, device=device), ij]))
    return torch.cat(out, 1).to(torch.int32).contiguous()


_tables: Dict[Tuple, Tensor] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _table(parts, device: torch.device) -> Tensor:
    key = (parts, str(device))
    t = _tables.get(key)
    if t is None:
        t = _build_table(parts, device)
        if not _capturing(device):  # a table made inside a capture lives in that graph's memory pool
            if len(_tables) > 256:
                _tables.clear()
            _tables[key] = t
    return t


_INT32 = 1 << 31


def _check_int32(fn: str, *tensors: Tensor, workspace: int = 0) -> None:
    """The kernels address a group's rows (and workspace) with int32 offsets: refuse
    sizes beyond 2**31 elements per group with a clear error instead of overflowing."""
    for t in tensors:
        span = (t.shape[1] - 1) * t.stride(1) + t.shape[2]
        if span >= _INT32:
            raise ValueError(f"triton backend {fn}: a group of shape {tuple(t.shape[1:])} spans {span} elements, beyond the "
                             f"2**31 its int32 offsets address; use backend='torch' or smaller groups")
    if workspace >= _INT32:
        raise ValueError(f"triton backend {fn}: n = {tensors[0].shape[1]} needs a workspace of {workspace} elements per group, "
                         f"beyond the 2**31 its int32 offsets address; use backend='torch'")


def _sqnorms(t: Tensor) -> Tensor:
    """(G, n) squared row norms in the compute dtype (fp32 products summed in fp32)."""
    c = t.to(compute_dtype(t.dtype))
    return torch.linalg.vecdot(c, c, dim=-1)


def plan_hsic_fwd(x: Tensor, y: Tensor, gx: Optional[Tensor], gy: Optional[Tensor], rbf: bool) -> Launch:
    g, n, p = x.shape
    q = y.shape[2]
    cd = compute_dtype(x.dtype)
    bm, bk, warps, stages = hsic_fwd_config(n, x.dtype, _aligned(x, y))
    nb = _cdiv(n, bm)
    _check_int32("hsic forward", x, y, workspace=2 * nb * nb * bm if rbf else 0)
    tab = _table(((0, nb, nb, True),), x.device)
    t = tab.shape[1]
    s = torch.empty(g, t, 3, dtype=cd, device=x.device)
    w = torch.empty(g, 2, nb, nb, bm, dtype=cd, device=x.device) if rbf else s
    gx = gx if rbf else s
    gy = gy if rbf else s
    nx, ny = (_sqnorms(x), _sqnorms(y)) if rbf else (s, s)
    args = dict(x_ptr=x, y_ptr=y, nx_ptr=nx, ny_ptr=ny, gx_ptr=gx, gy_ptr=gy, ti_ptr=tab[1], tj_ptr=tab[2], s_ptr=s, w_ptr=w,
                N=n, P=p, Q=q, sxg=x.stride(0), sxn=x.stride(1), syg=y.stride(0), syn=y.stride(1), T=t, NB=nb)
    consts = dict(IS_RBF=rbf, BM=bm, BK=bk, ACC=_acc(x.dtype), PREC=_prec(x.dtype))
    return Launch(_k.hsic_stats_fwd_kernel, (t * g,), args, consts, warps, stages, dict(s=s, w=w))


def plan_hsic_bwd(x, y, gx, gy, gs, grx, gry, rbf: bool) -> Launch:
    g, n, p = x.shape
    q = y.shape[2]
    bm, bn, bk, dc, warps, stages = hsic_bwd_config(n, max(p, q), x.dtype, _aligned(x, y))
    _check_int32("hsic backward", x, y)
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    nrb = _cdiv(n, bm)
    if not rbf:
        gx = gy = grx = gry = gs
    nx, ny = (_sqnorms(x), _sqnorms(y)) if rbf else (gs, gs)
    args = dict(x_ptr=x, y_ptr=y, nx_ptr=nx, ny_ptr=ny, gx_ptr=gx, gy_ptr=gy, gs_ptr=gs, grx_ptr=grx, gry_ptr=gry, dx_ptr=dx, dy_ptr=dy,
                N=n, P=p, Q=q, sxg=x.stride(0), sxn=x.stride(1), syg=y.stride(0), syn=y.stride(1),
                sdxg=dx.stride(0), sdxn=dx.stride(1), sdyg=dy.stride(0), sdyn=dy.stride(1), NRB=nrb)
    consts = dict(IS_RBF=rbf, BM=bm, BN=bn, BK=bk, DC=dc, ACC=_acc(x.dtype), PREC=_prec(x.dtype), PREC2=_prec2(x.dtype))
    grid = (nrb * g, _cdiv(max(p, q), dc))
    return Launch(_k.hsic_stats_bwd_kernel, grid, args, consts, warps, stages, dict(dx=dx, dy=dy))


def plan_mmd_fwd(x: Tensor, y: Tensor, gamma: Tensor) -> Launch:
    g, n, d = x.shape
    m = y.shape[1]
    cd = compute_dtype(x.dtype)
    bm, bk, warps, stages = hsic_fwd_config(max(n, m), x.dtype, _aligned(x, y))
    _check_int32("mmd forward", x, y)
    nbx, nby = _cdiv(n, bm), _cdiv(m, bm)
    tab = _table(((0, nbx, nbx, True), (1, nby, nby, True), (2, nbx, nby, False)), x.device)
    t = tab.shape[1]
    s = torch.empty(g, t, dtype=cd, device=x.device)
    args = dict(x_ptr=x, y_ptr=y, nx_ptr=_sqnorms(x), ny_ptr=_sqnorms(y), gam_ptr=gamma, tab_ptr=tab, s_ptr=s, N=n, M=m, D=d,
                sxg=x.stride(0), sxn=x.stride(1), syg=y.stride(0), syn=y.stride(1), T=t)
    consts = dict(BM=bm, BK=bk, ACC=_acc(x.dtype), PREC=_prec(x.dtype))
    seg = (nbx * (nbx + 1) // 2, nby * (nby + 1) // 2, nbx * nby)
    return Launch(_k.mmd_sums_fwd_kernel, (t * g,), args, consts, warps, stages, dict(s=s, seg=seg))


def plan_mmd_bwd(x: Tensor, y: Tensor, gamma: Tensor, gs: Tensor) -> Launch:
    g, n, d = x.shape
    m = y.shape[1]
    bm, bn, bk, dc, warps, stages = hsic_bwd_config(max(n, m), d, x.dtype, _aligned(x, y))
    _check_int32("mmd backward", x, y)
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    nbx, nby = _cdiv(n, bm), _cdiv(m, bm)
    args = dict(x_ptr=x, y_ptr=y, nx_ptr=_sqnorms(x), ny_ptr=_sqnorms(y), gam_ptr=gamma, gs_ptr=gs, dx_ptr=dx, dy_ptr=dy, N=n, M=m, D=d,
                sxg=x.stride(0), sxn=x.stride(1), syg=y.stride(0), syn=y.stride(1),
                sdxg=dx.stride(0), sdxn=dx.stride(1), sdyg=dy.stride(0), sdyn=dy.stride(1), NBX=nbx, NRB=nbx + nby)
    consts = dict(BM=bm, BN=bn, BK=bk, DC=dc, ACC=_acc(x.dtype), PREC=_prec(x.dtype), PREC2=_prec2(x.dtype))
    grid = ((nbx + nby) * g, _cdiv(d, dc))
    return Launch(_k.mmd_sums_bwd_kernel, grid, args, consts, warps, stages, dict(dx=dx, dy=dy))


def plan_linear_fwd(x: Tensor, y: Tensor) -> Launch:
    g, n, p = x.shape
    q = y.shape[2]
    cd = compute_dtype(x.dtype)
    bf, bk, warps, stages = linear_fwd_config(n, p, q, x.dtype)
    _check_int32("linear forward", x, y)
    nbp, nbq = _cdiv(p, bf), _cdiv(q, bf)
    tab = _table(((0, nbp, nbq, False), (1, nbp, nbp, True), (2, nbq, nbq, True)), x.device)
    t = tab.shape[1]
    s = torch.empty(g, t, dtype=cd, device=x.device)
    args = dict(x_ptr=x, y_ptr=y, tab_ptr=tab, s_ptr=s, N=n, P=p, Q=q,
                sxg=x.stride(0), sxn=x.stride(1), syg=y.stride(0), syn=y.stride(1), T=t)
    consts = dict(BF=bf, BK=bk, ACC=_acc(x.dtype), PREC=_prec(x.dtype))
    seg = (nbp * nbq, nbp * (nbp + 1) // 2, nbq * (nbq + 1) // 2)
    return Launch(_k.linear_fro_fwd_kernel, (t * g,), args, consts, warps, stages, dict(s=s, seg=seg))


def _segment_sums(s: Tensor, seg: Tuple[int, int, int]) -> Tensor:
    return torch.stack([part.sum(1, dtype=torch.float64) for part in torch.split(s, list(seg), dim=1)], -1)


# ----------------------------------------------------------------------------- the contract


def _c(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def linear_stats(x: Tensor, y: Tensor) -> Tensor:
    x, y = _c(x), _c(y)
    n, p, q = x.shape[1], x.shape[2], y.shape[2]
    if use_feature_space(n, p, q):
        launch = plan_linear_fwd(x, y)
        launch.run()
        return _segment_sums(launch.extra["s"], launch.extra["seg"])
    launch = plan_hsic_fwd(x, y, None, None, rbf=False)
    launch.run()
    return launch.extra["s"].sum(1, dtype=torch.float64)


def linear_stats_backward(x: Tensor, y: Tensor, g: Tensor) -> Tuple[Tensor, Tensor]:
    """Feature space: the torch backend's GEMMs (cuBLAS); sample space: the fused
    kernel dx = (2 gxy L + 4 gxx K) X without forming K, L."""
    x, y = _c(x), _c(y)
    n, p, q = x.shape[1], x.shape[2], y.shape[2]
    if use_feature_space(n, p, q):
        return torch_backend.linear_stats_backward(x, y, g)
    launch = plan_hsic_bwd(x, y, None, None, _c(g.to(compute_dtype(x.dtype))), None, None, rbf=False)
    launch.run()
    return launch.extra["dx"], launch.extra["dy"]


def rbf_stats(x: Tensor, y: Tensor, gamma_x: Tensor, gamma_y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    x, y = _c(x), _c(y)
    cd = compute_dtype(x.dtype)
    g, n = x.shape[0], x.shape[1]
    launch = plan_hsic_fwd(x, y, _c(gamma_x.to(cd)), _c(gamma_y.to(cd)), rbf=True)
    launch.run()
    s = launch.extra["s"].sum(1, dtype=torch.float64)
    w = launch.extra["w"]
    r = w.sum(3, dtype=torch.float64).reshape(g, 2, w.shape[2] * w.shape[4])[:, :, :n]
    # two fresh tensors: custom-op outputs may not alias each other
    return s, r[:, 0].to(cd, copy=True), r[:, 1].to(cd, copy=True)


def rbf_stats_backward(x, y, gamma_x, gamma_y, gs, grx, gry) -> Tuple[Tensor, Tensor]:
    x, y = _c(x), _c(y)
    cd = compute_dtype(x.dtype)
    launch = plan_hsic_bwd(x, y, _c(gamma_x.to(cd)), _c(gamma_y.to(cd)), _c(gs.to(cd)), _c(grx.to(cd)), _c(gry.to(cd)), rbf=True)
    launch.run()
    return launch.extra["dx"], launch.extra["dy"]


def rbf_mmd_sums(x: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
    x, y = _c(x), _c(y)
    launch = plan_mmd_fwd(x, y, _c(gamma.to(compute_dtype(x.dtype))))
    launch.run()
    return _segment_sums(launch.extra["s"], launch.extra["seg"])


def rbf_mmd_sums_backward(x: Tensor, y: Tensor, gamma: Tensor, gs: Tensor) -> Tuple[Tensor, Tensor]:
    x, y = _c(x), _c(y)
    cd = compute_dtype(x.dtype)
    launch = plan_mmd_bwd(x, y, _c(gamma.to(cd)), _c(gs.to(cd)))
    launch.run()
    return launch.extra["dx"], launch.extra["dy"]


# ----------------------------------------------------------------------------- centred Gram (n x n output)


def plan_centered_gram(x: Tensor, gamma: Optional[Tensor], a: Tensor, c: Tensor, rbf: bool, debiased: bool) -> Launch:
    """One pass over (group, tile) pairs writing every tile of the centred Gram;
    a (G, n) and c (G,) are the pass-1 statistics (see centered_gram_kernel)."""
    g, n, p = x.shape
    cd = compute_dtype(x.dtype)
    bm, bk, warps, stages = hsic_fwd_config(n, x.dtype, _aligned(x))
    _check_int32("centered_gram", x, workspace=n * n)
    nb = _cdiv(n, bm)
    out = torch.empty(g, n, n, dtype=cd, device=x.device)
    nx = _sqnorms(x) if rbf else a
    gam = gamma if rbf else c
    args = dict(x_ptr=x, nx_ptr=nx, gam_ptr=gam, a_ptr=a, c_ptr=c, o_ptr=out, N=n, P=p,
                sxg=x.stride(0), sxn=x.stride(1), sog=out.stride(0), son=out.stride(1), T=nb * nb, NB=nb)
    consts = dict(IS_RBF=rbf, DEBIASED=debiased, BM=bm, BK=bk, ACC=_acc(x.dtype), PREC=_prec(x.dtype))
    return Launch(_k.centered_gram_kernel, (nb * nb * g,), args, consts, warps, stages, dict(out=out))


def centered_gram(x: Tensor, kernel: str, gamma: Tensor, debiased: bool) -> Tensor:
    """(G, n, n) centred Gram in the compute dtype: biased H K H, or the U-centred K
    (zero diagonal). Pass 1 gets the row sums (linear: X (X^T 1) by torch; RBF: the
    rbf_stats kernel), pass 2 writes each tile of the result once.

    x is centred first (for RBF, as every RBF path here; for linear, H X X^T H =
    H K H and U-centring ignores row/column offsets, so the result is the same
    with less cancellation)."""
    cd = compute_dtype(x.dtype)
    n = x.shape[1]
    xc = x.to(cd)
    xc = _c((xc - xc.mean(1, keepdim=True)).to(x.dtype))
    rbf = kernel == "rbf"
    if rbf:
        gam = _c(gamma.to(cd).reshape(-1))
        _, off, _ = rbf_stats(xc, xc, gam, gam)
        off = off.double()
        full = off + 1.0
    else:
        gam = None
        xd = xc.double()
        full = xd @ xd.sum(1).unsqueeze(-1)
        full = full[..., 0]
        off = full - (xd * xd).sum(-1)
    if debiased:
        a = off / (n - 2)
        c = a.sum(-1) / (n - 1)
    else:
        a = full / n
        c = a.mean(-1)
    launch = plan_centered_gram(xc, gam, _c(a.to(cd)), _c(c.to(cd)), rbf, debiased)
    launch.run()
    return launch.extra["out"]
