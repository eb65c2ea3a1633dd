"""The pure-PyTorch backend: exact, blocked, CPU and GPU.

Every function here implements one entry of the backend contract
(``rcka_kernels/ops/_contract.py``). Inputs are batched ``(G, n, p)``; sums are
accumulated in float32 (float64 for float64 inputs) inside a block and in
float64 across blocks. No n x n matrix is held: the RBF paths walk tiles of at
most ``block_elems()`` kernel entries (the symmetric Grams only the tiles on
and above the diagonal) and the backward passes recompute those tiles (as
FlashAttention recomputes attention tiles), so extra memory is O(block).
"""

from __future__ import annotations

import math
import os
from typing import Tuple

import torch

Tensor = torch.Tensor


def block_elems() -> int:
    """Kernel entries per block (env RCKA_TORCH_BLOCK_ELEMS, default 2**22 = 16 MiB in fp32)."""
    return int(os.environ.get("RCKA_TORCH_BLOCK_ELEMS", 1 << 22))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_block(g: int, n_cols: int) -> int:
    return max(1, block_elems() // max(1, g * n_cols))


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-group sum of a * b over the last two dims, as float64: row dot products
    in the compute dtype, their sum in float64 (a single long float32 dot, as BLAS
    would do it, loses ~1e-5 on 10^6 terms, and the HSIC identity amplifies it)."""
    return torch.linalg.vecdot(a, b, dim=-1).double().sum(-1)


def sq_dist_block(xi: Tensor, x: Tensor, ni: Tensor, nx: Tensor, diag_at: int = -1, diag: float = 0.0) -> Tensor:
    """|x_i - x_j|^2 for rows xi (G,B,p) against x (G,m,p), clamped at 0.

    ni, nx are the squared row norms. With diag_at >= 0 the block holds rows
    diag_at.. of x itself and its diagonal entries are set to exactly ``diag``."""
    d = torch.baddbmm(ni[:, :, None] + nx[:, None, :], xi, x.transpose(1, 2), alpha=-2.0)
    d.clamp_min_(0.0)
    if diag_at >= 0:
        d[:, :, diag_at : diag_at + xi.shape[1]].diagonal(dim1=1, dim2=2).fill_(diag)
    return d


def rbf_block(xi: Tensor, x: Tensor, ni: Tensor, nx: Tensor, gamma: Tensor, diag_at: int = -1) -> Tensor:
    """exp(-gamma |x_i - x_j|^2), gamma (G,); with diag_at >= 0 the diagonal is
    left out (exactly 0): the contract's sums are over i != j."""
    d = sq_dist_block(xi, x, ni, nx, diag_at, diag=float("inf"))
    return d.mul_(-gamma[:, None, None]).exp_()


# ----------------------------------------------------------------------------- linear


def _use_feature_space(n: int, p: int, q: int) -> bool:
    # feature space ~ n (p + q)^2, sample space ~ n^2 (p + q)
    return p + q <= n


def linear_saved_shape(g: int, p: int, q: int, n: int):
    """Feature space keeps X^T Y, X^T X, Y^T Y (packed) so backward needs no GEMM
    of forward again; sample space keeps nothing (its n x n Grams are recomputed)."""
    return (g, p * q + p * p + q * q) if _use_feature_space(n, p, q) else (0,)


def _unpack(saved: Tensor, p: int, q: int):
    g = saved.shape[0]
    a = saved[:, : p * q].view(g, p, q)
    cx = saved[:, p * q : p * q + p * p].view(g, p, p)
    cy = saved[:, p * q + p * p :].view(g, q, q)
    return a, cx, cy


def linear_stats(x: Tensor, y: Tensor) -> Tensor:
    return linear_stats_saving(x, y)[0]


def linear_stats_saving(x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """(S, saved): the statistics and what backward reuses (see linear_saved_shape)."""
    cd = compute_dtype(x.dtype)
    x, y = x.to(cd), y.to(cd)
    g, n, p, q = x.shape[0], x.shape[1], x.shape[2], y.shape[2]
    if _use_feature_space(n, p, q):
        saved = torch.empty(g, p * q + p * p + q * q, dtype=cd, device=x.device)
        a, cx, cy = _unpack(saved, p, q)
        torch.bmm(x.transpose(1, 2), y, out=a)
        torch.bmm(x.transpose(1, 2), x, out=cx)
        torch.bmm(y.transpose(1, 2), y, out=cy)
        return torch.stack([_dot(a, a), _dot(cx, cx), _dot(cy, cy)], -1), saved
    k = x @ x.transpose(1, 2)
    l = y @ y.transpose(1, 2)
    return torch.stack([_dot(k, l), _dot(k, k), _dot(l, l)], -1), x.new_empty((0,))


def linear_stats_backward(x: Tensor, y: Tensor, g: Tensor, saved: Tensor = None) -> Tuple[Tensor, Tensor]:
    cd = compute_dtype(x.dtype)
    xd, yd = x.to(cd), y.to(cd)
    gxy, gxx, gyy = (g[:, i, None, None].to(cd) for i in range(3))
    n, p, q = x.shape[1], x.shape[2], y.shape[2]
    if _use_feature_space(n, p, q):
        if saved is None or not saved.numel():
            saved = linear_stats_saving(xd, yd)[1]
        a, cx, cy = _unpack(saved, p, q)
        # scale the small p x q, p x p factors, not the n x p products; two GEMMs into one output
        dx = torch.baddbmm(yd @ ((2 * gxy) * a.transpose(1, 2)), xd, (4 * gxx) * cx)
        dy = torch.baddbmm(xd @ ((2 * gxy) * a), yd, (4 * gyy) * cy)
    else:
        k = xd @ xd.transpose(1, 2)
        l = yd @ yd.transpose(1, 2)
        dx = ((2 * gxy) * l + (4 * gxx) * k) @ xd
        dy = ((2 * gxy) * k + (4 * gyy) * l) @ yd
    return dx.to(x.dtype), dy.to(y.dtype)


# ----------------------------------------------------------------------------- rbf HSIC statistics


def _sym_tiles(g: int, n: int):
    """Tiles (i0, i1, j0, j1) with j0 >= i0 covering the upper half of an n x n
    symmetric matrix, each at most block_elems() entries per group batch."""
    t = max(1, math.isqrt(max(1, block_elems() // max(1, g))))
    for i0 in range(0, n, t):
        for j0 in range(i0, n, t):
            yield i0, min(n, i0 + t), j0, min(n, j0 + t)


def rbf_stats(x: Tensor, y: Tensor, gx: Tensor, gy: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Each tile (I, J >= I) of K and L is computed once; an off-diagonal tile
    stands for its mirror too (weight 2 in the sums, column sums to rows J)."""
    cd = compute_dtype(x.dtype)
    x, y, gx, gy = x.to(cd), y.to(cd), gx.to(cd), gy.to(cd)
    g, n = x.shape[0], x.shape[1]
    nx, ny = (x * x).sum(-1), (y * y).sum(-1)
    s = torch.zeros(g, 3, dtype=torch.float64, device=x.device)
    rx = torch.zeros(g, n, dtype=cd, device=x.device)
    ry = torch.zeros_like(rx)
    for i0, i1, j0, j1 in _sym_tiles(g, n):
        on_diag = 0 if i0 == j0 else -1
        k = rbf_block(x[:, i0:i1], x[:, j0:j1], nx[:, i0:i1], nx[:, j0:j1], gx, diag_at=on_diag)
        l = rbf_block(y[:, i0:i1], y[:, j0:j1], ny[:, i0:i1], ny[:, j0:j1], gy, diag_at=on_diag)
        w = 1.0 if i0 == j0 else 2.0
        s[:, 0] += w * _dot(k, l)
        s[:, 1] += w * _dot(k, k)
        s[:, 2] += w * _dot(l, l)
        rx[:, i0:i1] += k.sum(-1)
        ry[:, i0:i1] += l.sum(-1)
        if i0 != j0:
            rx[:, j0:j1] += k.sum(-2)
            ry[:, j0:j1] += l.sum(-2)
    return s, rx, ry


def _rbf_input_grad(xi: Tensor, x: Tensor, m: Tensor, gamma: Tensor) -> Tensor:
    """d/dx_i of sum_j M_ij k(x_i, x_j) for symmetrised weights M (already times K)."""
    return (-2.0 * gamma[:, None, None]) * (m.sum(-1, keepdim=True) * xi - m @ x)


def _sym_weights(gab: Tensor, other: Tensor, gaa: Tensor, k: Tensor, gr: Tensor, i0, i1, j0, j1) -> Tensor:
    """(G + G^T) o K on a tile for G = dS/dK: S_ab -> other Gram, S_aa -> 2K,
    row sums -> gr 1^T. Symmetric, so the mirror tile's weights are its transpose.
    The diagonal of K is 0 (left out), so its weights vanish as they must."""
    return ((2 * gab) * other + (4 * gaa) * k + gr[:, i0:i1, None] + gr[:, None, j0:j1]).mul_(k)


def rbf_stats_backward(
    x: Tensor, y: Tensor, gx: Tensor, gy: Tensor, gs: Tensor, grx: Tensor, gry: Tensor
) -> Tuple[Tensor, Tensor]:
    cd = compute_dtype(x.dtype)
    xd, yd, gx, gy = x.to(cd), y.to(cd), gx.to(cd), gy.to(cd)
    grx, gry = grx.to(cd), gry.to(cd)
    gxy, gxx, gyy = (gs[:, i, None, None].to(cd) for i in range(3))
    g, n = xd.shape[0], xd.shape[1]
    nx, ny = (xd * xd).sum(-1), (yd * yd).sum(-1)
    dx, dy = torch.zeros_like(xd), torch.zeros_like(yd)
    for i0, i1, j0, j1 in _sym_tiles(g, n):
        on_diag = 0 if i0 == j0 else -1
        k = rbf_block(xd[:, i0:i1], xd[:, j0:j1], nx[:, i0:i1], nx[:, j0:j1], gx, diag_at=on_diag)
        l = rbf_block(yd[:, i0:i1], yd[:, j0:j1], ny[:, i0:i1], ny[:, j0:j1], gy, diag_at=on_diag)
        mk = _sym_weights(gxy, l, gxx, k, grx, i0, i1, j0, j1)
        ml = _sym_weights(gxy, k, gyy, l, gry, i0, i1, j0, j1)
        dx[:, i0:i1] += _rbf_input_grad(xd[:, i0:i1], xd[:, j0:j1], mk, gx)
        dy[:, i0:i1] += _rbf_input_grad(yd[:, i0:i1], yd[:, j0:j1], ml, gy)
        if i0 != j0:
            dx[:, j0:j1] += _rbf_input_grad(xd[:, j0:j1], xd[:, i0:i1], mk.transpose(1, 2), gx)
            dy[:, j0:j1] += _rbf_input_grad(yd[:, j0:j1], yd[:, i0:i1], ml.transpose(1, 2), gy)
    return dx.to(x.dtype), dy.to(y.dtype)


# ----------------------------------------------------------------------------- rbf MMD sums


def rbf_mmd_sums(x: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
    cd = compute_dtype(x.dtype)
    x, y, gamma = x.to(cd), y.to(cd), gamma.to(cd)
    g, n, m = x.shape[0], x.shape[1], y.shape[1]
    nx, ny = (x * x).sum(-1), (y * y).sum(-1)
    s = torch.zeros(g, 3, dtype=torch.float64, device=x.device)
    b = _rows_per_block(g, n + m)
    for i in range(0, n, b):
        j = min(n, i + b)
        s[:, 0] += rbf_block(x[:, i:j], x, nx[:, i:j], nx, gamma, diag_at=i).sum(-1).double().sum(-1)
        s[:, 2] += rbf_block(x[:, i:j], y, nx[:, i:j], ny, gamma).sum(-1).double().sum(-1)
    for i in range(0, m, b):
        j = min(m, i + b)
        s[:, 1] += rbf_block(y[:, i:j], y, ny[:, i:j], ny, gamma, diag_at=i).sum(-1).double().sum(-1)
    return s


def rbf_mmd_sums_backward(x: Tensor, y: Tensor, gamma: Tensor, gs: Tensor) -> Tuple[Tensor, Tensor]:
    cd = compute_dtype(x.dtype)
    xd, yd, gamma = x.to(cd), y.to(cd), gamma.to(cd)
    gxx, gyy, gxy = (gs[:, i, None, None].to(cd) for i in range(3))
    g, n, m = xd.shape[0], xd.shape[1], yd.shape[1]
    nx, ny = (xd * xd).sum(-1), (yd * yd).sum(-1)
    dx, dy = torch.empty_like(xd), torch.zeros_like(yd)
    two_gamma = 2.0 * gamma[:, None, None]
    b = _rows_per_block(g, n + m)
    for i in range(0, n, b):
        j = min(n, i + b)
        kxx = rbf_block(xd[:, i:j], xd, nx[:, i:j], nx, gamma, diag_at=i).mul_(2 * gxx)
        kxy = rbf_block(xd[:, i:j], yd, nx[:, i:j], ny, gamma).mul_(gxy)
        dx[:, i:j] = _rbf_input_grad(xd[:, i:j], xd, kxx, gamma) + _rbf_input_grad(xd[:, i:j], yd, kxy, gamma)
        # d/dy_j of k(x_i, y_j) = +2 gamma k (x_i - y_j)
        dy += two_gamma * (kxy.transpose(1, 2) @ xd[:, i:j] - kxy.sum(1)[:, :, None] * yd)
    for i in range(0, m, b):
        j = min(m, i + b)
        kyy = rbf_block(yd[:, i:j], yd, ny[:, i:j], ny, gamma, diag_at=i).mul_(2 * gyy)
        dy[:, i:j] += _rbf_input_grad(yd[:, i:j], yd, kyy, gamma)
    return dx.to(x.dtype), dy.to(y.dtype)
