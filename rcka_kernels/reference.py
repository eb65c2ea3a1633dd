"""Float64 textbook implementations: the oracle for tests and benchmarks.

Everything here builds the n x n Gram matrices explicitly, centres them with the
matrix H = I - 11^T/n where the textbook does, and computes in float64. It is
slow and memory-hungry on purpose: it is the definition the fast backends are
held to, and the one copy that tests and benchmarks import.

All functions take (n, p) / (n, q) inputs, or leading batch dims (..., n, p),
and return float64 tensors of the batch shape. They are differentiable with
plain autograd (the bandwidth of a heuristic is computed under no_grad, as in
every backend).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

Sigma = Union[None, float, str, torch.Tensor]

__all__ = [
    "sq_distances",
    "bandwidth",
    "gram",
    "centered_gram",
    "hsic",
    "cka",
    "mmd",
    "gram_discrepancy",
    "mmd_upper_bound",
    "official_alignment",
]


def sq_distances(x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Squared Euclidean distances |x_i - z_j|^2 in float64 (exact zeros on the
    diagonal when z is x)."""
    x = x.double()
    same = z is None
    z = x if same else z.double()
    d = (x * x).sum(-1)[..., :, None] + (z * z).sum(-1)[..., None, :] - 2.0 * x @ z.transpose(-1, -2)
    d = d.clamp_min(0.0)
    if same:
        d = d - torch.diag_embed(torch.diagonal(d, dim1=-2, dim2=-1))
    return d


def _median_all(d: torch.Tensor) -> torch.Tensor:
    """NumPy's median over the last two dims (mean of the two middle values)."""
    flat = d.flatten(-2).sort(-1).values
    n = flat.shape[-1]
    if n % 2:
        return flat[..., n // 2]
    return 0.5 * (flat[..., n // 2 - 1] + flat[..., n // 2])


@torch.no_grad()
def bandwidth(x: torch.Tensor, sigma: Sigma = "median") -> torch.Tensor:
    """sigma^2 of the RBF kernel for x (..., n, p), as a float64 tensor of the batch shape.

    - float or tensor: that sigma, squared.
    - "median": Kornblith et al.'s heuristic, the median of all n^2 squared
      distances (diagonal zeros included, NumPy's median convention). If it is 0
      (more than half of all pairs coincide) the "mean" value is used instead.
    - "mean": the mean of all n^2 squared distances, 2 (mean|x|^2 - |mean x|^2);
      it needs only O(n p) work, so it streams.
    If every distance is 0 (all rows equal), K = 1 whatever the bandwidth: 1 is used.
    """
    batch = x.shape[:-2]
    if isinstance(sigma, torch.Tensor):
        return (sigma.double() ** 2).expand(batch).clone()
    if isinstance(sigma, (int, float)):
        return torch.full(batch, float(sigma) ** 2, dtype=torch.float64, device=x.device)
    d = sq_distances(x)
    mean = d.mean((-1, -2))
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    if sigma == "mean":
        return mean
    if sigma == "median":
        med = _median_all(d)
        return torch.where(med > 0, med, mean)
    raise ValueError(f"unknown sigma {sigma!r}")


def gram(x: torch.Tensor, kernel: str = "linear", sigma: Sigma = None) -> torch.Tensor:
    """The Gram matrix K (..., n, n) of the rows of x, in float64."""
    x = x.double()
    if kernel == "linear":
        return x @ x.transpose(-1, -2)
    if kernel == "rbf":
        s2 = bandwidth(x, "median" if sigma is None else sigma)
        return torch.exp(-sq_distances(x) / (2.0 * s2[..., None, None]))
    raise ValueError(f"unknown kernel {kernel!r}")


def _h(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64, device=like.device) - 1.0 / n


def centered_gram(x: torch.Tensor, kernel: str = "linear", sigma: Sigma = None, debiased: bool = False) -> torch.Tensor:
    """H K H (biased), or the U-centred K (debiased: zero diagonal, Szekely-Rizzo)."""
    k = gram(x, kernel, sigma)
    n = k.shape[-1]
    if not debiased:
        h = _h(n, k)
        return h @ k @ h
    k = k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))
    r = k.sum(-1)
    t = r.sum(-1)
    u = k - r[..., :, None] / (n - 2) - r[..., None, :] / (n - 2) + (t / ((n - 1) * (n - 2)))[..., None, None]
    return u - torch.diag_embed(torch.diagonal(u, dim1=-2, dim2=-1))


def _hsic_grams(k: torch.Tensor, l: torch.Tensor, debiased: bool) -> torch.Tensor:
    n = k.shape[-1]
    if not debiased:
        h = _h(n, k)
        return torch.diagonal(k @ h @ l @ h, dim1=-2, dim2=-1).sum(-1) / (n - 1) ** 2
    # Song et al. (2012), eq. (5)
    kt = k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))
    lt = l - torch.diag_embed(torch.diagonal(l, dim1=-2, dim2=-1))
    one = torch.ones(n, 1, dtype=torch.float64, device=k.device)
    tr = torch.diagonal(kt @ lt, dim1=-2, dim2=-1).sum(-1)
    k1, l1 = kt @ one, lt @ one
    term2 = (one.T @ k1)[..., 0, 0] * (one.T @ l1)[..., 0, 0] / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (k1.transpose(-1, -2) @ l1)[..., 0, 0]
    return (tr + term2 - term3) / (n * (n - 3))


