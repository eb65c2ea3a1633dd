"""RBF bandwidth heuristics, computed without an n x n matrix and without host syncs.

``sigma2(x, sigma)`` returns sigma^2 per group, ``(G,)`` in the compute dtype, for
``x`` of shape ``(G, n, p)``. The bandwidth is a statistic of the data that the
backward pass treats as a constant (as Kornblith et al. and most CKA code do).

- "median": the exact median of all n^2 squared distances (diagonal zeros
  included, NumPy's convention: the mean of the two middle values when n^2 is
  even), found by a radix select over the bit patterns of the distances (16 bits
  per pass, 2 passes for float32 and 4 for float64), each pass recomputing the
  distances block by block: memory O(block), no sort of n^2 values. If the median
  is 0 (more than half of all pairs coincide) the "mean" value is used instead.
- "mean": the mean of all n^2 squared distances, 2 mean_i |x_i - mean x|^2, in O(n p).
"""

from __future__ import annotations

import torch

from .ops.torch_backend import block_elems, compute_dtype, sq_dist_block

Tensor = torch.Tensor
_DIGIT = 16
_BINS = 1 << _DIGIT


def _center(x: Tensor) -> Tensor:
    x = x.to(compute_dtype(x.dtype))
    return x - x.mean(1, keepdim=True)


def mean_sq_distance(x: Tensor) -> Tensor:
    xc = _center(x)
    return 2.0 * (xc * xc).sum(-1).mean(-1)


def _keys(d: Tensor) -> Tensor:
    """Order-preserving integer keys of non-negative floats."""
    if d.dtype == torch.float64:
        return d.view(torch.int64)
    return d.view(torch.int32).to(torch.int64)


def _from_key(key: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float64:
        return key.view(torch.float64)
    return key.to(torch.int32).view(torch.float32)


def _blocks(xc: Tensor):
    g, n = xc.shape[0], xc.shape[1]
    nx = (xc * xc).sum(-1)
    b = max(1, (block_elems() // 4) // max(1, g * n))
    for i in range(0, n, b):
        j = min(n, i + b)
        yield sq_dist_block(xc[:, i:j], xc, nx[:, i:j], nx, diag_at=i)


def kth_sq_distance(x: Tensor, ks: list) -> list:
    """The k-th smallest (0-based, per group) of the n^2 squared distances, for each k in ks."""
    xc = _center(x)
    g = xc.shape[0]
    bits = 64 if xc.dtype == torch.float64 else 32
    dev = xc.device
    offs = (torch.arange(g, device=dev) * _BINS)[:, None, None]
    prefix = [torch.zeros(g, dtype=torch.int64, device=dev) for _ in ks]
    rank = [torch.full((g,), int(k), dtype=torch.int64, device=dev) for k in ks]
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        hists = [torch.zeros(g * _BINS, dtype=torch.int64, device=dev) for _ in ks]
        for d in _blocks(xc):
            keys = _keys(d)
            digit = ((keys >> shift) & (_BINS - 1)) + offs
            first = shift + _DIGIT >= bits
            high = None if first else keys >> (shift + _DIGIT)
            for h, pre in zip(hists, prefix):
                hit = torch.ones_like(keys) if first else (high == pre[:, None, None]).to(torch.int64)
                h.index_add_(0, digit.reshape(-1), hit.reshape(-1))
        for t, h in enumerate(hists):
            cum = h.view(g, _BINS).cumsum(-1)
            bucket = torch.searchsorted(cum, rank[t][:, None], right=True)[:, 0]
            below = torch.where(bucket > 0, cum.gather(1, (bucket - 1).clamp_min(0)[:, None])[:, 0], 0)
            rank[t] = rank[t] - below
            prefix[t] = (prefix[t] << _DIGIT) | bucket
    return [_from_key(p, xc.dtype) for p in prefix]


def median_sq_distance(x: Tensor) -> Tensor:
    n2 = x.shape[1] * x.shape[1]
    lo, hi = kth_sq_distance(x, [(n2 - 1) // 2, n2 // 2])
    return 0.5 * (lo + hi)


@torch.no_grad()
def sigma2(x: Tensor, sigma) -> Tensor:
    """sigma^2 per group for x (G, n, p); sigma is a float, a tensor of G values, "median" or "mean"."""
    g = x.shape[0]
    cd = compute_dtype(x.dtype)
    if isinstance(sigma, torch.Tensor):
        s = sigma.detach().to(device=x.device, dtype=cd).reshape(-1)
        return (s * s).expand(g).contiguous()
    if isinstance(sigma, (int, float)):
        return torch.full((g,), float(sigma) ** 2, dtype=cd, device=x.device)
    mean = mean_sq_distance(x)
    if sigma == "mean":
        return mean
    med = median_sq_distance(x)
    return torch.where(med > 0, med, mean)
