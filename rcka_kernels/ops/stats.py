"""The autograd layer: torch.library custom ops over the backend contract.

Each statistic of ops/_contract.py is one custom op taking the backend's name,
with a fake (meta) implementation so torch.compile traces it without a graph
break. The RBF and MMD statistics register their backward here (itself a custom
op: the backends recompute tiles there; nothing n x n is saved); the linear
statistics' autograd is ops/linear.py. RBF CKA and HSIC at small n (the torch
backend, Grams no larger than one tile) are one autograd Function instead
(``dense_rbf``), which forms the Grams once and the gradient with the value; where
the native ops are built, its steps run in C++ (rcka_native::dense_rbf).

Second derivatives: a backward that runs with grad mode on (create_graph=True)
returns the gradient of a recomputation of its forward with plain torch ops (the
torch backend's), taken by autograd with a graph (``recomputed_grads``), so that
autograd can differentiate it again; the closed-form backwards are first-order only.
"""

# No ``from __future__ import annotations`` here: torch 2.4's custom_op reads the
# annotations as given and does not resolve strings such as "Tensor".
from typing import Tuple

import torch

from .. import _bandwidth, _dispatch, _native, _validate, estimators
from .._validate import autocast_off
from . import torch_backend
from .torch_backend import center_columns, centre_nxn, compute_dtype, gram_matrix

Tensor = torch.Tensor


def recomputed_grads(inputs, grads_out, need, fn) -> list:
    """The gradients of ``fn(*inputs)`` (a tensor or a tuple of them) for the upstream
    ``grads_out`` (likewise; None: zero), one per input in ``need`` (else None), taken by
    autograd on a recomputation with a graph: what a backward returns when it runs with
    grad mode on (create_graph=True), so that the gradient can be differentiated again."""
    with torch.enable_grad():
        outs = fn(*inputs)
    if torch.is_tensor(outs):
        outs, grads_out = (outs,), (grads_out,)
    pairs = [(o, g) for o, g in zip(outs, grads_out) if o.requires_grad and g is not None]
    wanted = [t for t, want in zip(inputs, need) if want]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True, allow_unused=True))
    return [next(got) if want else None for want in need]


# ----------------------------------------------------------------------------- linear
# The compiled backends' linear statistics, as opaque ops for torch.compile. Their
# autograd is ops/linear.py, which calls these in its forward and backward.


@torch.library.custom_op("rcka::linear_stats", mutates_args=())
def linear_stats(x: Tensor, y: Tensor, backend: str) -> Tensor:
    """S (G, 3) float64: |X^T Y|_F^2, |X^T X|_F^2, |Y^T Y|_F^2."""
    return _dispatch.kernels(backend).linear_stats(x, y).double()


@linear_stats.register_fake
def _(x, y, backend):
    return x.new_empty((x.shape[0], 3), dtype=torch.float64)