def hsic(x, y, kernel: str = "linear", sigma: Sigma = None, debiased: bool = False) -> torch.Tensor:
    """HSIC of x (..., n, p) and y (..., n, q): biased tr(KHLH)/(n-1)^2 or Song's unbiased."""
    return _hsic_grams(gram(x, kernel, sigma), gram(y, kernel, sigma), debiased)


def _constant(x: torch.Tensor) -> torch.Tensor:
    """True where every row of x is the same (zero variance in every kernel)."""
    return (x == x[..., :1, :]).flatten(-2).all(-1)


def cka(x, y, kernel: str = "linear", sigma: Sigma = None, debiased: bool = False) -> torch.Tensor:
    """CKA = HSIC(K,L)/sqrt(HSIC(K,K) HSIC(L,L)); 0 where either input has no
    variation (all rows equal) or a self-term is not positive."""
    k, l = gram(x, kernel, sigma), gram(y, kernel, sigma)
    hxy = _hsic_grams(k, l, debiased)
    hxx = _hsic_grams(k, k, debiased)
    hyy = _hsic_grams(l, l, debiased)
    ok = (hxx > 0) & (hyy > 0) & ~_constant(x) & ~_constant(y)
    return torch.where(ok, hxy / torch.sqrt(torch.where(ok, hxx * hyy, torch.ones_like(hxx))), torch.zeros_like(hxy))


def mmd(x, y, kernel: str = "rbf", sigma: Sigma = None, unbiased: bool = False) -> torch.Tensor:
    """Squared MMD between the rows of x (..., n, d) and y (..., m, d).

    The "median"/"mean" bandwidth is computed on the pooled sample [x; y]."""
    x, y = x.double(), y.double()
    n, m = x.shape[-2], y.shape[-2]
    if kernel == "linear":
        kxx, kyy, kxy = x @ x.transpose(-1, -2), y @ y.transpose(-1, -2), x @ y.transpose(-1, -2)
    elif kernel == "rbf":
        s2 = bandwidth(torch.cat([x, y], -2), "median" if sigma is None else sigma)[..., None, None]
        kxx = torch.exp(-sq_distances(x) / (2 * s2))
        kyy = torch.exp(-sq_distances(y) / (2 * s2))
        kxy = torch.exp(-sq_distances(x, y) / (2 * s2))
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    if not unbiased:
        return kxx.mean((-1, -2)) + kyy.mean((-1, -2)) - 2 * kxy.mean((-1, -2))
    sxx = kxx.sum((-1, -2)) - torch.diagonal(kxx, dim1=-2, dim2=-1).sum(-1)
    syy = kyy.sum((-1, -2)) - torch.diagonal(kyy, dim1=-2, dim2=-1).sum(-1)
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * kxy.mean((-1, -2))


def _normalised(x, kernel, sigma, centered):
    k = centered_gram(x, kernel, sigma) if centered else gram(x, kernel, sigma)
    return k / torch.linalg.matrix_norm(k)[..., None, None]


def gram_discrepancy(x, y, kernel: str = "linear", sigma: Sigma = None, centered: bool = True) -> torch.Tensor:
    """1/2 |K^ - L^|_F^2 with K^ = K~/|K~|_F (centred Grams; uncentred if centered=False).

    Theorem 2 of Zhou et al. (2024): with centred Grams this equals 1 - CKA."""
    kh, lh = _normalised(x, kernel, sigma, centered), _normalised(y, kernel, sigma, centered)
    return 0.5 * ((kh - lh) ** 2).sum((-1, -2))


def mmd_upper_bound(x, y, kernel: str = "linear", sigma: Sigma = None, centered: bool = True) -> torch.Tensor:
    """(n^2/2) (mean K^ - mean L^)^2, the MMD-type term between the two relation
    distributions that gram_discrepancy bounds from above (Jensen). It is exactly
    0 for centred Grams (H1 = 0) and informative for uncentred ones."""
    kh, lh = _normalised(x, kernel, sigma, centered), _normalised(y, kernel, sigma, centered)
    n = kh.shape[-1]
    return 0.5 * n * n * (kh.mean((-1, -2)) - lh.mean((-1, -2))) ** 2


def official_alignment(x, y, l2_norm: bool = False) -> torch.Tensor:
    """The official RCKA code's alignment, transcribed: uncentred linear Grams,
    optional row scaling by 1/sqrt(diag) (rows only), tr(K L^T)/sqrt(tr(K K^T) tr(L L^T))."""
    k, l = gram(x), gram(y)
    if l2_norm:
        k = k / torch.sqrt(torch.diagonal(k, dim1=-2, dim2=-1))[..., :, None]
        l = l / torch.sqrt(torch.diagonal(l, dim1=-2, dim2=-1))[..., :, None]
    kl = (k * l).sum((-1, -2))
    return kl / torch.sqrt((k * k).sum((-1, -2)) * (l * l).sum((-1, -2)))

