"""The public functions: argument checks, dispatch, and the formulas that turn
sufficient statistics into HSIC, CKA and MMD (once, for every backend).

Shapes: ``x`` is ``(n, p)`` or ``(..., n, p)`` and ``y`` is ``(n, q)`` or
``(..., n, q)`` with the same leading (batch) dims; a scalar comes back per
group, so batch dims ``(G,)`` give a ``(G,)`` result in one call. The result is
in the input dtype for float32/float64 inputs and float32 for float16/bfloat16
inputs (statistics are accumulated in float32, float64 for float64 inputs).
Inputs of two floating dtypes are computed as if both were the wider one, and
inside ``torch.autocast`` the functions run with autocast off (``_validate``:
the precision policy), so a call inside an autocast region gives the value of
the same call outside it.

Degenerate inputs: if every row of ``x`` (or ``y``) is the same, there is no
variation to align and ``hsic`` and ``cka`` return 0 (with zero gradient); CKA is
also 0 where a self-term HSIC(K, K) is not positive (possible for the debiased
estimator at tiny n). NaN/Inf inputs raise ``ValueError`` on the CPU and give NaN
on a GPU, where checking would cost a host synchronisation (see ``config``).

Scale: linear CKA and the alignment do not depend on the scale of either input,
and are computed so that they do not, in every precision (each group is rescaled
into [-1, 1] before any product); HSIC scales as the product of the squared scales.
"""

from __future__ import annotations

import math
from typing import Union

import torch

from . import _bandwidth, _dispatch, _validate, estimators, reference
from .ops import stats as _ops
from .ops.linear import linear_alignment
from .ops.torch_backend import block_elems, center_columns, compute_dtype, dense_rbf_grams, gram_matrix, stacked_rows, use_feature_space

Tensor = torch.Tensor
Sigma = Union[None, float, str, Tensor]

__all__ = [
    "hsic",
    "cka",
    "cka_loss",
    "mmd",
    "gram",
    "centered_gram",
    "gram_discrepancy",
    "mmd_upper_bound",
]


def _as_groups(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-2], t.shape[-1]).contiguous()


def _gamma(x3: Tensor, sigma: Sigma) -> Tensor:
    return 0.5 / _bandwidth.sigma2(x3, "median" if sigma is None else sigma)


def _prepare(fn, x, y, kernel, sigma, backend, *, same_rows, same_cols, min_rows, why="", finite=True):
    """(backend name, x, y): the checks, with x and y promoted to their common dtype."""
    x, y = _validate.promote(x, y)
    _validate.check_pair(fn, x, y, same_rows=same_rows, same_cols=same_cols, min_rows=min_rows, why=why, finite=finite)
    _validate.check_kernel(fn, kernel, sigma)
    _validate.check_sigma_tensor(fn, sigma, x.shape[:-2], x.device)
    name = _dispatch.resolve(backend, x.device, kernel)
    if name == "reference" and not finite:  # the other backends' statistics report NaN/Inf themselves
        _validate.check_finite(fn, x, y)
    return name, x, y


def _linear(fn, x, y, statistic, centered, debiased, backend, min_rows, why, ref):
    """The linear kernel's path of hsic, cka, official_alignment and gram_discrepancy:
    the checks, dispatch and one op (ops/linear.py), with as little Python as it
    takes (at the paper's batch sizes each call's interpreter time is a visible
    share of the loss); ``ref(x, y)`` computes the value on the reference backend."""
    if not _validate.plain_pair(x, y, min_rows):  # anything unusual (mixed dtypes too): the full checks
        x, y = _validate.promote(x, y)
        _validate.check_pair(fn, x, y, same_rows=True, same_cols=False, min_rows=min_rows, why=why, finite=False)
    name = _dispatch.resolve(backend, x.device, "linear")
    if name == "reference":
        _validate.check_finite(fn, x, y)
        return ref(x, y).to(compute_dtype(x.dtype))
    compiling = _validate._is_compiling()
    check = fn if _validate.wants_finite_check(x.device, compiling) else None
    return linear_alignment(x, y, statistic, centered, debiased, name, check, compiling)


# ----------------------------------------------------------------------------- HSIC / CKA


