"""Linear-kernel HSIC, CKA and uncentred alignment: one autograd op, closed-form backward.

    functional.py (checks, dispatch) -> linear_alignment (here) -> backend products
    (ops/_contract.py: linear_stats_saving, linear_stats_backward) -> kernels

This file is the definition of the op's arithmetic; the native op
(rcka_kernels/csrc/native.cpp) implements the same steps, function for
function, and tests/test_linear.py holds the two to each other.

Forward (``_forward``), for groups x (G, n, p), y (G, n, q):
 1. Prepare (``_prepare``): centre the columns (not for the uncentred alignment) and
    divide each group by s, its largest |entry| after centring, so every
    entry lies in [-1, 1]: the products can neither overflow nor underflow, whatever
    the scale of the input, and CKA does not see s. s = 0 exactly when all rows are
    equal (uncentred: x = 0): the inputs become 0 and the value is 0. s is NaN or Inf
    exactly when the input holds NaN or Inf, and NaN then reaches the value.
    Same-shaped small x and y are stacked into one (2G, n, p) tensor, so every step
    is one op for both.
 2. Products (``_products``): the backend's S = [[<K,K>, <K,L>], [<L,K>, <L,L>]] of the
    prepared inputs (feature or sample space, whichever is cheaper) and what its
    backward reuses. Debiased (Song et al. 2012), S holds n (n-3) times the unbiased
    HSIC terms instead: in sample space <K_u, L_u> of the U-centred Grams, formed in
    float64 from the Grams' own entries (``torch_backend.debiased_products``), so the
    diagonals the estimator cancels never enter a sum (their share grows with p);
    in feature space, where it does not, S corrected by the diagonals (``debias``).
 3. Value (``value``): hsic = S_kl (s_x s_y)^2 / N with N = ``estimators.normaliser``;
    cka = S_kl / sqrt(S_kk S_ll), and 0 where a self-term is not positive.
Backward: dv/dS in closed form (``coefficients``) -> the backend's vector-Jacobian
product (2 gkl L X + 4 gkk K X; K_u, L_u in place of K, L in debiased sample space,
whose rows sum to 0) -> in feature space, debiased, the diagonal terms 2 gd_i u_i and
the centring projection (their columns do not sum to 0) -> times 1/s (the value is
homogeneous in each input's scale, so this is exact). An input that does not require
grad gets no gradient work. A backward that runs with grad mode on (create_graph=True)
instead differentiates a recomputation of the forward with autograd recording
(``stats.recomputed_grads``), so the gradient can be differentiated again.

On the torch backend the same arithmetic runs natively (a C++ autograd function
registered as rcka_native::linear_alignment) when it is built; the Python version
here runs otherwise, for the compiled backends and under torch.compile. It is a
``torch.autograd.Function`` rather than a Python ``torch.library`` custom op: the
forward hands the backward a dozen intermediates (the prepared inputs, the products,
S), which a custom op could only pass as extra outputs, and a custom op adds a fixed
cost per call that is a visible share of the loss at the paper's batch sizes.
torch.compile traces it (the torch backend is plain torch ops); the compiled backends
are reached through their custom ops (ops/stats.py), opaque to the tracer with fake
kernels.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _native, estimators
from .._validate import _is_compiling, non_finite_error
from .._validate import autocast_off as _autocast_off
from . import stats as _stats
from . import torch_backend

Tensor = torch.Tensor

# ----------------------------------------------------------------------------- prepare


_SMALL = 1 << 16  # entries below which op count, not memory traffic, sets the time


def _scale(z: Tensor, centered: bool, owned: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(u, s, inv): groups z (B, n, f) centred (if asked) and times inv = 1/s with
    s = max |entry| after centring, per group (B, 1, 1); inv = 0 where s = 0. The
    first row is subtracted before the mean, so a column whose rows are all equal
    becomes exactly 0 (a mean alone would leave its rounding error). ``owned``: z
    is a buffer of ours, worked on in place (a fresh n x p buffer costs memory, and
    at large n more time than the arithmetic on it). s and inv are constants to
    autograd (a recomputation under autograd differentiates through u only, which is
    exact: the value is homogeneous in each input's scale)."""
    if z.dtype not in (torch.float32, torch.float64):  # half inputs: everything in float32
        z, owned = z.float(), True
    if centered:
        z = z.sub_(z[:, :1].clone()) if owned else z - z[:, :1]
        z.sub_(z.mean(1, keepdim=True))
    elif not owned:
        z = z.clone()
    with torch.no_grad():
        if z.shape[0] * z.shape[1] * z.shape[2] < _SMALL:
            s = z.abs().amax((1, 2), keepdim=True)
        else:  # no n x p temporary
            s = torch.maximum(z.amax((1, 2), keepdim=True), z.amin((1, 2), keepdim=True).neg_())
        inv = safe_reciprocal(s)
    return z.mul_(inv), s, inv