@torch.library.custom_op("rcka::linear_stats_backward", mutates_args=())
def linear_stats_backward(x: Tensor, y: Tensor, g: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """(dx, dy): the vector-Jacobian product of S for g (G, 3) float64."""
    return tuple(_dispatch.kernels(backend).linear_stats_backward(x, y, g))


@linear_stats_backward.register_fake
def _(x, y, g, backend):
    return torch.empty_like(x), torch.empty_like(y)


# ----------------------------------------------------------------------------- rbf HSIC


@torch.library.custom_op("rcka::rbf_stats", mutates_args=())
def rbf_stats(x: Tensor, y: Tensor, gamma_x: Tensor, gamma_y: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(S (G, 3) float64, K 1 (G, n), L 1 (G, n)) for RBF Grams K of x and L of y."""
    return tuple(_dispatch.kernels(backend).rbf_stats(x, y, gamma_x, gamma_y))


@rbf_stats.register_fake
def _(x, y, gamma_x, gamma_y, backend):
    g, n = x.shape[0], x.shape[1]
    sd = compute_dtype(x.dtype)
    return x.new_empty((g, 3), dtype=torch.float64), x.new_empty((g, n), dtype=sd), x.new_empty((g, n), dtype=sd)


@torch.library.custom_op("rcka::rbf_stats_backward", mutates_args=())
def rbf_stats_backward(
    x: Tensor, y: Tensor, gamma_x: Tensor, gamma_y: Tensor, gs: Tensor, grx: Tensor, gry: Tensor, backend: str
) -> Tuple[Tensor, Tensor]:
    return tuple(_dispatch.kernels(backend).rbf_stats_backward(x, y, gamma_x, gamma_y, gs, grx, gry))


@rbf_stats_backward.register_fake
def _(x, y, gamma_x, gamma_y, gs, grx, gry, backend):
    return torch.empty_like(x), torch.empty_like(y)


def _rbf_setup(ctx, inputs, output):
    x, y, gx, gy, backend = inputs
    ctx.save_for_backward(x, y, gx, gy)
    ctx.backend = backend


@autocast_off  # a backward run inside autocast: the tiles stay in the compute dtype
def _rbf_backward(ctx, gs, grx, gry):
    x, y, gx, gy = ctx.saved_tensors
    if torch.is_grad_enabled():  # the bandwidths are constants here, as below
        fn = lambda a, b: torch_backend.rbf_stats(a, b, gx.detach(), gy.detach())  # noqa: E731
        return (*recomputed_grads((x, y), (gs, grx, gry), ctx.needs_input_grad[:2], fn), None, None, None)
    g, n = x.shape[0], x.shape[1]
    sd = compute_dtype(x.dtype)
    gs = torch.zeros(g, 3, dtype=torch.float64, device=x.device) if gs is None else gs.contiguous()
    grx = torch.zeros(g, n, dtype=sd, device=x.device) if grx is None else grx.contiguous()
    gry = torch.zeros(g, n, dtype=sd, device=x.device) if gry is None else gry.contiguous()
    dx, dy = rbf_stats_backward(x, y, gx, gy, gs, grx, gry, ctx.backend)
    return dx, dy, None, None, None


rbf_stats.register_autograd(_rbf_backward, setup_context=_rbf_setup)


# ----------------------------------------------------------------------------- rbf HSIC, dense (small n)


def pair_sigma2(x: Tensor, d: Tensor, sigma):
    """sigma^2 of the Grams of x (G, n, p) and of its partner from their squared distances d
    (G, 2, n, n): (G, 2) for a heuristic ("median", "mean"), (G, 1) for a tensor of G
    bandwidths, a float for a float."""
    if isinstance(sigma, str):  # given the distances, sigma2 reads only its first argument's shape and dtype
        dd = d.flatten(0, 1)
        return _bandwidth.sigma2(dd, sigma, dd).view(-1, 2)
    if isinstance(sigma, Tensor):
        return _bandwidth.sigma2(x, sigma)[:, None]
    return float(sigma) ** 2


def _dense_value(x, y, s2, debiased: bool, cka: bool, need=(False, False)):
    """(value (G,) float64, (dvalue/dx, dvalue/dy) in the compute dtype or None where not in
    ``need``, s2, H (G, 2, 2) float64 the HSIC of every pair of the Grams): CKA or HSIC(K, L) of
    the dense RBF Grams of x (G, n, p) and y (G, n, q), 0 where an input's rows are all equal.
    HSIC(A, B) = <C(A), C(B)> / N for the estimator's centring C (``centre_nxn``, a self-adjoint
    projection) and denominator N, so dHSIC(A, B)/dA = C(B) / N, and with r = cka_scale:
    dCKA/dK = (r C(L) - CKA r^2 HSIC(L, L) C(K)) / N, dCKA/dL likewise."""
    norm = estimators.normaliser(x.shape[1], debiased)
    z = torch_backend.stacked_rows(x, y)
    degenerate = _validate.rows_equal(z).view(-1, 2).any(1)
    z = z.sub_(z.mean(1, keepdim=True))  # RBF Grams do not change under a shift
    kl, s2 = torch_backend.dense_rbf_grams(z, s2, debiased)
    del z  # the gradient centres the inputs it needs again: at feature-map widths z is the peak
    c = centre_nxn(kl.to(torch.float64, copy=True), debiased).flatten(2)  # float64: the centring cancels most of each entry
    h = torch.bmm(c, c.mT).div_(norm)
    del c
    hxx, hxy, _, hyy = h.view(-1, 4).unbind(1)
    if cka:
        value, r = estimators.cka(hxy, hxx, hyy, degenerate, compute_dtype(x.dtype), with_scale=True)
        minus = value * r * r  # -dCKA/dHSIC(K, K) = CKA r^2 HSIC(L, L) / 2, the 2 of dHSIC(K, K) taken
        w = torch.stack([-minus * hyy, r, r, -minus * hxx], -1)
    else:
        value = torch.where(degenerate, 0.0, hxy)
        one, zero = (~degenerate).to(h.dtype), torch.zeros_like(hxy)
        w = torch.stack([zero, one, one, zero], -1)
    if not any(need):
        return value, (None, None), s2, h
    lo, hi = (0 if need[0] else 1), (2 if need[1] else 1)
    wk = w.view(-1, 2, 2, 1, 1)[:, lo:hi].div(norm)  # C is linear: sum_B w_AB C(B) = C(sum_B w_AB B), float64
    dk = centre_nxn((kl[:, None, 0] * wk[:, :, 0]).addcmul_(kl[:, None, 1], wk[:, :, 1]), debiased)
    return value, tuple(torch_backend.dense_rbf_backward(kl, x, y, s2, dk, need)), s2, h


class _DenseRBF(torch.autograd.Function):
    """dense_rbf's value. Its gradient is formed in the forward pass, from the Grams, which
    are then let go; the backward scales it."""

    @staticmethod
    def forward(ctx, x, y, sigma, debiased, cka, grad, check):
        n = x.shape[-2]
        x3, y3 = x.reshape(-1, n, x.shape[-1]), y.reshape(-1, n, y.shape[-1])
        need = ctx.needs_input_grad[:2] if grad else (False, False)
        value, (dx, dy), s2, h = _dense_value(x3, y3, lambda d: pair_sigma2(x3, d, sigma), debiased, cka, need)
        if check is not None:
            _validate.check_statistics(check, h, x, y)
        ctx.s2 = s2 if isinstance(s2, float) else None
        ctx.save_for_backward(x, y, dx, dy, None if ctx.s2 is not None else s2)
        ctx.debiased, ctx.cka = debiased, cka
        return value.to(compute_dtype(x.dtype)).view(x.shape[:-2])

    @staticmethod
    @autocast_off  # a backward run inside autocast: the products stay in the compute dtype
    def backward(ctx, g):
        x, y, dx, dy, s2 = ctx.saved_tensors
        s2 = ctx.s2 if s2 is None else s2
        need = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # the bandwidth a constant, as in the forward's gradient
            def fn(a, b):
                n = a.shape[-2]
                v = _dense_value(a.reshape(-1, n, a.shape[-1]), b.reshape(-1, n, b.shape[-1]), s2, ctx.debiased, ctx.cka)[0]
                return v.to(compute_dtype(a.dtype)).view(a.shape[:-2])
            return (*recomputed_grads((x, y), g, need, fn), None, None, None, None, None)
        g = g.reshape(-1, 1, 1)
        dx = (dx * g).to(x.dtype).view(x.shape) if need[0] else None
        dy = (dy * g).to(y.dtype).view(y.shape) if need[1] else None
        return dx, dy, None, None, None, None, None


def dense_rbf(x: Tensor, y: Tensor, sigma, debiased: bool, cka: bool, check=None) -> Tensor:
    """CKA (``cka``) or HSIC(K, L), x.shape[:-2] in the compute dtype, 0 where an input's rows are
    all equal, of the RBF Grams K of x (..., n, p) and L of y (..., n, q) formed whole (sigma: a
    float, a tensor of G values, "median" or "mean"; the bandwidth is a constant for autograd).
    The gradient is formed with the value, in closed form (torch_backend.dense_rbf_backward),
    where grad mode is on and an input requires it; a backward with grad mode on differentiates
    a recomputation instead. ``check``: the public function's name, to raise for a NaN/Inf input,
    read off the statistics (``_validate.check_statistics``), or None. Where it is built and
    torch.compile is not tracing, the native op (rcka_kernels/csrc/, the same steps in C++) runs."""
    native = None if _validate._is_compiling() else _native.dense_rbf_op()
    if native is not None:
        if isinstance(sigma, str):
            return native(x, y, None, 0.0, _native.RULES[sigma], debiased, cka, check)
        given = sigma if isinstance(sigma, Tensor) else None
        return native(x, y, given, 0.0 if given is not None else float(sigma), _native.RULES["given"], debiased, cka, check)
    return _DenseRBF.apply(x, y, sigma, debiased, cka, torch.is_grad_enabled(), check)


# ----------------------------------------------------------------------------- rbf MMD


@torch.library.custom_op("rcka::rbf_mmd_sums", mutates_args=())
def rbf_mmd_sums(x: Tensor, y: Tensor, gamma: Tensor, backend: str) -> Tensor:
    """(G, 3) float64: sum K_XX, sum K_YY, sum K_XY."""
    return _dispatch.kernels(backend).rbf_mmd_sums(x, y, gamma)


@rbf_mmd_sums.register_fake
def _(x, y, gamma, backend):
    return x.new_empty((x.shape[0], 3), dtype=torch.float64)


@torch.library.custom_op("rcka::rbf_mmd_sums_backward", mutates_args=())
def rbf_mmd_sums_backward(x: Tensor, y: Tensor, gamma: Tensor, gs: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return tuple(_dispatch.kernels(backend).rbf_mmd_sums_backward(x, y, gamma, gs))


@rbf_mmd_sums_backward.register_fake
def _(x, y, gamma, gs, backend):
    return torch.empty_like(x), torch.empty_like(y)


def _mmd_setup(ctx, inputs, output):
    x, y, gamma, backend = inputs
    ctx.save_for_backward(x, y, gamma)
    ctx.backend = backend


@autocast_off  # a backward run inside autocast: the tiles stay in the compute dtype
def _mmd_backward(ctx, gs):
    x, y, gamma = ctx.saved_tensors
    if torch.is_grad_enabled():
        fn = lambda a, b: torch_backend.rbf_mmd_sums(a, b, gamma.detach())  # noqa: E731
        return (*recomputed_grads((x, y), gs, ctx.needs_input_grad[:2], fn), None, None)
    dx, dy = rbf_mmd_sums_backward(x, y, gamma, gs.contiguous(), ctx.backend)
    return dx, dy, None, None


rbf_mmd_sums.register_autograd(_mmd_backward, setup_context=_mmd_setup)


# ----------------------------------------------------------------------------- centred Gram (n x n)


@torch.library.custom_op("rcka::centered_gram", mutates_args=())
def centered_gram(x: Tensor, gamma: Tensor, kernel: str, debiased: bool, backend: str) -> Tensor:
    """(G, n, n) centred Gram of x (G, n, p) in the compute dtype: H K H, or the
    U-centred K (zero diagonal) if debiased. gamma (G,) is used for RBF only."""
    return _dispatch.kernels(backend).centered_gram(x, kernel, gamma, debiased)


@centered_gram.register_fake
def _(x, gamma, kernel, debiased, backend):
    return x.new_empty((x.shape[0], x.shape[1], x.shape[1]), dtype=compute_dtype(x.dtype))


def _cg_setup(ctx, inputs, output):
    x, gamma, kernel, debiased, backend = inputs
    ctx.save_for_backward(x, gamma)
    ctx.kernel, ctx.debiased = kernel, debiased


@autocast_off  # a backward run inside autocast: the tiles stay in the compute dtype
def _cg_backward(ctx, go):
    """Centring is self-adjoint; then the kernel's chain rule with torch ops:
    linear dX = (Gc + Gc^T) X; RBF dX = -2 gamma (rowsum(M) x - M X), M = (Gc + Gc^T) o K."""
    x, gamma = ctx.saved_tensors
    cd = compute_dtype(x.dtype)
    gc = centre_nxn(go.to(cd, copy=True), ctx.debiased)
    s = gc + gc.transpose(-1, -2)
    xd = center_columns(x.to(cd))  # translation-invariant for both kernels (Gc has zero row sums)
    if ctx.kernel == "linear":
        dx = s @ xd
    else:  # the diagonal's weights cancel in rowsum(M) x - M X: left out, not cancelled in rounding
        m = s * gram_matrix(xd, "rbf", gamma)
        m.diagonal(dim1=-2, dim2=-1).zero_()
        dx = -2.0 * gamma.to(cd).reshape(-1, 1, 1) * (m.sum(-1, keepdim=True) * xd - m @ xd)
    return dx.to(x.dtype), None, None, None, None


centered_gram.register_autograd(_cg_backward, setup_context=_cg_setup)