def _hsic_from_stats(s: Tensor, ra: Tensor, rb: Tensor, da: Tensor, db: Tensor, n: int, debiased: bool) -> Tensor:
    """HSIC of two Grams A, B from off-diagonal statistics (all float64):
    s = sum_{i != j} A_ij B_ij, row sums r_i = sum_{j != i} A_ij, diagonals d
    (the diagonals are added back for the biased estimator; see ``estimators``)."""
    if not debiased:
        s = s + (da * db).sum(-1)
        ra, rb = ra + da, rb + db
    return estimators.hsic(s, (ra * rb).sum(-1), ra.sum(-1), rb.sum(-1), n, debiased)


def _dense_fits(x: Tensor, backend: str) -> bool:
    """Whether the torch backend forms the whole n x n RBF Grams of the G groups of x (..., n, p):
    when they are no larger than one tile of its streamed path (``block_elems``), streaming
    would hold as much at once and add only work (the bandwidth's selection passes, a
    backward that recomputes the tiles). Read from the shape alone."""
    n = x.shape[-2]
    return backend == "torch" and math.prod(x.shape[:-2]) * n * n <= block_elems()


def _rbf(x: Tensor, y: Tensor, sigma: Sigma, debiased: bool, backend: str, fn: str, cka: bool) -> Tensor:
    """RBF CKA (``cka``) or HSIC of x (..., n, p) and y (..., n, q), x.shape[:-2] in the compute
    dtype, 0 where an input has no variation: from the whole Grams where they fit
    (``_dense_fits``; ops/stats.py's dense op, with its gradient in closed form), else from the
    backend's streamed statistics (diagonals left out, see ops/_contract.py)."""
    if _dense_fits(x, backend):  # the op reads NaN/Inf off its statistics
        check = fn if _validate.wants_finite_check(x.device) else None
        return _ops.dense_rbf(x, y, "median" if sigma is None else sigma, debiased, cka, check)
    x3, y3 = _as_groups(x), _as_groups(y)
    cx, cy = _validate.scan_groups(fn, x3, y3)
    degenerate = cx | cy
    n = x3.shape[1]
    s, rx, ry = _ops.rbf_stats(center_columns(x3), center_columns(y3), _gamma(x3, sigma), _gamma(y3, sigma), backend)
    rx, ry = rx.double(), ry.double()
    dx = dy = torch.ones_like(rx)  # the unit diagonal, left out of the contract's sums
    out = _hsic_from_stats(s[:, 0], rx, ry, dx, dy, n, debiased)
    if cka:
        hxx = _hsic_from_stats(s[:, 1], rx, rx, dx, dx, n, debiased)
        hyy = _hsic_from_stats(s[:, 2], ry, ry, dy, dy, n, debiased)
        out = estimators.cka(out, hxx, hyy, degenerate, compute_dtype(x3.dtype))
    out = out.to(compute_dtype(x.dtype)).reshape(x.shape[:-2])
    return out if cka else torch.where(degenerate.view(out.shape), torch.zeros_like(out), out)


@_validate.autocast_off
def hsic(x: Tensor, y: Tensor, *, kernel: str = "linear", sigma: Sigma = None, debiased: bool = False, backend: str = "auto") -> Tensor:
    """Hilbert-Schmidt independence criterion of x (..., n, p) and y (..., n, q).

    ``debiased=False``: tr(K H L H) / (n-1)^2. ``debiased=True``: Song et al.'s
    unbiased estimator (n >= 4). ``kernel``: "linear" or "rbf" with ``sigma`` a
    float, a tensor (one per group), "median" (default) or "mean".
    Returns shape ``x.shape[:-2]``.
    """
    _validate.check_flag("hsic", "debiased", debiased)
    m, why = estimators.min_rows(debiased)
    if kernel == "linear" and sigma is None:
        return _linear("hsic", x, y, "hsic", True, debiased, backend, m, why, lambda a, b: reference.hsic(a, b, kernel, sigma, debiased))
    name, x, y = _prepare("hsic", x, y, kernel, sigma, backend, same_rows=True, same_cols=False, min_rows=m, why=why, finite=False)
    if name == "reference":
        return reference.hsic(x, y, kernel, sigma, debiased).to(compute_dtype(x.dtype))
    return _rbf(x, y, sigma, debiased, name, "hsic", False)


