"""The pure-PyTorch backend: exact, blocked, CPU and GPU.

Every function here implements one entry of the backend contract
(``rcka_kernels/ops/_contract.py``). Inputs are batched ``(G, n, p)``; sums are
accumulated in float32 (float64 for float64 inputs) inside a block and in
float64 across blocks. No n x n matrix is held: the RBF paths walk tiles of at
most ``block_elems()`` kernel entries (the symmetric Grams only the tiles on
and above the diagonal) and the backward passes recompute those tiles (as
FlashAttention recomputes attention tiles), so extra memory is O(block). Where the
Grams of a group batch are no larger than one tile, ``dense_rbf_grams`` forms them
whole, once, for the value and its gradient together (ops/stats.py's ``dense_rbf``).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


@torch.compiler.assume_constant_result  # a trace reads it once (torch 2.4's dynamo cannot trace os.environ)
def block_elems() -> int:
    """Kernel entries per block (env RCKA_TORCH_BLOCK_ELEMS, default 2**22 = 16 MiB in fp32)."""
    return int(os.environ.get("RCKA_TORCH_BLOCK_ELEMS", 1 << 22))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def center_columns(x: Tensor) -> Tensor:
    """x (G, n, p) minus its column means (computed in the compute dtype), in x's dtype;
    any residual shift is harmless (the statistics fed with it are translation-invariant)."""
    return x - x.mean(1, keepdim=True, dtype=compute_dtype(x.dtype)).to(x.dtype)


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


def use_feature_space(n: int, p: int, q: int) -> bool:
    """The linear statistics' side, shared by every backend: feature space costs
    ~ n (p + q)^2, sample space ~ n^2 (p + q)."""
    return p + q <= n


def _sq_norms(*mats: Tensor) -> Tensor:
    """(G, len(mats)) squared Frobenius norms of (G, a, b) matrices."""
    return torch.stack([torch.linalg.vector_norm(m, dim=(-2, -1)) for m in mats], -1).square()


def linear_stats_saving(x: Tensor, y: Optional[Tensor] = None):
    """(S, saved) in the compute dtype: S (G, 2, 2) = [[<K,K>, <K,L>], [<L,K>, <L,L>]]
    and what the backward reuses: (K, L) in sample space, (X^T Y, X^T X, Y^T Y) in
    feature space. ``y=None``: x (2G, n, p) holds each group's X and Y
    side by side (X_g = x[2g], Y_g = x[2g + 1]), so every product is one batched op
    for both inputs (and in sample space S is the Gram matrix of the flattened K
    and L: one more op)."""
    if x.dtype not in (torch.float32, torch.float64):  # half inputs (a direct call): accumulate in float32
        x, y = x.float(), None if y is None else y.float()
    if y is None:
        g2, n, p = x.shape
        if use_feature_space(n, p, p):
            c = torch.bmm(x.mT, x)  # (2G, p, p): X^T X and Y^T Y side by side
            a = torch.bmm(x[0::2].mT, x[1::2])
            kk, ll = torch.linalg.vector_norm(c, dim=(-2, -1)).square().view(-1, 2).unbind(1)
            return gram_of_grams(_sq_norms(a)[:, 0], kk, ll), (a, c[0::2], c[1::2])
        kl = torch.bmm(x, x.mT)  # (2G, n, n): K and L side by side
        f = kl.view(g2 // 2, 2, n * n)
        return torch.bmm(f, f.mT), (kl[0::2], kl[1::2])
    n, p, q = x.shape[1], x.shape[2], y.shape[2]
    if use_feature_space(n, p, q):
        # matmul, not bmm: torch 2.4 names the traced backward's inputs after the forward's nodes and, when
        # its own bmm nodes take the same names, binds cy to cx (a shape error under torch.compile)
        a, cx, cy = torch.matmul(x.mT, y), torch.matmul(x.mT, x), torch.matmul(y.mT, y)
        return gram_of_grams(*_sq_norms(a, cx, cy).unbind(1)), (a, cx, cy)
    k, l = torch.bmm(x, x.mT), torch.bmm(y, y.mT)
    return gram_of_grams(torch.linalg.vecdot(k.flatten(1), l.flatten(1)), *_sq_norms(k, l).unbind(1)), (k, l)


GRAM_BLOCK = 512  # columns per float32 product in gram64 (at least n); the block sums are added in float64


def gram64(u: Tensor) -> Tensor:
    """The Grams u u^T (B, n, n) of u (B, n, p) in float64: float32 products over blocks of
    w = max(GRAM_BLOCK, n) columns, added in float64 (as this backend's sums are), so that
    the entries' rounding does not grow with p (the debiased estimator amplifies it at
    small n). One batched product per group (over its blocks, as strided views) or per
    block (over the groups), whichever is fewer; the blocks' products, (p / w) n^2
    entries per group, take no more memory than u."""
    b, n, p = u.shape
    w = max(GRAM_BLOCK, n)
    if u.dtype == torch.float64 or p <= w:
        return torch.bmm(u, u.mT).double()
    full = p - p % w
    if b <= full // w:
        blocks = [u[g, :, :full].unfold(-1, w, w).transpose(0, 1) for g in range(b)]  # (p // w, n, w) views
        k = torch.stack([torch.bmm(t, t.mT).double().sum(0) for t in blocks])
    else:
        k = torch.bmm(u[:, :, :w], u[:, :, :w].mT).double()
        for i in range(w, full, w):
            k += torch.bmm(u[:, :, i : i + w], u[:, :, i : i + w].mT).double()
    if full < p:
        rest = u[:, :, full:]
        k = k + torch.bmm(rest, rest.mT).double()
    return k


def debiased_products(x: Tensor, y: Optional[Tensor] = None):
    """(S, saved) as ``linear_stats_saving`` in sample space, for the debiased estimator:
    S (G, 2, 2) holds n (n-3) times the unbiased HSIC of each pair of K, L, computed as
    <A_u, B_u> of the U-centred Grams (``centre_nxn``, zero diagonal, zero row sums), which
    are formed in float64 from the Grams' own entries: the Grams' diagonals, which the
    estimator cancels, never enter a sum. saved (K_u, L_u) in the compute dtype: the
    backward of <K_u, L_u> is that of <K, L> with K_u, L_u in place of K, L.
    x, y (G, n, p), (G, n, q) or, with y None, x (2G, n, p) as in linear_stats_saving."""
    cd = compute_dtype(x.dtype)
    if y is None:
        ku = centre_nxn(gram64(x.to(cd)), True)
        f = ku.view(-1, 2, ku.shape[-1] ** 2)
        ku = ku.to(cd)
        return torch.bmm(f, f.mT).to(cd), (ku[0::2], ku[1::2])
    ku, lu = (centre_nxn(gram64(t.to(cd)), True) for t in (x, y))
    s = gram_of_grams(torch.linalg.vecdot(ku.flatten(1), lu.flatten(1)), *_sq_norms(ku, lu).unbind(1)).to(cd)
    return s, (ku.to(cd), lu.to(cd))


def gram_of_grams(kl: Tensor, kk: Tensor, ll: Tensor) -> Tensor:
    """(G, 2, 2) [[<K,K>, <K,L>], [<L,K>, <L,L>]] from the three (G,) statistics."""
    return torch.stack([kk, kl, kl, ll], -1).view(-1, 2, 2)


def linear_stats(x: Tensor, y: Tensor) -> Tensor:
    """S (G, 3) float64 = (<K,L>, <K,K>, <L,L>) of ops/_contract.py."""
    return linear_stats_saving(x, y)[0].view(-1, 4)[:, (1, 0, 3)].double()


def _feature_vjp(self_: Tensor, other: Tensor, cross: Tensor, c: Tensor, gkl: Tensor, gs: Optional[Tensor]) -> Tensor:
    """2 [other (gkl cross) + 2 self (gs c)], the second GEMM accumulating into the first."""
    d = torch.bmm(other, gkl * cross)
    return d.mul_(2.0) if gs is None else d.baddbmm_(self_, gs * c, beta=2.0, alpha=4.0)


def _sample_vjp(self_: Tensor, gram: Tensor, ogram: Tensor, gkl: Tensor, gs: Optional[Tensor]) -> Tensor:
    """2 (gkl L + 2 gs K) X (beta=0: the GEMM's input is ignored), one n x n temporary."""
    m = ogram * gkl if gs is None else (ogram * gkl).addcmul_(gram, gs, value=2.0)
    return torch.baddbmm(self_, m, self_, beta=0.0, alpha=2.0)


def linear_stats_backward(x: Optional[Tensor], y: Optional[Tensor], g, saved=None, need=(True, True)):
    """(dx, dy) for g = dv/dS, a (G, 3) tensor or three (G, 1, 1) tensors (gkl, gkk,
    gll), None standing for a zero coefficient:
    dX = 2 gkl L X + 4 gkk K X, in feature space 2 gkl Y (X^T Y)^T + 4 gkk X (X^T X);
    dY likewise. The small factors are scaled, never the n x p products. None for an
    input not in ``need``. x (G, n, p), y (G, n, q); with ``saved`` from
    linear_stats_saving, an input whose gradient is not needed may be None in
    sample space (only its Gram is used)."""
    dtype = (x if x is not None else y).dtype
    if dtype not in (torch.float32, torch.float64):  # half inputs (a direct call): float32, cast back at the end
        x, y = (None if t is None else t.float() for t in (x, y))
    if saved is None:
        saved = linear_stats_saving(x, y)[1]
    if torch.is_tensor(g):
        g = g.to(saved[0].dtype)[:, :, None, None].unbind(1)
    gkl, gkk, gll = g
    if len(saved) == 3:  # feature space
        a, cx, cy = saved
        out = (_feature_vjp(x, y, a.transpose(1, 2), cx, gkl, gkk) if need[0] else None,
               _feature_vjp(y, x, a, cy, gkl, gll) if need[1] else None)
    else:
        k, l = saved
        out = (_sample_vjp(x, k, l, gkl, gkk) if need[0] else None, _sample_vjp(y, l, k, gkl, gll) if need[1] else None)
    return tuple(d if d is None or d.dtype == dtype else d.to(dtype) for d in out)


# ----------------------------------------------------------------------------- n x n matrices (small n)


def gram_matrix(x: Tensor, kernel: str, gamma: Tensor) -> Tensor:
    """The Gram matrices (G, n, n) of x (G, n, p) in the compute dtype: x x^T, or
    exp(-gamma |x_i - x_j|^2) with an exact unit diagonal (gamma (G,))."""
    x = x.to(compute_dtype(x.dtype))
    if kernel == "linear":
        return x @ x.mT
    x = center_columns(x)
    nx = (x * x).sum(-1)
    return torch.exp(sq_dist_block(x, x, nx, nx, diag_at=0, diag=0.0) * -gamma.to(x.dtype)[:, None, None])


def centre_nxn(g: Tensor, debiased: bool) -> Tensor:
    """The centring map on any (G, n, n) matrices g, in place (g is returned), with row sums for
    rows and column sums for columns, so it is its own adjoint and a projection: H g H, or with
    ``debiased`` the U-centring (zero diagonal; Song et al. 2012). Autograd differentiates it
    (no op in it saves its input)."""
    n = g.shape[-1]
    if not debiased:  # (g - row means) - its column means = g - row - column + total means
        g.sub_(g.mean(-1, keepdim=True))
        return g.sub_(g.mean(-2, keepdim=True))
    g.diagonal(dim1=-2, dim2=-1).zero_()
    rows, cols, total = g.sum(-1, keepdim=True), g.sum(-2, keepdim=True), g.sum((-2, -1), keepdim=True)
    g.sub_(rows, alpha=1.0 / (n - 2)).sub_(cols, alpha=1.0 / (n - 2)).add_(total, alpha=1.0 / ((n - 1) * (n - 2)))
    g.diagonal(dim1=-2, dim2=-1).zero_()
    return g


def centered_gram(x: Tensor, kernel: str, gamma: Tensor, debiased: bool) -> Tensor:
    """Optional contract member: the centred Gram (G, n, n) in the compute dtype."""
    return centre_nxn(gram_matrix(x, kernel, gamma), debiased)


# ----------------------------------------------------------------------------- rbf HSIC statistics, dense (small n)


def _per_gram(v, lo: int = 0, hi: int = 2):
    """A per-Gram factor for (G, k, n, n) tensors: a float as it is; a (G, 2) or (G, 1) tensor as
    (G, k, 1, 1), k = hi - lo Grams from the lo-th."""
    if isinstance(v, float):
        return v
    return v.expand(-1, 2)[:, lo:hi, None, None]


def stacked_rows(x: Tensor, y: Tensor) -> Tensor:
    """x (G, n, p) and y (G, n, q) as one (2G, n, max(p, q)) tensor in the compute dtype, group g's x
    at 2g and its y at 2g + 1, the narrower zero-padded (zero columns add nothing to a distance)."""
    p, q = x.shape[-1], y.shape[-1]
    if p != q:
        x, y = (torch.nn.functional.pad(t, (0, max(p, q) - t.shape[-1])) for t in (x, y))
    return torch.stack([x, y], 1).to(compute_dtype(x.dtype)).flatten(0, 1)


def dense_rbf_grams(z: Tensor, s2, zero_diagonal: bool) -> Tuple[Tensor, object]:
    """(KL, s2): the RBF Grams of the rows of z (2G, n, P) (as ``stacked_rows`` gives them), formed
    whole, KL (G, 2, n, n) in z's dtype, from the rows' Gram matrices
    (|z_i - z_j|^2 = G_ii + G_jj - 2 G_ij: exactly 0 on the diagonal, so K_ii = 1), with
    ``zero_diagonal`` their diagonals set to exactly 0. ``s2``: sigma^2, a float or a (G, 2) or
    (G, 1) tensor, or a function of the squared distances (G, 2, n, n) that returns one. Plain
    torch ops, in place where autograd allows: it differentiates them to any order."""
    n = z.shape[1]
    gm = torch.bmm(z, z.mT)
    sq = gm.diagonal(dim1=-2, dim2=-1)
    d = (sq.unsqueeze(-1) + sq.unsqueeze(-2)).sub_(gm, alpha=2.0).clamp_min_(0.0).view(-1, 2, n, n)
    del gm, sq  # before the bandwidth's selection, which takes memory of its own
    if callable(s2):
        s2 = s2(d)
    if zero_diagonal:
        d.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # exp(-inf) = 0
    return d.div_(_per_gram(-2.0 * s2)).exp_(), s2


def dense_rbf_backward(kl: Tensor, x: Tensor, y: Tensor, s2, dk: Tensor, need=(True, True)) -> list:
    """[dx, dy] in the compute dtype, None where not in ``need``, of a value whose derivative in
    the Grams in ``need`` of KL (the RBF Grams of x (G, n, p) and y (G, n, q), dense_rbf_grams) is
    dk (G, k, n, n), float64 and symmetric (the bandwidth a constant; dk is overwritten). With
    gamma = 1 / (2 sigma^2) and M = dk o K: dX = 4 gamma (M - diag(M 1)) X (the chain rule through
    |x_i - x_j|^2; K's diagonal does not move, and cancels there), X centred for precision (the
    zero row sums make the value blind to the mean); dY likewise."""
    lo, hi = (0 if need[0] else 1), (2 if need[1] else 1)
    m = dk.mul_(kl[:, lo:hi]).mul_(_per_gram(2.0 / s2, lo, hi))  # 4 gamma per Gram
    m.diagonal(dim1=-2, dim2=-1).sub_(m.sum(-1))
    m = m.to(kl.dtype)
    return [torch.bmm(m[:, a - lo], center_columns(t.to(kl.dtype))) if lo <= a < hi else None for a, t in enumerate((x, y))]


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
