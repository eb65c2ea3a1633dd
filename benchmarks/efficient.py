"""The strongest plain-PyTorch formulations a competent user writes, and an op counter.

These are the baselines rcka-kernels must beat (issue: "faster than the best ten
lines of PyTorch"): column-centre, then the cheaper of the feature-space and the
sample-space formula, batched over leading group dims, autograd for the backward.
Tests use them as the op-count yardstick; benchmarks/bench_efficient.py times them (and the
benchmark harness counts ops with ``OpCounter``).
"""

from __future__ import annotations

from typing import Callable, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Tensor = torch.Tensor


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Biased linear CKA of x (..., n, p), y (..., n, q): the efficient 10-liner."""
    xc = x - x.mean(-2, keepdim=True)
    yc = y - y.mean(-2, keepdim=True)
    if x.shape[-1] + y.shape[-1] <= x.shape[-2]:  # feature space: |Xc^T Yc|^2 / (|Xc^T Xc| |Yc^T Yc|)
        xy = (xc.mT @ yc).square().sum((-2, -1))
        return xy / (torch.linalg.matrix_norm(xc.mT @ xc) * torch.linalg.matrix_norm(yc.mT @ yc))
    k, l = xc @ xc.mT, yc @ yc.mT  # sample space: <K, L> / (|K| |L|)
    return (k * l).sum((-2, -1)) / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l))


def linear_cka_debiased(x: Tensor, y: Tensor) -> Tensor:
    """Debiased linear CKA (Kornblith et al.'s feature-space form of Song et al.'s
    unbiased HSIC), x (..., n, p), y (..., n, q)."""
    n = x.shape[-2]

    def hsic_u(a: Tensor, b: Tensor, ab: Tensor) -> Tensor:
        # a, b: diagonals |x_i|^2, |y_i|^2 of the centred Grams; ab = <K, L>
        ta, tb = a.sum(-1), b.sum(-1)
        return ab - n / (n - 2) * (a * b).sum(-1) + ta * tb / ((n - 1) * (n - 2))

    xc = x - x.mean(-2, keepdim=True)
    yc = y - y.mean(-2, keepdim=True)
    dx, dy = xc.square().sum(-1), yc.square().sum(-1)
    if x.shape[-1] + y.shape[-1] <= n:
        kl = (xc.mT @ yc).square().sum((-2, -1))
        kk = (xc.mT @ xc).square().sum((-2, -1))
        ll = (yc.mT @ yc).square().sum((-2, -1))
    else:
        k, l = xc @ xc.mT, yc @ yc.mT
        kl, kk, ll = (k * l).sum((-2, -1)), k.square().sum((-2, -1)), l.square().sum((-2, -1))
    return hsic_u(dx, dy, kl) / torch.sqrt(hsic_u(dx, dx, kk) * hsic_u(dy, dy, ll))


def official_alignment(x: Tensor, y: Tensor) -> Tensor:
    """The official RCKA code's uncentred alignment, as published: n x n Grams."""
    k, l = x @ x.mT, y @ y.mT
    return (k * l).sum((-2, -1)) / torch.sqrt(k.square().sum((-2, -1)) * l.square().sum((-2, -1)))


def rcka_loss(s: Tensor, t: Tensor, weight: float = 15.0, official: bool = False) -> Tensor:
    """RCKA on logits (N, P): sample-axis plus class-axis term, plain PyTorch."""
    if official:
        return -weight * (official_alignment(s, t) + official_alignment(s.mT, t.mT))
    return weight * ((1 - linear_cka(s, t)) + (1 - linear_cka(s.mT, t.mT)))


def rbf_cka(x: Tensor, y: Tensor, sigma=None) -> Tensor:
    """Biased RBF CKA of x (n, p), y (n, q), the plain dense formula: n x n squared distances,
    the bandwidth sigma^2 = their median (NumPy's: the mean of the two middle values; a
    constant for the backward) unless ``sigma`` is given, Grams, centring, <Kc, Lc> / (|Kc| |Lc|)."""

    def centred_gram(z: Tensor) -> Tensor:
        sq = z.square().sum(-1)
        d = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0)
        if sigma is None:
            v = d.detach().flatten()
            s2 = (v.kthvalue((v.numel() + 1) // 2).values + v.kthvalue(v.numel() // 2 + 1).values) / 2
        else:
            s2 = sigma**2
        k = torch.exp(-d / (2.0 * s2))
        k = k - k.mean(0, keepdim=True)
        return k - k.mean(1, keepdim=True)

    kc, lc = centred_gram(x), centred_gram(y)
    return (kc * lc).sum() / (torch.linalg.matrix_norm(kc) * torch.linalg.matrix_norm(lc))


# ----------------------------------------------------------------------------- op counting


class OpCounter(TorchDispatchMode):
    """Records every aten op that does work: views are left out (they launch
    nothing), in-place ops and host reads (.item()) are counted. On a GPU each
    counted op is a kernel launch or a synchronisation."""

    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        view = (any(r.alias_info is not None for r in schema.returns) and not schema.is_mutable) or "_unsafe_view" in schema.name
        if not view:
            self.ops.append(schema.name.replace("aten::", ""))
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Tensor], backward: bool = True) -> List[str]:
    """The ops of one call of ``fn`` (and of its backward on the summed output)."""
    with OpCounter() as c:
        out = fn()
        if backward:
            out.sum().backward()
    return c.ops