@_validate.autocast_off
def cka(x: Tensor, y: Tensor, *, kernel: str = "linear", sigma: Sigma = None, debiased: bool = False, backend: str = "auto") -> Tensor:
    """Centered kernel alignment HSIC(K,L) / sqrt(HSIC(K,K) HSIC(L,L)).

    x (..., n, p), y (..., n, q) -> x.shape[:-2]. ``debiased=True`` uses the
    unbiased HSIC (Kornblith et al.'s debiased CKA). Linear CKA costs
    O(n (p + q)^2) in feature space or O(n^2 (p + q)) in sample space, whichever
    is cheaper; RBF CKA streams over blocks of the Gram matrices, or forms them
    whole (the gradient in closed form) where they are no larger than one block.
    """
    _validate.check_flag("cka", "debiased", debiased)
    m, why = estimators.min_rows(debiased)
    if kernel == "linear" and sigma is None:
        return _linear("cka", x, y, "cka", True, debiased, backend, m, why, lambda a, b: reference.cka(a, b, kernel, sigma, debiased))
    name, x, y = _prepare("cka", x, y, kernel, sigma, backend, same_rows=True, same_cols=False, min_rows=m, why=why, finite=False)
    if name == "reference":
        return reference.cka(x, y, kernel, sigma, debiased).to(compute_dtype(x.dtype))
    return _rbf(x, y, sigma, debiased, name, "cka", True)


