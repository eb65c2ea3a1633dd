"""CKA and HSIC over the global batch under torch.distributed.

Each rank holds a shard of the rows: x_r (n_r, p), y_r (n_r, q), with n = sum n_r.
The result equals the single-process value on the concatenated batch.

Linear kernel: the side the single-process op would take for the global batch
(``torch_backend.use_feature_space``). Sample space (wide features, small global
batch): the rows are all-gathered (n x (p + q), gradient flowing back to the local
shard) and the single-process op runs on the global batch, with its value, accuracy
and memory. Feature space: communication is independent of the batch size, and the
value and its closed-form backward are those of the single-process op (ops/linear.py):
  1. SUM all-reduce of the column sums (p + q) -> global means
  2. MAX all-reduce of the column extremes (a global batch of identical rows gives
     0) and of max |x - mean|, max |y - mean| -> the rows are rescaled into [-1, 1]
  3. SUM all-reduce of X^T Y (p x q), X^T X (p x p), Y^T Y (q x q) of the prepared
     local rows and, debiased, the 2 x 2 Gram and the sums of the diagonals
     |x_i|^2, |y_i|^2 (Song et al.'s estimator is a correction of the statistics by
     them, as in a single process).
Backward: one scalar all-reduce (the upstream gradients of all ranks), and,
debiased, one of the gradient's column sums (p + q) for the centring. (Both
sides first exchange the ranks' row counts: one all-gather of a scalar.)

RBF kernel: the features are all-gathered (gradient flows back to the local
shard) and the single-process ``functional.cka`` runs on the global batch.

Gradient convention (as ``torch.distributed.nn``): every rank computes the same
global value, and the backward sums the upstream gradients of all ranks, i.e.
the gradient is that of the sum of the ranks' losses. Under DDP, which averages
parameter gradients over ranks, the parameters receive exactly the gradient of
the global-batch loss. Without an initialised process group (or with one rank)
these functions are the single-process ones.

Second derivatives (a backward with create_graph=True on every rank): the
collectives' backwards are collectives with autograd themselves, and the
feature-space backward then differentiates the gathered single-process op.
"""

from __future__ import annotations

import functools
from typing import List

import torch
import torch.distributed as dist

from . import _validate, estimators
from . import functional as F
from .ops import linear, torch_backend
from .ops.stats import recomputed_grads
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
        # d(sum over ranks of the losses) / d(input on this rank) = sum over ranks of the output grads:
        # the op itself, so that a gradient with a graph (create_graph=True) can be differentiated again
        return (None, *_AllReduceSum.apply(ctx.group, *grads))


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
        (g,) = _AllReduceSum.apply(ctx.group, g)  # differentiable again, as above
        start = sum(ctx.sizes[: ctx.rank])
        return None, g[start:start + ctx.sizes[ctx.rank]], None


def _row_counts(x: Tensor, group) -> List[int]:
    """Every rank's number of rows, in rank order."""
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    return [int(s.item()) for s in sizes]


def all_gather(x: Tensor, group=None) -> Tensor:
    """Concatenate every rank's x (n_r, ...) along dim 0 (rank order), with gradient
    flowing back to the local shard. Shards may have different n_r."""
    if not is_distributed(group):
        return x
    return _AllGather.apply(group, x, _row_counts(x, group))


