"""The pure-PyTorch backend: exact, blocked, CPU and GPU.

Every function here implements one entry of the backend contract
(``rcka_kernels/ops/_contract.py``). Inputs are batched ``(G, n, p)``; sums are
accumulated in float32 (float64 for float64 inputs) inside a block and in
float64 across blocks. No n x n matrix is held: the RBF paths walk row blocks
of at most ``block_elems()`` kernel entries and the backward passes recompute
those blocks (as FlashAttention recomputes attention tiles), so extra memory is
O(G * block * n).
"""

from __future__ import annotations

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


def linear_stats(x: Tensor, y: Tensor) -> Tensor:
    cd = compute_dtype(x.dtype)
    x, y = x.to(cd), y.to(cd)
    n, p, q = x.shape[1], x.shape[2], y.shape[2]
    if _use_feature_space(n, p, q):
        a = x.transpose(1, 2) @ y
        cx = x.transpose(1, 2) @ x
        cy = y.transpose(1, 2) @ y
    else:
        a = x @ x.transpose(1, 2)
        cx, cy = a, y @ y.transpose(1, 2)
        return torch.stack([_dot(cx, cy), _dot(cx, cx), _dot(cy, cy)], -1)
    return torch.stack([_dot(a, a), _dot(cx, cx), _dot(cy, cy)], -1)


def linear_stats_backward(x: Tensor, y: Tensor, g: Tensor) -> Tuple[Tensor, Tensor]:
    cd = compute_dtype(x.dtype)
    xd, yd = x.to(cd), y.to(cd)
    gxy, gxx, gyy = (g[:, i, None, None].to(cd) for i in range(3))
    n, p, q = x.shape[1], x.shape[2], y.shape[2]
    if _use_feature_space(n, p, q):
        a = xd.transpose(1, 2) @ yd
        dx = (2 * gxy) * (yd @ a.transpose(1, 2)) + (4 * gxx) * (xd @ (xd.transpose(1, 2) @ xd))
        dy = (2 * gxy) * (xd @ a) + (4 * gyy) * (yd @ (yd.transpose(1, 2) @ yd))
    else:
        k = xd @ xd.transpose(1, 2)
        l = yd @ yd.transpose(1, 2)
        dx = ((2 * gxy) * l + (4 * gxx) * k) @ xd
        dy = ((2 * gxy) * k + (4 * gyy) * l) @ yd
    return dx.to(x.dtype), dy.to(y.dtype)


# ----------------------------------------------------------------------------- rbf HSIC statistics


def rbf_stats(x: Tensor, y: Tensor, gx: Tensor, gy: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    cd = compute_dtype(x.dtype)
    x, y, gx, gy = x.to(cd), y.to(cd), gx.to(cd), gy.to(cd)
    g, n = x.shape[0], x.shape[1]
    nx, ny = (x * x).sum(-1), (y * y).sum(-1)
    s = torch.zeros(g, 3, dtype=torch.float64, device=x.device)
    rx = torch.empty(g, n, dtype=cd, device=x.device)
    ry = torch.empty_like(rx)
    b = _rows_per_block(g, n)
    for i in range(0, n, b):
        j = min(n, i + b)
        k = rbf_block(x[:, i:j], x, nx[:, i:j], nx, gx, diag_at=i)
        l = rbf_block(y[:, i:j], y, ny[:, i:j], ny, gy, diag_at=i)
        rx[:, i:j] = k.sum(-1)
        ry[:, i:j] = l.sum(-1)
        s[:, 0] += _dot(k, l)
        s[:, 1] += _dot(k, k)
        s[:, 2] += _dot(l, l)
    return s, rx, ry


def _rbf_input_grad(xi: Tensor, x: Tensor, m: Tensor, gamma: Tensor) -> Tensor:
    """d/dx_i of sum_j M_ij k(x_i, x_j) for symmetrised weights M (already times K)."""
    return (-2.0 * gamma[:, None, None]) * (m.sum(-1, keepdim=True) * xi - m @ x)


def rbf_stats_backward(
    x: Tensor, y: Tensor, gx: Tensor, gy: Tensor, gs: Tensor, grx: Tensor, gry: Tensor
) -> Tuple[Tensor, Tensor]:
    cd = compute_dtype(x.dtype)
    xd, yd, gx, gy = x.to(cd), y.to(cd), gx.to(cd), gy.to(cd)
    grx, gry = grx.to(cd), gry.to(cd)
    gxy, gxx, gyy = (gs[:, i, None, None].to(cd) for i in range(3))
    g, n = xd.shape[0], xd.shape[1]
    nx, ny = (xd * xd).sum(-1), (yd * yd).sum(-1)
    dx, dy = torch.empty_like(xd), torch.empty_like(yd)
    b = _rows_per_block(g, n)
    for i in range(0, n, b):
        j = min(n, i + b)
        k = rbf_block(xd[:, i:j], xd, nx[:, i:j], nx, gx, diag_at=i)
        l = rbf_block(yd[:, i:j], yd, ny[:, i:j], ny, gy, diag_at=i)
        # (G + G^T) o K for G = dS/dK: S_xy -> L, S_xx -> 2K, row sums -> grx 1^T (diagonal 0: constant)
        mk = ((2 * gxy) * l + (4 * gxx) * k + grx[:, i:j, None] + grx[:, None, :]).mul_(k)
        ml = ((2 * gxy) * k + (4 * gyy) * l + gry[:, i:j, None] + gry[:, None, :]).mul_(l)
        dx[:, i:j] = _rbf_input_grad(xd[:, i:j], xd, mk, gx)
        dy[:, i:j] = _rbf_input_grad(yd[:, i:j], yd, ml, gy)
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