def cka_loss(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    """1 - cka(x, y, **kwargs): the drop-in replacement for naive CKA losses."""
    return 1.0 - cka(x, y, **kwargs)


# ----------------------------------------------------------------------------- Theorem 2


@_validate.autocast_off
def official_alignment(x: Tensor, y: Tensor, *, backend: str = "auto") -> Tensor:
    """The official RCKA code's alignment without row scaling (see ``losses.official_alignment``):
    |X^T Y|_F^2 / (|X^T X|_F |Y^T Y|_F) = tr(K L) / (|K|_F |L|_F) of the uncentred linear
    Grams, x (..., n, p), y (..., n, q) -> x.shape[:-2]; 0 where an input is 0; any n >= 1."""
    return _linear("official_alignment", x, y, "cka", False, False, backend, 1, "", lambda a, b: reference.official_alignment(a, b, False))


def _raw_stats(x3, y3, kernel, sigma, backend):
    """Uncentred sum K∘L, sum K∘K, sum L∘L and totals 1^T K 1, 1^T L 1 (float64)."""
    if kernel == "linear":  # a diagnostic: plain autograd over the feature- or sample-space products, whichever is smaller
        xd, yd = x3.double(), y3.double()
        if use_feature_space(*x3.shape[1:], y3.shape[2]):
            sq = [(m * m).sum((1, 2)) for m in (xd.mT @ yd, xd.mT @ xd, yd.mT @ yd)]
        else:
            k, l = xd @ xd.mT, yd @ yd.mT
            sq = [(k * l).sum((1, 2)), (k * k).sum((1, 2)), (l * l).sum((1, 2))]
        return torch.stack(sq, -1), (xd.sum(1) ** 2).sum(-1), (yd.sum(1) ** 2).sum(-1)
    if _dense_fits(x3, backend):  # the whole Grams, with plain autograd
        rule = "median" if sigma is None else sigma
        z = stacked_rows(x3, y3)
        k = dense_rbf_grams(z.sub_(z.mean(1, keepdim=True)), lambda d: _ops.pair_sigma2(x3, d, rule), False)[0].double().flatten(2)
        s, t = torch.bmm(k, k.mT), k.sum(-1)
        return s.flatten(1)[:, (1, 0, 3)], t[:, 0], t[:, 1]
    # RBF Grams do not change under a translation of the inputs
    s, rx, ry = _ops.rbf_stats(center_columns(x3), center_columns(y3), _gamma(x3, sigma), _gamma(y3, sigma), backend)
    n = x3.shape[1]
    return s + n, rx.double().sum(-1) + n, ry.double().sum(-1) + n  # add the unit diagonal back


@_validate.autocast_off
def gram_discrepancy(x: Tensor, y: Tensor, *, kernel: str = "linear", sigma: Sigma = None, centered: bool = True,
                     backend: str = "auto") -> Tensor:
    """1/2 |K^ - L^|_F^2 with K^ = K~ / |K~|_F, the Frobenius-normalised Gram.

    With centred Grams (default) Theorem 2 of Zhou et al. (2024) gives
    ``gram_discrepancy = 1 - cka`` (biased CKA); with ``centered=False`` it is
    1 - tr(K L) / (|K|_F |L|_F), the uncentred alignment of the official RCKA code.
    It bounds ``mmd_upper_bound`` from above. Shapes as ``cka``.
    """
    _validate.check_flag("gram_discrepancy", "centered", centered)
    if kernel == "linear" and sigma is None:
        ref = lambda a, b: 1.0 - reference.gram_discrepancy(a, b, kernel, sigma, centered)  # noqa: E731  (the alignment, as the op)
        return 1.0 - _linear("gram_discrepancy", x, y, "cka", centered, False, backend, 2, "", ref)
    name, x, y = _prepare("gram_discrepancy", x, y, kernel, sigma, backend, same_rows=True, same_cols=False, min_rows=2, finite=False)
    if name == "reference":
        return reference.gram_discrepancy(x, y, kernel, sigma, centered).to(compute_dtype(x.dtype))
    if centered:
        return 1.0 - _rbf(x, y, sigma, False, name, "gram_discrepancy", True)
    x3, y3 = _as_groups(x), _as_groups(y)
    _validate.scan_groups("gram_discrepancy", x3, y3)
    s, _, _ = _raw_stats(x3, y3, kernel, sigma, name)
    out = 1.0 - estimators.alignment(s[:, 0], s[:, 1], s[:, 2])
    return out.to(compute_dtype(x.dtype)).reshape(x.shape[:-2])


@_validate.autocast_off
def mmd_upper_bound(x: Tensor, y: Tensor, *, kernel: str = "linear", sigma: Sigma = None, centered: bool = True,
                    backend: str = "auto") -> Tensor:
    """(n^2 / 2) (mean K^ - mean L^)^2: the MMD-type term between the two relation
    distributions in Theorem 2 of Zhou et al. (2024). By Jensen's inequality
    ``gram_discrepancy(x, y) >= mmd_upper_bound(x, y)`` (same options). With
    centred Grams the means are exactly 0 (H 1 = 0), so the term is 0; with
    ``centered=False`` (the official code's Grams) it is informative.
    """
    _validate.check_flag("mmd_upper_bound", "centered", centered)
    name, x, y = _prepare("mmd_upper_bound", x, y, kernel, sigma, backend, same_rows=True, same_cols=False, min_rows=2)
    if name == "reference":
        return reference.mmd_upper_bound(x, y, kernel, sigma, centered).to(compute_dtype(x.dtype))
    x3, y3 = _as_groups(x), _as_groups(y)
    n = x3.shape[1]
    if centered:
        return torch.zeros(x.shape[:-2], dtype=compute_dtype(x.dtype), device=x.device)
    s, tx, ty = _raw_stats(x3, y3, kernel, sigma, name)
    ok = (s[:, 1] > 0) & (s[:, 2] > 0)
    mx = torch.where(ok, tx / torch.sqrt(torch.where(ok, s[:, 1], torch.ones_like(tx))), torch.zeros_like(tx))
    my = torch.where(ok, ty / torch.sqrt(torch.where(ok, s[:, 2], torch.ones_like(ty))), torch.zeros_like(ty))
    # mean K^ = (1^T K 1) / (n^2 |K|_F), so (n^2/2)(mean K^ - mean L^)^2 = (mx - my)^2 / (2 n^2)
    out = (mx - my) ** 2 / (2.0 * n * n)
    return out.to(compute_dtype(x.dtype)).reshape(x.shape[:-2])


# ----------------------------------------------------------------------------- MMD


@_validate.autocast_off
def mmd(x: Tensor, y: Tensor, *, kernel: str = "rbf", sigma: Sigma = None, unbiased: bool = False, backend: str = "auto") -> Tensor:
    """Squared maximum mean discrepancy between the rows of x (..., n, d) and y (..., m, d).

    Biased V-statistic mean(K_XX) + mean(K_YY) - 2 mean(K_XY), or the unbiased
    U-statistic (diagonals of K_XX, K_YY left out; n, m >= 2). The "median"/"mean"
    bandwidth is computed on the pooled sample. The linear kernel reduces to
    |mean x - mean y|^2 (biased) and is computed in O((n + m) d) on every backend.
    """
    _validate.check_flag("mmd", "unbiased", unbiased)
    m = 2 if unbiased else 1
    why = " for the unbiased estimator" if unbiased else ""
    name, x, y = _prepare("mmd", x, y, kernel, sigma, backend, same_rows=False, same_cols=True, min_rows=m, why=why)
    if name == "reference":
        return reference.mmd(x, y, kernel, sigma, unbiased).to(compute_dtype(x.dtype))
    x3, y3 = _as_groups(x), _as_groups(y)
    n, mm = x3.shape[1], y3.shape[1]
    # every term is invariant to a common translation: centre on the pooled mean
    shift = torch.cat([x3, y3], 1).mean(1, keepdim=True, dtype=compute_dtype(x3.dtype)).to(x3.dtype)
    xc, yc = x3 - shift, y3 - shift
    if kernel == "linear":
        xd, yd = xc.double(), yc.double()
        sx, sy = xd.sum(1), yd.sum(1)
        s = torch.stack([(sx * sx).sum(-1), (sy * sy).sum(-1), (sx * sy).sum(-1)], -1)
        dx, dy = (xd * xd).sum((1, 2)), (yd * yd).sum((1, 2))
    else:
        gamma = _gamma(torch.cat([x3, y3], 1), sigma)
        s = _ops.rbf_mmd_sums(xc.contiguous(), yc.contiguous(), gamma, name)
        dx, dy = float(n), float(mm)  # the unit diagonals, left out of the kernel's sums
        s = torch.stack([s[:, 0] + dx, s[:, 1] + dy, s[:, 2]], -1)
    if unbiased:
        out = (s[:, 0] - dx) / (n * (n - 1)) + (s[:, 1] - dy) / (mm * (mm - 1)) - 2.0 * s[:, 2] / (n * mm)
    else:
        out = s[:, 0] / (n * n) + s[:, 1] / (mm * mm) - 2.0 * s[:, 2] / (n * mm)
    return out.to(compute_dtype(x.dtype)).reshape(x.shape[:-2])


# ----------------------------------------------------------------------------- Gram matrices


def _check_single(fn, x, kernel, sigma, backend, min_rows):
    _validate.check_tensor(fn, "x", x)
    if x.shape[-2] < min_rows:
        raise ValueError(f"{fn}: x has {x.shape[-2]} samples; at least {min_rows} are needed")
    _validate.check_kernel(fn, kernel, sigma)
    _validate.check_sigma_tensor(fn, sigma, x.shape[:-2], x.device)
    _validate.check_finite(fn, x)
    return _dispatch.resolve(backend, x.device)  # the n x n matrices: the fused Triton pass where it runs


def _gamma_or_zero(x3: Tensor, kernel: str, sigma: Sigma) -> Tensor:
    """gamma (G,) in the compute dtype; 0 (unused) for the linear kernel."""
    if kernel == "rbf":
        return _gamma(x3, sigma).to(compute_dtype(x3.dtype))
    return torch.zeros(x3.shape[0], dtype=compute_dtype(x3.dtype), device=x3.device)


@_validate.autocast_off
def gram(x: Tensor, *, kernel: str = "linear", sigma: Sigma = None, backend: str = "auto") -> Tensor:
    """The Gram matrix K (..., n, n) of the rows of x (..., n, p). It is n x n: for small n."""
    name = _check_single("gram", x, kernel, sigma, backend, 1)
    if name == "reference":
        return reference.gram(x, kernel, sigma).to(compute_dtype(x.dtype))
    x3 = _as_groups(x)
    return gram_matrix(x3, kernel, _gamma_or_zero(x3, kernel, sigma)).reshape(*x.shape[:-1], x.shape[-2])


@_validate.autocast_off
def centered_gram(x: Tensor, *, kernel: str = "linear", sigma: Sigma = None, debiased: bool = False, backend: str = "auto") -> Tensor:
    """H K H (..., n, n) from row and column means (H is never built); with
    ``debiased=True`` the U-centred K (zero diagonal, n >= 4) whose inner
    products give the unbiased HSIC: hsic = <K_u, L_u> / (n (n-3))."""
    _validate.check_flag("centered_gram", "debiased", debiased)
    name = _check_single("centered_gram", x, kernel, sigma, backend, 4 if debiased else 1)
    if name == "reference":
        return reference.centered_gram(x, kernel, sigma, debiased).to(compute_dtype(x.dtype))
    if not _dispatch.provides(name, "centered_gram"):
        name = "torch"
    x3 = _as_groups(x)
    k = _ops.centered_gram(x3, _gamma_or_zero(x3, kernel, sigma), kernel, debiased, name)
    return k.reshape(*x.shape[:-1], x.shape[-2])
