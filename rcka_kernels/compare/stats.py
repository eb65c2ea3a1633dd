"""Streaming statistics behind ``rk.compare``: every layer pair in batched products.

Layers of model A (widths p_1 .. p_La, P_A = sum p_i) and of model B (q_1 .. q_Lb,
P_B = sum q_j); a batch brings the features of every layer, concatenated into
``xa`` (b, P_A) and ``xb`` (b, P_B).

Exact (linear kernel; ``ExactStats``): the full-data-set CKA from statistics whose
size does not depend on the number of samples, all in float64:
  - n and the column sums s_A, s_B of the rows shifted by a fixed vector c (the
    first batch's column means: the shifted-data algorithm, so the products do not
    cancel when the features have large means);
  - M = X_A^T X_B (P_A x P_B): every cross block X_i^T Y_j at once, one GEMM per batch;
  - S_i = X_i^T X_i (p_i x p_i) per layer, and the same for B (from M's diagonal
    blocks when A and B are the same layers of the same model);
  - debiased only, with d_k = |x_k|^2 and e_k = |y_k|^2 the per-layer squared row
    norms: D = sum_k d_k, a = sum_k d_k e_k (La x Lb), U = X_A^T e (P_A x Lb),
    V = X_B^T d (P_B x La), and the same per layer for the self terms.
At the end every statistic is re-shifted to the global mean (exact algebra, below);
with centred rows the HSIC terms are
  biased:   HSIC = |C|_F^2 / (n-1)^2,  C = Xc_i^T Yc_j
  unbiased: HSIC = [|C|_F^2 - n/(n-2) a + D E / ((n-1)(n-2))] / (n(n-3)),
which is Song et al.'s estimator: with centred rows 1^T K~ 1 = -D and
K~ 1 = -d, so tr(K~L~) = |C|^2 - a, (K~1).(L~1) = a (the estimator is
invariant to a translation of either input).

Minibatch (``MinibatchStats``, any kernel): Nguyen et al. (2021): per batch of b >= 4
samples the unbiased HSIC of every pair, <K_u, L_u> / (b (b-3)) with U-centred Grams
(``rk.centered_gram(..., debiased=True)``), as one (La x b^2) @ (b^2 x Lb) product;
summed over batches in float64; CKA = sum HSIC_xy / sqrt(sum HSIC_xx sum HSIC_yy).

Under torch.distributed the sums are all-reduced (after re-shifting each rank's
exact statistics to the global mean), so the result is the one of the
concatenated data.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import functional as F
from ..distributed import is_distributed

Tensor = torch.Tensor
f64 = torch.float64


def _segments(widths: Sequence[int], device) -> Tensor:
    """Layer index of every concatenated column: (sum widths,) long."""
    return torch.repeat_interleave(torch.arange(len(widths), device=device), torch.tensor(list(widths), device=device))


def _rowsum(m: Tensor, seg: Tensor, groups: int) -> Tensor:
    """Sum the rows of m (P, k) by segment -> (groups, k)."""
    return m.new_zeros((groups,) + tuple(m.shape[1:])).index_add_(0, seg, m)


def _vecsum(v: Tensor, seg: Tensor, groups: int) -> Tensor:
    return v.new_zeros(groups).index_add_(0, seg, v)


def _all_reduce(tensors: List[Tensor], group) -> None:
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def exact_bytes(widths_a: Sequence[int], widths_b: Sequence[int], debiased: bool, shared: bool) -> int:
    """Bytes of float64 statistics the exact estimator keeps for these layers."""
    pa, pb = sum(widths_a), sum(widths_b)
    elems = pa * pb + 2 * (pa + pb)
    if not shared:
        elems += sum(p * p for p in widths_a) + sum(q * q for q in widths_b)
    if debiased:
        elems += pa * len(widths_b) + pb * len(widths_a) + len(widths_a) * len(widths_b) + 2 * (pa + pb)
    return 8 * elems


class _Side:
    """Per-model part of the exact statistics: shift, sums, self products, debiased extras."""

    def __init__(self, widths: Sequence[int], debiased: bool, device, with_self: bool):
        self.widths = list(widths)
        self.L, self.P = len(widths), sum(widths)
        self.seg = _segments(widths, device)
        self.offsets = [0]
        for w in widths:
            self.offsets.append(self.offsets[-1] + w)
        self.c: Optional[Tensor] = None
        self.s = torch.zeros(self.P, dtype=f64, device=device)
        self.self_ = [torch.zeros(w, w, dtype=f64, device=device) for w in widths] if with_self else None
        self.debiased = debiased
        if debiased:
            self.D = torch.zeros(self.L, dtype=f64, device=device)       # sum_k |x_k|^2 per layer
            self.a_self = torch.zeros(self.L, dtype=f64, device=device)  # sum_k |x_k|^4 per layer
            self.u_self = torch.zeros(self.P, dtype=f64, device=device)  # X_i^T d_i, concatenated

    def prepare(self, feats: List[Tensor]) -> Tensor:
        """(b, P) float64 rows minus the shift (set from the first batch)."""
        x = torch.cat([f.to(f64) for f in feats], 1)
        if self.c is None:
            self.c = x.mean(0)
        return x.sub_(self.c)

    def norms(self, x: Tensor) -> Tensor:
        """Per-layer squared row norms (b, L)."""
        return x.new_zeros(x.shape[0], self.L).index_add_(1, self.seg, x * x)

    def update(self, x: Tensor, d: Optional[Tensor]) -> None:
        self.s += x.sum(0)
        if self.self_ is not None:
            for i, m in enumerate(self.self_):
                xi = x[:, self.offsets[i]:self.offsets[i + 1]]
                m.addmm_(xi.mT, xi)
        if d is not None:
            self.D += d.sum(0)
            self.a_self += (d * d).sum(0)
            self.u_self += (x * d.index_select(1, self.seg)).sum(0)


class ExactStats:
    """Exact linear-kernel statistics for layers A x layers B (see the module docstring).

    ``shared``: the B layers are the A layers of the same model (one set of
    features; self products read from M's diagonal blocks).
    """

    def __init__(self, widths_a: Sequence[int], widths_b: Sequence[int], *, debiased: bool, shared: bool, device):
        self.debiased, self.shared = debiased, shared
        self.n = 0
        self.a = _Side(widths_a, debiased, device, with_self=not shared)
        self.b = self.a if shared else _Side(widths_b, debiased, device, with_self=True)
        self.M = torch.zeros(self.a.P, self.b.P, dtype=f64, device=device)
        if debiased:
            self.A = torch.zeros(self.a.L, self.b.L, dtype=f64, device=device)   # sum_k d_k e_k
            self.U = torch.zeros(self.a.P, self.b.L, dtype=f64, device=device)   # X_A^T e
            self.V = torch.zeros(self.b.P, self.a.L, dtype=f64, device=device)   # X_B^T d

    def update(self, fa: List[Tensor], fb: List[Tensor]) -> None:
        xa = self.a.prepare(fa)
        xb = xa if self.shared else self.b.prepare(fb)
        self.n += xa.shape[0]
        self.M.addmm_(xa.mT, xb)
        da = db = None
        if self.debiased:
            da = self.a.norms(xa)
            db = da if self.shared else self.b.norms(xb)
            self.A.addmm_(da.mT, db)
            self.U.addmm_(xa.mT, db)
            if not self.shared:
                self.V.addmm_(xb.mT, da)
        self.a.update(xa, da)
        if not self.shared:
            self.b.update(xb, db)

    # ------------------------------------------------------------------ finalize

    def _sides(self):
        return [self.a] if self.shared else [self.a, self.b]

    def hsic_terms(self, group=None):
        """(n, hxy (La, Lb), hxx (La,), hyy (Lb,)) float64, all-reduced under torch.distributed.

        Consumes the statistics (the cross products are re-shifted and squared in place).
        """
        sides = self._sides()
        dev = self.M.device
        n_local = float(self.n)
        if is_distributed(group):
            # the global mean: sum over ranks of (s_r + n_r c_r), n
            tot = torch.cat([torch.tensor([n_local], dtype=f64, device=dev)] + [s.s + n_local * s.c for s in sides])
            _all_reduce([tot], group)
            n = float(tot[0])
            means, off = [], 1
            for s in sides:
                means.append(tot[off:off + s.P] / n)
                off += s.P
            deltas = [m - s.c for m, s in zip(means, sides)]
        else:
            n = n_local
            deltas = [s.s / n for s in sides]
        da = deltas[0]
        db = da if self.shared else deltas[1]
        a, b = self.a, self.b
        # everything below re-shifts this rank's sums to the global mean: x' = x - delta
        # (x already minus c); then they are sums over samples of functions of centred
        # rows, additive over ranks
        na2 = _vecsum(da * da, a.seg, a.L)                # |delta_i|^2 per layer
        nb2 = na2 if self.shared else _vecsum(db * db, b.seg, b.L)
        sa_d = _vecsum(a.s * da, a.seg, a.L)              # s_i . delta_i
        sb_d = sa_d if self.shared else _vecsum(b.s * db, b.seg, b.L)
        extra = []
        if self.debiased:
            # a' = a - 2 u.delta - 2 v.eps + |eps|^2 D + |delta|^2 E + 4 delta^T M eps
            #      - 2 |eps|^2 s.delta - 2 |delta|^2 t.eps + n |delta|^2 |eps|^2
            eps_ind = torch.zeros(b.P, b.L, dtype=f64, device=dev)
            eps_ind[torch.arange(b.P, device=dev), b.seg] = db
            m_eps = self.M @ eps_ind                               # (P_A, Lb): M eps per B layer
            dmd = _rowsum(m_eps * da[:, None], a.seg, a.L)         # delta_i^T M_ij eps_j
            u_d = _rowsum(self.U * da[:, None], a.seg, a.L)        # u_ij . delta_i
            if self.shared:
                v_e = u_d.mT
            else:
                v_e = _rowsum(self.V * db[:, None], b.seg, b.L).mT  # v_ij . eps_j
            A = (self.A - 2 * u_d - 2 * v_e + nb2[None] * a.D[:, None] + na2[:, None] * b.D[None]
                 + 4 * dmd - 2 * nb2[None] * sa_d[:, None] - 2 * na2[:, None] * sb_d[None] + n_local * na2[:, None] * nb2[None])
            extra.append(A)
            for s, nd2, sd in ((a, na2, sa_d),) if self.shared else ((a, na2, sa_d), (b, nb2, sb_d)):
                delta = da if s is a else db
                ud = _vecsum(s.u_self * delta, s.seg, s.L)
                if s.self_ is not None:
                    dsd = torch.stack([delta[s.offsets[i]:s.offsets[i + 1]] @ m @ delta[s.offsets[i]:s.offsets[i + 1]]
                                       for i, m in enumerate(s.self_)])
                else:  # shared: the diagonal blocks of M
                    dsd = torch.diagonal(dmd)
                s.a_self = s.a_self - 4 * ud + 2 * nd2 * s.D + 4 * dsd - 4 * nd2 * sd + n_local * nd2 * nd2
                s.D = s.D - 2 * sd + n_local * nd2
                extra += [s.a_self, s.D]
        # M' = M - delta t^T - s eps^T + n delta eps^T; self blocks alike
        self.M.sub_(torch.outer(da, b.s)).sub_(torch.outer(a.s, db)).add_(torch.outer(da, db), alpha=n_local)
        for s in sides:
            if s.self_ is not None:
                delta = da if s is a else db
                for i, m in enumerate(s.self_):
                    di, si = delta[s.offsets[i]:s.offsets[i + 1]], s.s[s.offsets[i]:s.offsets[i + 1]]
                    m.sub_(torch.outer(di, si)).sub_(torch.outer(si, di)).add_(torch.outer(di, di), alpha=n_local)
        if is_distributed(group):
            _all_reduce([self.M] + [m for s in sides if s.self_ is not None for m in s.self_] + extra, group)
        # squared Frobenius norms of the blocks
        cross = _rowsum(self.M.square_(), a.seg, a.L)
        cross = _rowsum(cross.mT.contiguous(), b.seg, b.L).mT               # (La, Lb)
        if self.shared:
            selfs = [torch.diagonal(cross).clone()]
        else:
            selfs = [torch.stack([m.square().sum() for m in s.self_]) for s in sides]
        sa, sb = selfs[0], selfs[-1]
        if not self.debiased:
            k = 1.0 / (n - 1) ** 2
            return n, cross * k, sa * k, sb * k

        def unbiased(sq, av, d1, d2):
            return (sq - n / (n - 2) * av + d1 * d2 / ((n - 1) * (n - 2))) / (n * (n - 3))

        A = extra[0]
        Da, Db = a.D, b.D
        hxy = unbiased(cross, A, Da[:, None], Db[None])
        hxx = unbiased(sa, a.a_self, Da, Da)
        hyy = unbiased(sb, b.a_self, Db, Db)
        return n, hxy, hxx, hyy


class MinibatchStats:
    """Nguyen et al.'s minibatch HSIC sums for the given A and B layers (any kernel)."""

    MIN_BATCH = 4

    def __init__(self, n_a: int, n_b: int, *, kernel: str, sigma, shared: bool, device):
        self.kernel, self.sigma, self.shared = kernel, sigma, shared
        self.hxy = torch.zeros(n_a, n_b, dtype=f64, device=device)
        self.hxx = torch.zeros(n_a, dtype=f64, device=device)
        self.hyy = self.hxx if shared else torch.zeros(n_b, dtype=f64, device=device)
        self.n = 0
        self.batches = 0
        self.skipped = 0

    def _ucentred(self, feats: List[Tensor]) -> Tensor:
        """(L, b^2) float64 rows: each layer's U-centred Gram, flattened."""
        if self.kernel != "linear":
            return torch.stack([F.centered_gram(f, kernel=self.kernel, sigma=self.sigma, debiased=True).reshape(-1) for f in feats]).to(f64)
        b = feats[0].shape[0]
        out = torch.empty(len(feats), b, b, dtype=f64, device=feats[0].device)
        for k, f in enumerate(feats):
            # Song et al.'s estimator is translation invariant: centre the columns first, for precision.
            # U-centring in place (rk.centered_gram's general path costs ~50x more at this size):
            # zero diagonal, K_ij - r_i/(b-2) - r_j/(b-2) + t/((b-1)(b-2)), zero diagonal again
            f = f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
            f = f - f.mean(0, keepdim=True)
            g = out[k]
            g.copy_(f @ f.mT)
            g.diagonal().zero_()
            r = g.sum(0)
            g.sub_(r[None] / (b - 2)).sub_(r[:, None] / (b - 2)).add_(r.sum() / ((b - 1) * (b - 2)))
            g.diagonal().zero_()
        return out.reshape(len(feats), -1)

    def update(self, fa: List[Tensor], fb: List[Tensor]) -> bool:
        b = fa[0].shape[0] if fa else fb[0].shape[0]
        if b < self.MIN_BATCH:
            self.skipped += 1
            return False
        ka = self._ucentred(fa)
        kb = ka if self.shared else self._ucentred(fb)
        scale = 1.0 / (b * (b - 3))
        self.hxy.addmm_(ka, kb.mT, alpha=scale)
        self.hxx.add_((ka * ka).sum(1), alpha=scale)
        if not self.shared:
            self.hyy.add_((kb * kb).sum(1), alpha=scale)
        self.n += b
        self.batches += 1
        return True

    def hsic_terms(self, group=None):
        """(n used, batches used, batches skipped, hxy, hxx, hyy), all-reduced under torch.distributed."""
        counts = torch.tensor([self.n, self.batches, self.skipped], dtype=f64, device=self.hxy.device)
        if is_distributed(group):
            _all_reduce([counts, self.hxy, self.hxx] + ([] if self.shared else [self.hyy]), group)
        n, used, skipped = (int(v) for v in counts.tolist())
        return n, used, skipped, self.hxy, self.hxx, self.hyy