def _prepare(x: Tensor, y: Tensor, centered: bool):
    """(u, w, s, inv) for x (..., n, p), y (..., n, q); s and inv (2G, 1, 1) hold
    each group's x then y. Small same-shaped inputs come back as one tensor u
    (2G, n, p), each group's x and y side by side, and w None: every step is then
    one op for both. Large ones stay apart, so that a half not needed by the
    backward can be freed."""
    n = x.shape[-2]
    if x.shape == y.shape and 2 * x.numel() < _SMALL:
        z = torch.stack([x, y], -3)
        u, s, inv = _scale(z if z.dim() == 3 else z.view(-1, n, x.shape[-1]), centered, True)
        return u, None, s, inv
    (u, sx, ix), (w, sy, iy) = (_scale(t.reshape(-1, n, t.shape[-1]), centered, False) for t in (x, y))
    return u, w, torch.stack([sx, sy], 1).view(-1, 1, 1), torch.stack([ix, iy], 1).view(-1, 1, 1)


def _halves(u: Tensor, w: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return (u[0::2], u[1::2]) if w is None else (u, w)


# ----------------------------------------------------------------------------- products


def _debias_terms(n: int):
    return n / (n - 2), 1.0 / ((n - 1) * (n - 2))


def debias(s: Tensor, dd: Tensor, t: Tensor, n: int) -> Tensor:
    """n (n-3) HSIC_u for each pair of K, L from S (G, 2, 2) of centred inputs, the
    diagonals' Gram dd = d d^T (G, 2, 2) of d = (diag K, diag L) and their sums t (G, 2, 1):
    K 1 = 0, so the zero-diagonal sums of ``estimators`` are <K,L> - d.e, -t_k, -d and
        n (n-3) HSIC_u(K, L) = <K,L> - c1 d.e + c2 t_k t_l,  c1 = n / (n-2), c2 = 1 / ((n-1)(n-2))."""
    c1, c2 = _debias_terms(n)
    return torch.add(s, torch.add(t * t.mT, dd, alpha=-c1 / c2), alpha=c2)


def _feature_space(u: Tensor, w: Optional[Tensor]) -> bool:
    return torch_backend.use_feature_space(u.shape[1], u.shape[2], u.shape[2] if w is None else w.shape[2])


def _products(u, w, backend: str, dtype: torch.dtype, debiased: bool):
    """(S (G, 2, 2) in the compute dtype, saved, d, t): S of the prepared inputs from
    the backend, for the debiased estimator n (n-3) times the unbiased HSIC terms. In
    sample space those come from the U-centred Grams (``torch_backend.debiased_products``,
    whatever the backend: the compiled backends' sums hold the diagonals that the
    estimator cancels; d, t None); otherwise S is corrected by the diagonals d (G, 2, n)
    with sums t (``debias``), which the backward then needs. The torch backend is called
    directly (it takes the stacked pair); compiled backends through their custom op, in
    the input dtype (the prepared entries lie in [-1, 1])."""
    if debiased and not _feature_space(u, w):
        return (*torch_backend.debiased_products(u, w), None, None)
    if backend == "torch":
        s, saved = torch_backend.linear_stats_saving(u, w)
    else:
        a, b = (t.to(dtype).contiguous() for t in _halves(u, w))
        kl, kk, ll = _stats.linear_stats(a, b, backend).to(u.dtype).unbind(1)
        s, saved = torch_backend.gram_of_grams(kl, kk, ll), ()
    if not debiased:
        return s, saved, None, None
    n = u.shape[1]
    sq = [torch.linalg.vector_norm(h, dim=-1).square() for h in ((u,) if w is None else (u, w))]
    d = sq[0].view(-1, 2, n) if w is None else torch.stack(sq, 1)  # (G, 2, n): diag K, diag L
    t = d.sum(-1, keepdim=True)
    return debias(s, d @ d.mT, t, n), saved, d, t


def _products_backward(a, b, g, saved, backend: str, need, dtype: torch.dtype):
    """The backend's vector-Jacobian product for g = (gkl, gkk, gll), each (G, 1, 1) or
    None, at the prepared inputs a, b (G, n, p), (G, n, q)."""
    if backend == "torch":
        return torch_backend.linear_stats_backward(a, b, g, saved, need)
    zero = next(c for c in g if c is not None) * 0
    g3 = torch.cat([zero if c is None else c for c in g], 1)[:, :, 0].double()
    cd = a.dtype
    da, db = _stats.linear_stats_backward(a.to(dtype).contiguous(), b.to(dtype).contiguous(), g3, backend)
    return tuple(d.to(cd) if want else None for d, want in zip((da, db), need))


# ----------------------------------------------------------------------------- value and its derivative


def value(s: Tensor, scale: Tensor, statistic: str, n: int, debiased: bool):
    """(kk, ll, r, v), each (G, 1, 1): the statistic v = kl r from S (G, 2, 2) of the
    prepared inputs (debiased: n (n-3) times the unbiased HSIC terms), with
    r = ``estimators.cka_scale`` (cka; guarded for the debiased estimator only: the biased
    self-terms are >= 0, and 0 only for a degenerate input, whose kl is then exactly 0)
    or (s_x s_y)^2 / ``estimators.normaliser`` (hsic).
    scale (2G, 1, 1): each group's s_x, s_y (hsic). Out of place: autograd can record it."""
    kk, kl, ll = s[:, :1, :1], s[:, :1, 1:], s[:, 1:, 1:]
    if statistic == "hsic":
        r = scale.view(-1, 2).prod(1).square().div(estimators.normaliser(n, debiased)).view(-1, 1, 1)
    else:
        r = estimators.cka_scale(kk, ll, s.dtype, guarded=debiased)
    return kk, ll, r, kl * r


def coefficients(gv: Tensor, kk, ll, r, v, statistic: str, need, diagonals: bool):
    """g = (gkl, gkk, gll) = gv dv/dS, each (G, 1, 1) or None where not needed:
    dv/dkl = r; cka (v = kl r): dv/dkk = -v r^2 ll / 2, dv/dll = -v r^2 kk / 2."""
    gkl = gv * r
    if statistic != "cka":
        return gkl, None, None
    h = (v * r).mul_(gkl).mul_(-0.5)  # dv/dkk = h ll, dv/dll = h kk
    return gkl, h * ll if need[0] or diagonals else None, h * kk if need[1] or diagonals else None


def add_diagonal_grad(grads, halves, g, d: Tensor, t: Tensor, n: int) -> None:
    """grads[i] += 2 (dv/dd_i) u_i in place for the inputs being differentiated: the
    share of the diagonals d (G, 2, n) of K and L in ``debias``, with
    dv/dd = -c1 gs d + c2 (gs t) 1', gs = [[2 gkk, gkl], [gkl, 2 gll]]."""
    gkl, gkk, gll = g
    c1, c2 = _debias_terms(n)
    zero = gkl * 0
    gs = torch.cat([2 * gkk if gkk is not None else zero, gkl, gkl, 2 * gll if gll is not None else zero], 1).view(-1, 2, 2)
    gd = torch.add((gs @ t) * c2, gs @ d, alpha=-c1)
    for i, ui in enumerate(halves):
        if grads[i] is not None:
            grads[i].addcmul_(gd[:, i, :, None], ui, value=2.0)


def save(ctx, *tensors: Optional[Tensor]) -> None:
    """ctx.save_for_backward of tensors some of which may be None, which ``saved`` gives
    back in place: None is not handed to autograd (under torch.compile, torch 2.4 drops
    it from ctx.saved_tensors, shifting what follows)."""
    ctx.present = tuple(t is not None for t in tensors)
    ctx.save_for_backward(*(t for t in tensors if t is not None))


def saved(ctx) -> list:
    it = iter(ctx.saved_tensors)
    return [next(it) if p else None for p in ctx.present]


def safe_reciprocal(s: Tensor) -> Tensor:
    """1 / s, and 0 where s = 0 (an input that is all zero after preparation stays 0);
    NaN input still reaches the prepared values through the data."""
    return torch.reciprocal(s).nan_to_num_(posinf=0.0)


# ----------------------------------------------------------------------------- the op


def _forward(x: Tensor, y: Tensor, statistic: str, centered: bool, debiased: bool, backend: str):
    """The op's forward, steps 1-4 of the module docstring: (u, w, inv, saved, d, t, kk, ll, r, v)."""
    u, w, scale, inv = _prepare(x, y, centered)
    s, products, d, t = _products(u, w, backend, x.dtype, debiased)
    return (u, w, inv, products, d, t, *value(s, scale, statistic, x.shape[-2], debiased))


class _LinearAlignment(torch.autograd.Function):
    """x (..., n, p), y (..., n, q) -> (...): the shapes are handled here, so the
    autograd graph holds this one node."""

    @staticmethod
    def forward(ctx, x, y, statistic: str, centered: bool, debiased: bool, backend: str):
        u, w, inv, products, d, t, kk, ll, r, v = _forward(x, y, statistic, centered, debiased, backend)
        ctx.statistic, ctx.centered, ctx.debiased, ctx.backend, ctx.dtype = statistic, centered, debiased, backend, x.dtype
        halves = _halves(u, w)
        if len(products) == 2 and d is None:  # sample space: an input is used only for its own gradient
            halves = tuple(h if want else None for h, want in zip(halves, ctx.needs_input_grad[:2]))
        save(ctx, x, y, *halves, inv, kk, ll, r, v, d, t, *products)
        return v.view(x.shape[:-2])

    @staticmethod
    @_autocast_off  # a backward run inside autocast: its products stay in the compute dtype
    def backward(ctx, gv):
        x, y, a, b, inv, kk, ll, r, v, d, t, *products = saved(ctx)
        need = ctx.needs_input_grad[:2]
        if not (need[0] or need[1]):
            return None, None, None, None, None, None
        if torch.is_grad_enabled():
            def fn(x, y):
                return _forward(x, y, ctx.statistic, ctx.centered, ctx.debiased, "torch")[-1].view(x.shape[:-2])

            return (*_stats.recomputed_grads((x, y), gv, need, fn), None, None, None, None)
        one = need[0] != need[1]
        gv = gv.reshape(-1, 1, 1)
        if one:  # fold the one input's 1/s into the small coefficients
            gv = gv * inv[0 if need[0] else 1::2]
        g = coefficients(gv, kk, ll, r, v, ctx.statistic, need, d is not None)
        backend = "torch" if ctx.debiased and d is None else ctx.backend  # as _products
        grads = list(_products_backward(a, b, g, products, backend, need, ctx.dtype))
        if d is not None:
            add_diagonal_grad(grads, (a, b), g, d, t, d.shape[-1])
            if ctx.centered:  # through the centring u = (x - mean) / s: the diagonals' share has nonzero column sums
                for gi in grads:
                    if gi is not None:
                        gi.sub_(gi.mean(1, keepdim=True))
        if not one:
            grads = [grads[0].mul_(inv[0::2]), grads[1].mul_(inv[1::2])]
        out = []
        for gi, inp in zip(grads, (x, y)):
            if gi is not None:
                gi = gi.view(inp.shape) if gi.dtype == ctx.dtype else gi.to(ctx.dtype).view(inp.shape)
            out.append(gi)
        return out[0], out[1], None, None, None, None


def linear_alignment(x: Tensor, y: Tensor, statistic: str, centered: bool, debiased: bool, backend: str,
                     check: Optional[str] = None, compiling: Optional[bool] = None) -> Tensor:
    """Linear-kernel ``statistic`` ("cka" or "hsic") of checked x (..., n, p),
    y (..., n, q) -> (...), in the compute dtype. ``centered=False``: the uncentred
    alignment |X^T Y|^2 / (|X^T X| |Y^T Y|) (statistic "cka", biased only).
    ``check``: the caller's name, to raise ValueError in its name when the value is
    NaN (exactly when the input holds NaN or Inf); None: NaN is returned.

    The torch backend runs the native op (rcka_kernels/csrc/: this arithmetic in C++)
    when it is built, except while torch.compile traces (it traces the Function);
    ``compiling``: whether it does, if the caller knows."""
    if compiling is None:
        compiling = _is_compiling()
    native = _native.op() if backend == "torch" and not compiling else None
    if native is not None:  # it raises non_finite_error(check)'s message itself
        return native(x, y, _native.STATISTICS[statistic], centered, debiased, check)
    v = _LinearAlignment.apply(x, y, statistic, centered, debiased, backend)
    if check is not None and bool(torch.isnan(v).any()):
        raise non_finite_error(check)
    return v


def axis_pair_alignment(xs: Tensor, ys: Tensor, xc: Tensor, yc: Tensor, ws: float, wc: float, offset: float,
                        centered: bool, backend: str, check: Optional[str] = None) -> Tensor:
    """offset + ws A(xs, ys) + wc A(xc^T, yc^T) for checked (N, P) inputs, A the linear
    CKA (``centered``) or the uncentred alignment: RCKA's sample and class axes. This is
    two calls of ``linear_alignment``; the native op, where it runs, computes the same
    from the same pieces (prepare, products, value, backward) in one autograd node."""
    native = _native.pair_op() if backend == "torch" and not _is_compiling() else None
    if native is not None:
        return native(xs, ys, xc, yc, ws, wc, offset, centered, check)
    vs = linear_alignment(xs, ys, "cka", centered, False, backend, check)
    vc = linear_alignment(xc.mT, yc.mT, "cka", centered, False, backend, check)
    return offset + ws * vs + wc * vc
