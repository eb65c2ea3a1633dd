"""Naive transcriptions of the CKA/MMD code people run today: the baselines.

They are written the way that code is written (n x n Gram matrices, traces of
n x n products, an explicit centring matrix), in the input dtype, with plain
autograd, so the benchmarks measure what a user would replace. They are not
the oracle: values are checked against ``rcka_kernels.reference`` (float64),
which tests and benchmarks share.

- ``official_alignment``: the official RCKA code's ``CenterKernelAlignment``
  (Zhou et al., IJCAI 2024): uncentred linear Grams, optional row scaling by
  1/sqrt(diag), tr(K L^T) / sqrt(tr(K K^T) tr(L L^T)); its loss is
  ``-weight * alignment``. A different quantity from CKA (no centring); its
  float64 definition is ``rcka_kernels.reference.official_alignment``.
- ``textbook_cka``: HSIC = tr(K H L H) / (n-1)^2 with H = I - 11^T/n built
  explicitly, as in textbooks and several CKA packages (O(n^3) time).
- ``centred_cka``: Kornblith et al.'s recipe (centre the Grams by their
  means, then a Frobenius inner product): O(n^2) time and memory; also the
  debiased (U-centred) estimator.
- ``mmd2``: the squared MMD from three explicit kernel matrices.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    return (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2.0 * a @ b.T


def median_sigma2(x: Tensor) -> Tensor:
    """Kornblith's bandwidth: the median squared distance (torch.median, no grad)."""
    with torch.no_grad():
        return torch.median(_sq_dists(x, x).clamp_min(0))


def gram(x: Tensor, kernel: str = "linear", sigma2=None) -> Tensor:
    if kernel == "linear":
        return x @ x.T
    d = _sq_dists(x, x).clamp_min(0)
    s2 = median_sigma2(x) if sigma2 is None else sigma2
    return torch.exp(-d / (2.0 * s2))


def official_alignment(x: Tensor, y: Tensor, l2_norm: bool = False) -> Tensor:
    """The official RCKA alignment, transcribed (linear kernel, no centring)."""
    gx, gy = x @ x.T, y @ y.T
    if l2_norm:
        gx = gx / torch.sqrt(torch.diag(gx)[:, None])
        gy = gy / torch.sqrt(torch.diag(gy)[:, None])
    num = torch.trace(gx @ gy.T)
    return num / torch.sqrt(torch.trace(gx @ gx.T) * torch.trace(gy @ gy.T))


def _hsic_explicit_h(k: Tensor, l: Tensor) -> Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


def textbook_cka(x: Tensor, y: Tensor, kernel: str = "linear", sigma2=None) -> Tensor:
    """Biased CKA with the centring matrix H built and multiplied (O(n^3))."""
    k, l = gram(x, kernel, sigma2), gram(y, kernel, sigma2)
    return _hsic_explicit_h(k, l) / torch.sqrt(_hsic_explicit_h(k, k) * _hsic_explicit_h(l, l))


def _centre(k: Tensor, debiased: bool) -> Tensor:
    n = k.shape[0]
    if not debiased:
        r = k.mean(0)
        return k - r[:, None] - r[None, :] + r.mean()
    k = k - torch.diag(torch.diag(k))
    r = k.sum(0) / (n - 2)
    u = k - r[:, None] - r[None, :] + r.sum() / (n - 1)
    return u - torch.diag(torch.diag(u))


def centred_cka(x: Tensor, y: Tensor, kernel: str = "linear", debiased: bool = False, sigma2=None) -> Tensor:
    """Kornblith et al.'s CKA: mean-centred (or U-centred) Grams, Frobenius inner products."""
    kc = _centre(gram(x, kernel, sigma2), debiased)
    lc = _centre(gram(y, kernel, sigma2), debiased)
    return (kc * lc).sum() / (torch.linalg.norm(kc) * torch.linalg.norm(lc))


def mmd2(x: Tensor, y: Tensor, sigma2, unbiased: bool = False) -> Tensor:
    """Squared RBF MMD from the three explicit kernel matrices."""
    kxx = torch.exp(-_sq_dists(x, x).clamp_min(0) / (2.0 * sigma2))
    kyy = torch.exp(-_sq_dists(y, y).clamp_min(0) / (2.0 * sigma2))
    kxy = torch.exp(-_sq_dists(x, y).clamp_min(0) / (2.0 * sigma2))
    if not unbiased:
        return kxx.mean() + kyy.mean() - 2.0 * kxy.mean()
    n, m = x.shape[0], y.shape[0]
    return (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2.0 * kxy.mean()
