"""From sufficient statistics to HSIC and CKA: the one home of these formulas.

Every caller (the functional API, the linear op, the distributed statistics and
``rk.compare``) turns its own sums into HSIC and CKA here, so the biased and
debiased normalisations and the degenerate/NaN rules are written once.

For two n x n Gram matrices A, B the four sums are
    ab = <A, B> = sum_ij A_ij B_ij,   rr = (A 1).(B 1),   ta = 1'A1,   tb = 1'B1,
taken over the full Grams for the biased estimator and over the Grams with their
diagonals set to 0 for the debiased one (Song et al. 2012). Then

    biased    HSIC = [ab - (2/n) rr + ta tb / n^2] / (n-1)^2          (= tr(AHBH) / (n-1)^2)
    debiased  HSIC = [ab + ta tb / ((n-1)(n-2)) - (2/(n-2)) rr] / (n (n-3))

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),

and CKA is 0 where an input is degenerate (no variation) or a self-term is not
positive (possible for the debiased estimator at tiny n); NaN in any term (an
unchecked non-finite input) stays NaN.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Tensor = torch.Tensor
Number = Union[float, Tensor]


def min_rows(debiased: bool) -> Tuple[int, str]:
    """The fewest samples each estimator takes, and why (for error messages)."""
    if debiased:
        return 4, " for the debiased (unbiased HSIC) estimator, which divides by n(n-3)"
    return 2, " (HSIC divides by (n-1)^2)"


def normaliser(n: int, debiased: bool) -> float:
    """The HSIC estimators' denominators: (n-1)^2 (biased) or n (n-3) (debiased)."""
    return float(n * (n - 3)) if debiased else float((n - 1) ** 2)


def hsic(ab: Number, rr: Number, ta: Number, tb: Number, n: int, debiased: bool) -> Number:
    """HSIC of two Grams from the sums of the module docstring (full Grams when biased,
    zero-diagonal Grams when debiased). Works on tensors of any shape and on floats."""
    if debiased:
        return (ab + ta * tb / ((n - 1) * (n - 2)) - (2.0 / (n - 2)) * rr) / normaliser(n, True)
    return (ab - (2.0 / n) * rr + ta * tb / (n * n)) / normaliser(n, False)


def self_term_ok(h: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Where a self-term HSIC(K, K) is large enough to divide by in ``dtype``: the gradient
    of CKA grows like HSIC(K, K)^(-3/2), which overflows when K is numerically the identity
    (e.g. an RBF bandwidth far below the distances), where CKA means nothing anyway."""
    return h > torch.finfo(dtype).tiny


def cka_scale(kk: Tensor, ll: Tensor, dtype: torch.dtype = torch.float64, guarded: bool = True) -> Tensor:
    """r = (kk ll)^(-1/2), so that CKA = kl r for self-terms kk = HSIC(K, K), ll = HSIC(L, L) and
    cross term kl = HSIC(K, L) (or any one positive multiple of all three), in ``dtype``: kk ll is
    clamped at its smallest normal number, and r is 0 where a self-term is not ``self_term_ok``
    (NaN included). ``guarded=False`` skips that rule (two ops): for callers whose self-terms are
    >= 0 and 0 only where their cross term is exactly 0 too (the linear op's biased estimator), r
    is then finite and the value the same."""
    r = (kk * ll).clamp_min(torch.finfo(dtype).tiny).rsqrt()
    return torch.where(self_term_ok(torch.minimum(kk, ll), dtype), r, 0.0) if guarded else r


def cka(hxy: Tensor, hxx: Tensor, hyy: Tensor, degenerate: Optional[Tensor] = None,
        dtype: torch.dtype = torch.float64, with_scale: bool = False):
    """CKA from the three HSIC terms (broadcasting: hxx may be (La, 1) and hyy (1, Lb)),
    0 where ``degenerate`` or a self-term is not ``self_term_ok`` in ``dtype`` (the
    dtype the value is computed in); NaN in any term stays NaN. ``with_scale``: returns
    (CKA, r) with r = dCKA/dHSIC(K, L), the ``cka_scale`` (0 where CKA is)."""
    r = cka_scale(hxx, hyy, dtype)
    if degenerate is not None:
        r = torch.where(degenerate, 0.0, r)
    value = hxy * r + 0.0 * (hxy + hxx + hyy)
    return (value, r) if with_scale else value


def alignment(kl: Tensor, kk: Tensor, ll: Tensor) -> Tensor:
    """The uncentred alignment <K,L> / sqrt(<K,K> <L,L>) (the official RCKA code's), 0 where
    an input's Gram is 0."""
    ok = (kk > 0) & (ll > 0)
    return torch.where(ok, kl / torch.sqrt(torch.where(ok, kk * ll, torch.ones_like(kk))), torch.zeros_like(kl))
