"""RBF bandwidth heuristics, computed without an n x n matrix and without host syncs.

``sigma2(x, sigma)`` returns sigma^2 per group, ``(G,)`` in the compute dtype, for
``x`` of shape ``(G, n, p)``. The bandwidth is a statistic of the data that the
backward pass treats as a constant (as Kornblith et al. and most CKA code do).

- "median": the exact median of all n^2 squared distances (diagonal zeros
  included, NumPy's convention: the mean of the two middle values when n^2 is
  even). When a group batch's n x n distances fit one block (``block_elems``) they
  are formed once and the median is a k-th value selection over their strictly-upper
  entries; otherwise it is found by a radix select over the bit patterns of those
  distances (16 bits per pass, 2 passes for float32 and 4 for float64), each pass
  recomputing the distances block by block: memory O(block), no sort of n^2 values. If the median
  is 0 (more than half of all pairs coincide) the "mean" value is used instead.
- "mean": the mean of all n^2 squared distances, 2 mean_i |x_i - mean x|^2, in O(n p).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ._validate import _is_compiling
from .ops.torch_backend import block_elems, center_columns, compute_dtype, sq_dist_block

Tensor = torch.Tensor
_DIGIT = 16
_BINS = 1 << _DIGIT


def _center(x: Tensor) -> Tensor:
    """x centred in the compute dtype (distances are taken there)."""
    return center_columns(x.to(compute_dtype(x.dtype)))


def mean_sq_distance(x: Tensor) -> Tensor:
    xc = _center(x)
    return 2.0 * (xc * xc).sum(-1).mean(-1)


def _keys(d: Tensor) -> Tensor:
    """Order-preserving integer keys of non-negative floats (their bit patterns)."""
    return d.view(torch.int64 if d.dtype == torch.float64 else torch.int32)


def _from_key(key: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float64:
        return key.view(torch.float64)
    return key.to(torch.int32).view(torch.float32)


def _upper_blocks(xc: Tensor):
    """Row blocks of the strictly upper triangle of the squared-distance matrix:
    yields (d, keep) with d (G, B, n - i) the distances of rows i.. against
    columns i.. and keep (B, n - i) marking the entries with column > row."""
    g, n = xc.shape[0], xc.shape[1]
    nx = (xc * xc).sum(-1)
    b = max(1, (block_elems() // 4) // max(1, g * n))
    for i in range(0, n, b):
        j = min(n, i + b)
        d = sq_dist_block(xc[:, i:j], xc[:, i:], nx[:, i:j], nx[:, i:])
        keep = torch.ones(j - i, n - i, dtype=torch.bool, device=xc.device).triu_(1)
        yield d, keep


def _count(idx: Tensor, size: int) -> Tensor:
    """Histogram of non-negative integer indices (bincount on the CPU; on a GPU a
    scatter-add, which needs no host sync where bincount would)."""
    if idx.device.type == "cpu" and not torch.compiler.is_compiling():  # torch 2.4 cannot trace bincount
        return torch.bincount(idx, minlength=size)
    idx = idx.to(torch.int64)
    return torch.zeros(size, dtype=torch.int64, device=idx.device).index_add_(0, idx, torch.ones_like(idx))


def _select_upper(xc: Tensor, ranks: Tensor) -> Tensor:
    """The ranks[t, g]-th smallest (0-based) strictly-upper-triangle distance of
    group g, for two targets t, by a radix select over the keys' bit patterns:
    each pass histograms the next 16 bits of the keys whose higher bits match a
    target's prefix so far. Both targets share one histogram call; on the CPU,
    when they share a prefix (the usual case), one comparison serves both."""
    g = xc.shape[0]
    bits = 64 if xc.dtype == torch.float64 else 32
    dev = xc.device
    kt = torch.int64 if bits == 64 else torch.int32  # index arithmetic in the keys' own width
    width = 2 * _BINS + 1  # per group: target 0's bins, target 1's bins, one bin for keys matching neither
    base = (torch.arange(g, device=dev, dtype=kt) * width)[:, None, None]
    prefix = torch.zeros(2, g, dtype=torch.int64, device=dev)
    rank = ranks.clone()
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        first = shift + _DIGIT >= bits
        same = prefix[0] == prefix[1]
        shared = first or (dev.type == "cpu" and not _is_compiling() and bool(same.all()))
        hist = torch.zeros(g * width, dtype=torch.int64, device=dev)
        for d, keep in _upper_blocks(xc):
            keys = _keys(d)
            digit = (keys >> shift) & (_BINS - 1)
            if first:
                idx = torch.where(keep, digit, 2 * _BINS)
            else:
                high = keys >> (shift + _DIGIT)
                t0 = (high == prefix[0].to(kt)[:, None, None]) & keep
                if shared:
                    idx = torch.where(t0, digit, 2 * _BINS)
                else:
                    t1 = (high == prefix[1].to(kt)[:, None, None]) & keep
                    idx = torch.where(t0, digit, torch.where(t1, digit + _BINS, 2 * _BINS))
            hist += _count((idx + base).reshape(-1), g * width)
        hist = hist.view(g, width)
        h0 = hist[:, :_BINS]
        h1 = h0 if shared else torch.where(same[:, None], h0, hist[:, _BINS : 2 * _BINS])
        for t, h in enumerate((h0, h1)):
            cum = h.cumsum(-1)
            bucket = torch.searchsorted(cum, rank[t][:, None], right=True)[:, 0]
            below = torch.where(bucket > 0, cum.gather(1, (bucket - 1).clamp_min(0)[:, None])[:, 0], 0)
            rank[t] = rank[t] - below
            prefix[t] = (prefix[t] << _DIGIT) | bucket
    return torch.stack([_from_key(p, xc.dtype) for p in prefix])


def _select_dense(d: Tensor, ranks) -> List[Tensor]:
    """For each rank t, the ranks[t]-th smallest (0-based) strictly-upper entry of each (n, n)
    matrix of d (G, n, n), (G,)."""
    n = d.shape[1]
    iu = torch.triu_indices(n, n, 1, device=d.device)
    upper = d[:, iu[0], iu[1]]
    return [upper.kthvalue(r + 1, dim=1).values for r in ranks]


def median_sq_distance(x: Tensor, d: Optional[Tensor] = None) -> Tensor:
    """NumPy's median of the n^2 squared distances of each group of x (G, n, p);
    ``d``: those distances (G, n, n) in the compute dtype, if the caller has them.

    Sorted, the n^2 values are the n diagonal zeros followed by every strictly
    upper value twice, so the k-th of them (k >= n) is the ((k - n) // 2)-th
    upper value: only the upper triangle is searched."""
    g, n = x.shape[0], x.shape[1]
    ks = [(n * n - 1) // 2, (n * n) // 2]
    if n < 2:
        return torch.zeros(g, dtype=compute_dtype(x.dtype), device=x.device)
    ranks = [max(0, (k - n) // 2) for k in ks]
    if d is None and g * n * n <= block_elems():  # one block holds them all
        xc = _center(x)
        nx = (xc * xc).sum(-1)
        d = sq_dist_block(xc, xc, nx, nx)
    if d is not None:
        low, high = _select_dense(d, ranks)
    else:
        low, high = _select_upper(_center(x), torch.tensor(ranks, dtype=torch.int64, device=x.device)[:, None].repeat(1, g))
    low, high = (torch.zeros_like(v) if k < n else v for v, k in zip((low, high), ks))  # a diagonal zero
    return 0.5 * (low + high)


@torch.no_grad()
def sigma2(x: Tensor, sigma, d: Optional[Tensor] = None) -> Tensor:
    """sigma^2 per group for x (G, n, p); sigma is a float, a tensor of G values, "median" or "mean".
    ``d``: the squared distances (G, n, n) of x's rows in the compute dtype, if the caller has them."""
    g = x.shape[0]
    cd = compute_dtype(x.dtype)
    if isinstance(sigma, torch.Tensor):
        s = sigma.detach().to(device=x.device, dtype=cd).reshape(-1)
        return (s * s).expand(g).contiguous()
    if isinstance(sigma, (int, float)):
        return torch.full((g,), float(sigma) ** 2, dtype=cd, device=x.device)
    # every squared distance 0 (all rows equal): K = 1 whatever the bandwidth, so 1 is
    # used (0 would make gamma = 1 / (2 sigma^2) infinite and K NaN)
    mean = mean_sq_distance(x) if d is None else d.mean((1, 2))
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    if sigma == "mean":
        return mean
    med = median_sq_distance(x, d)
    return torch.where(med > 0, med, mean)