class _GlobalLinear(torch.autograd.Function):
    """Linear CKA or HSIC of the global batch from all-reduced statistics, with the
    single-process op's value and closed-form backward (``ops/linear.py``):
    prepared (centred, rescaled) local rows, feature-space products summed over
    ranks, and a backward that needs only the upstream scalar from the other
    ranks (plus, debiased, the column sums of the gradient for the centring)."""

    @staticmethod
    def forward(ctx, x, y, statistic: str, debiased: bool, group, sizes):
        n = sum(sizes)
        cd = compute_dtype(x.dtype)
        u, w = x.to(cd), y.to(cd)
        p, q = u.shape[1], w.shape[1]
        sums = torch.cat([u.sum(0), w.sum(0)])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        u, w = u - sums[:p] / n, w - sums[p:] / n
        # one MAX all-reduce: column extremes (every row of the global batch identical
        # <=> column max == min everywhere) and the scales max |u|, max |w|
        ext = torch.cat([x.amax(0).to(cd), -x.amin(0).to(cd), y.amax(0).to(cd), -y.amin(0).to(cd),
                         u.abs().amax()[None], w.abs().amax()[None]])
        dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=group)
        const = (ext[:p] == -ext[p : 2 * p]).all() | (ext[2 * p : 2 * p + q] == -ext[2 * p + q : -2]).all()
        scale = ext[-2:]
        inv = linear.safe_reciprocal(scale)
        u, w = u.mul_(inv[0]), w.mul_(inv[1])
        a, cx, cy = u.mT @ w, u.mT @ u, w.mT @ w
        parts = [a, cx, cy]
        d = None
        if debiased:
            d = torch.stack([torch.linalg.vector_norm(u, dim=-1), torch.linalg.vector_norm(w, dim=-1)]).square_()  # (2, n_local)
            parts += [d @ d.mT, d.sum(-1)]
        flat = torch.cat([t.reshape(-1) for t in parts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        a, cx, cy, *rest = (t.view(1, *m.shape) for t, m in zip(flat.split([m.numel() for m in parts]), parts))
        dd, t = (rest[0], rest[1].view(1, 2, 1)) if debiased else (None, None)
        sq = torch.stack([torch.linalg.vector_norm(m) for m in (a, cx, cy)]).square_()
        s = torch_backend.gram_of_grams(sq[:1], sq[1:2], sq[2:])
        if debiased:
            s = linear.debias(s, dd, t, n)
        kk, ll, r, v = linear.value(s, scale.view(2, 1, 1), statistic, n, debiased)
        r = r.masked_fill(const, 0.0)  # a degenerate global batch: 0, with zero gradient
        v = v.masked_fill(const, 0.0)
        ctx.statistic, ctx.debiased, ctx.group, ctx.sizes, ctx.n, ctx.dtype = statistic, debiased, group, sizes, n, x.dtype
        linear.save(ctx, x, y, u, w, inv, kk, ll, r, v, None if d is None else d[None], t, a, cx, cy)
        return v.view(())

    @staticmethod
    def backward(ctx, gv):
        x, y, u, w, inv, kk, ll, r, v, d, t, a, cx, cy = linear.saved(ctx)
        need = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the gathered single-process op instead
            fn = functools.partial(_gathered, statistic=ctx.statistic, debiased=ctx.debiased, group=ctx.group,
                                   sizes=ctx.sizes, backend="torch")
            return (*recomputed_grads((x, y), gv, need, fn), None, None, None, None)
        gv = gv.reshape(1, 1, 1).to(v.dtype).contiguous()
        dist.all_reduce(gv, op=dist.ReduceOp.SUM, group=ctx.group)  # the sum of the ranks' losses
        g = linear.coefficients(gv, kk, ll, r, v, ctx.statistic, need, d is not None)
        grads = list(torch_backend.linear_stats_backward(u[None], w[None], g, (a, cx, cy), need))
        if d is not None:
            linear.add_diagonal_grad(grads, (u, w), g, d, t, ctx.n)
            # through the centring on the global mean: minus the global column means of the gradient
            cols = torch.cat([gi.sum(1).reshape(-1) if gi is not None else ui.new_zeros(ui.shape[1]) for gi, ui in zip(grads, (u, w))])
            dist.all_reduce(cols, op=dist.ReduceOp.SUM, group=ctx.group)
            for i, c in enumerate(cols.split([u.shape[1], w.shape[1]])):
                if grads[i] is not None:
                    grads[i].sub_(c / ctx.n)
        out = [None if gi is None else (gi[0] * inv[i]).to(ctx.dtype) for i, gi in enumerate(grads)]
        return out[0], out[1], None, None, None, None


def _gathered(x: Tensor, y: Tensor, statistic: str, debiased: bool, group, sizes, backend: str) -> Tensor:
    """The single-process op on the all-gathered rows (gradient flowing back to the local shard)."""
    xg, yg = _AllGather.apply(group, x, sizes), _AllGather.apply(group, y, sizes)
    return (F.cka if statistic == "cka" else F.hsic)(xg, yg, debiased=debiased, backend=backend)


def _linear(fn: str, x: Tensor, y: Tensor, statistic: str, debiased: bool, group, backend: str) -> Tensor:
    """Linear CKA or HSIC of the global batch, on the side the single-process op would take."""
    sizes = _row_counts(x, group)
    n = sum(sizes)
    m, why = estimators.min_rows(debiased)
    if n < m:
        raise ValueError(f"{fn}: the global batch has {n} samples; at least {m} are needed{why}")
    if torch_backend.use_feature_space(n, x.shape[1], y.shape[1]):
        return _GlobalLinear.apply(x, y, statistic, debiased, group, sizes)
    return _gathered(x, y, statistic, debiased, group, sizes, backend)


def _check(fn, x, y):
    """(x, y) checked and promoted to their common float dtype (the library's precision rule)."""
    if isinstance(x, Tensor) and isinstance(y, Tensor) and (x.ndim != 2 or y.ndim != 2):
        raise ValueError(f"{fn}: x and y must be (n_local, p) and (n_local, q), got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = _validate.promote(x, y)
    _validate.check_pair(fn, x, y, same_rows=True, same_cols=False, min_rows=1)
    return x, y


@_validate.autocast_off
def hsic(x: Tensor, y: Tensor, *, kernel: str = "linear", sigma=None, debiased: bool = False, group=None, backend: str = "auto") -> Tensor:
    """HSIC of the global batch; x (n_local, p), y (n_local, q) are this rank's rows."""
    x, y = _check("distributed.hsic", x, y)
    if not is_distributed(group):
        return F.hsic(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)
    if kernel == "linear":
        return _linear("distributed.hsic", x, y, "hsic", debiased, group, backend)
    return F.hsic(all_gather(x, group), all_gather(y, group), kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)


@_validate.autocast_off
def cka(x: Tensor, y: Tensor, *, kernel: str = "linear", sigma=None, debiased: bool = False, group=None, backend: str = "auto") -> Tensor:
    """CKA of the global batch; x (n_local, p), y (n_local, q) are this rank's rows.

    Returns the same scalar on every rank. Linear: the rows all-gathered where the
    single-process op works in sample space (wide features), else batch-size
    independent communication of sufficient statistics; RBF: all-gather of the
    features (the "median"/"mean" bandwidth is then that of the global batch).
    Degenerate cases as ``functional.cka`` (0 where a self-term is not positive).
    """
    x, y = _check("distributed.cka", x, y)
    if not is_distributed(group):
        return F.cka(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)
    if kernel != "linear":
        return F.cka(all_gather(x, group), all_gather(y, group), kernel=kernel, sigma=sigma, debiased=debiased, backend=backend)
    return _linear("distributed.cka", x, y, "cka", debiased, group, backend)


def cka_loss(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    """1 - cka(x, y, **kwargs) over the global batch."""
    return 1.0 - cka(x, y, **kwargs)
