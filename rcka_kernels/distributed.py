"""CKA and HSIC over the global batch under torch.distributed.

Each rank holds a shard of the rows: x_r (n_r, p), y_r (n_r, q), with n = sum n_r.
The result equals the single-process value on the concatenated batch.

Linear kernel: communication is independent of the batch size. Two all-reduces:
  1. column sums (p + q) and n      -> global means mu, nu
  2. with locally centred rows xc_i = x_i - mu, yc_i = y_i - nu:
     C_xy = Xc^T Yc (p x q), C_xx = Xc^T Xc (p x p), C_yy = Yc^T Yc (q x q)
     and, for the debiased estimator, three scalars
     e_xy = sum_i |xc_i|^2 |yc_i|^2, e_xx = sum_i |xc_i|^4, e_yy = sum_i |yc_i|^4.
Then with K = Xc Xc^T (centring X shifts K by a_i + a_j + c, which neither HSIC
estimator sees):
  biased   tr(KHLH) = |C_xy|_F^2, HSIC = |C_xy|_F^2 / (n-1)^2
  debiased (Song et al.), K~ = K - diag(K): since Xc^T 1 = 0, K~ 1 = -diag(K), so
     tr(K~L~)        = |C_xy|_F^2 - e_xy
     1^T K~ 1         = -tr(C_xx)
     (K~1).(L~1)      = e_xy
     HSIC_u = [|C_xy|^2 - e_xy + tr(C_xx) tr(C_yy) / ((n-1)(n-2)) - 2 e_xy / (n-2)] / (n (n-3))
Gradients: the all-reduces are an autograd Function whose backward all-reduces
the incoming gradient the same way (p x q, p x p, q x q, 3 scalars; then p + q),
so backward communication is batch-size independent too.

RBF kernel: the features are all-gathered (gradient flows back to the local
shard) and the single-process ``functional.cka`` runs on the global batch.

Gradient convention (as ``torch.distributed.nn``): every rank computes the same
global value, and the backward sums the upstream gradients of all ranks, i.e.
the gradient is that of the sum of the ranks' losses. Under DDP, which averages
parameter gradients over ranks, the parameters receive exactly the gradient of
the global-batch loss. Without an initialised process group (or with one rank)
these functions are the single-process ones.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from . import _validate
from . import functional as F
from .ops.torch_backend import compute_dtype

__all__ = ["is_distributed", "all_reduce_sum", "all_gather", "cka", "hsic", "cka_loss"]

Tensor = torch.Tensor


def is_distributed(group=None) -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        out, i = [], 0
        for t in tensors:
            out.append(flat[i:i + t.numel()].view_as(t).clone())
            i += t.numel()
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        # d(sum over ranks of the losses) / d(input on this rank) = sum over ranks of the output grads
        flat = torch.cat([g.reshape(-1) for g in grads]).contiguous()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
        out, i = [], 0
        for g in grads:
            out.append(flat[i:i + g.numel()].view_as(g))
            i += g.numel()
        return (None, *out)


def all_reduce_sum(*tensors: Tensor, group=None) -> List[Tensor]:
    """Differentiable all-reduce (sum) of tensors of one dtype, in one message."""
    if not is_distributed(group):
        return list(tensors)
    return list(_AllReduceSum.apply(group, *tensors))


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x, sizes):
        ctx.group, ctx.sizes, ctx.rank = group, sizes, dist.get_rank(group)
        m = max(sizes)
        pad = x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))
        buf = [x.new_empty((m,) + tuple(x.shape[1:])) for _ in sizes]
        dist.all_gather(buf, torch.cat([x, pad]).contiguous(), group=group)
        return torch.cat([b[:s] for b, s in zip(buf, sizes)])

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return None, g[start:start + ctx.sizes[ctx.rank]], None


def all_gather(x: Tensor, group=None) -> Tensor:
    """Concatenate every rank's x (n_r, ...) along dim 0 (rank order), with gradient
    flowing back to the local shard. Shards may have different n_r."""
    if not is_distributed(group):
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    return _AllGather.apply(group, x, [int(s.item()) for s in sizes])


def _linear_terms(x: Tensor, y: Tensor, debiased: bool, group):
    """(hxy, hxx, hyy) float64 from globally reduced centred statistics, and
    whether either input is constant over the global batch."""
    cd = torch.float64
    xd, yd = x.to(cd), y.to(cd)
    n_local = torch.tensor([float(x.shape[0])], dtype=cd, device=x.device)
    sx, sy, n_t = all_reduce_sum(xd.sum(0), yd.sum(0), n_local, group=group)
    n = int(n_t.item())
    min_rows = 4 if debiased else 2
    if n < min_rows:
        raise ValueError(f"distributed cka: the global batch has {n} samples; at least {min_rows} are needed")
    xc, yc = xd - sx / n, yd - sy / n
    cxy, cxx, cyy = xc.T @ yc, xc.T @ xc, yc.T @ yc
    if debiased:
        a, b = (xc * xc).sum(-1), (yc * yc).sum(-1)
        e = torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()])
        cxy, cxx, cyy, e = all_reduce_sum(cxy, cxx, cyy, e, group=group)
    else:
        cxy, cxx, cyy = all_reduce_sum(cxy, cxx, cyy, group=group)
    sxy, sxx, syy = (cxy * cxy).sum(), (cxx * cxx).sum(), (cyy * cyy).sum()
    # every row of the global batch identical <=> column max == column min on all ranks
    ext = torch.cat([xd.amax(0), -xd.amin(0), yd.amax(0), -yd.amin(0)]).detach()
    dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=group)
    p, q = x.shape[1], y.shape[1]
    const = (ext[:p] == -ext[p : 2 * p]).all() | (ext[2 * p : 2 * p + q] == -ext[2 * p + q :]).all()
    if not debiased:
        return sxy / (n - 1) ** 2, sxx / (n - 1) ** 2, syy / (n - 1) ** 2, const
    tx, ty = torch.diagonal(cxx).sum(), torch.diagonal(cyy).sum()

    def hu(s, e_ab, ta, tb):
        return (s - e_ab + ta * tb / ((n - 1) * (n - 2)) - 2.0 * e_ab / (n - 2)) / (n * (n - 3))

    return hu(sxy, e[0], tx, ty), hu(sxx, e[1], tx, tx), hu(syy, e[2], ty, ty), const


def _check(fn, x, y):
    if isinstance(x, Tensor) and isinstance(y, Tensor) and (x.ndim != 2 or y.ndim != 2):
        raise ValueError(f"{fn}: x and y must be (n_local, p) and (n_local, q), got {tuple(x.shape)} and {tuple(y.shape)}")
    _validate.check_pair(fn, x, y, same_rows=True, same_cols=False, min_rows=1)


def hsic(x: Tensor, y: Tensor, *, kernel: str = "linear", sigma=None, debiased: bool = False, group=None, backend: str = "auto") -> Tensor:
    """HSIC of the global batch; x (n_local, p), y (n_local, q) are this rank's rows."""
    _check("distributed.hsic", x, y)
    if not is_distributed(group):
        return F.hsic(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)
    if kernel == "linear":
        hxy, _, _, const = _linear_terms(x, y, debiased, group)
        return torch.where(const, torch.zeros_like(hxy), hxy).to(compute_dtype(x.dtype))
    return F.hsic(all_gather(x, group), all_gather(y, group), kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)


def cka(x: Tensor, y: Tensor, *, kernel: str = "linear", sigma=None, debiased: bool = False, group=None, backend: str = "auto") -> Tensor:
    """CKA of the global batch; x (n_local, p), y (n_local, q) are this rank's rows.

    Returns the same scalar on every rank. Linear: batch-size independent
    communication of sufficient statistics; RBF: all-gather of the features
    (the "median"/"mean" bandwidth is then that of the global batch).
    Degenerate cases as ``functional.cka`` (0 where a self-term is not positive).
    """
    _check("distributed.cka", x, y)
    if not is_distributed(group):
        return F.cka(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)
    if kernel != "linear":
        return F.cka(all_gather(x, group), all_gather(y, group), kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)
    hxy, hxx, hyy, const = _linear_terms(x, y, debiased, group)
    return F._cka_from_terms(hxy, hxx, hyy, const).to(compute_dtype(x.dtype))


def cka_loss(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    """1 - cka(x, y, **kwargs) over the global batch."""
    return 1.0 - cka(x, y, **kwargs)
