"""Streaming statistics behind ``rk.compare``: every layer pair in batched products.

Layers of model A (widths p_1 .. p_La, P_A = sum p_i) and of model B (q_1 .. q_Lb,
P_B = sum q_j); a batch brings the features of every layer. Per-batch products run
in the *work dtype*: the features' own precision (float32 for float32/half/bfloat16
features, float64 for float64 ones) or ``product_dtype`` when given; everything that
is summed over batches is accumulated in float64. Memory beyond the statistics is a
few buffers of the size of one batch's features, reused from batch to batch.

Exact (linear kernel; ``ExactStats``): the features packed side by side, as the forward
pass produces them (``feed``), into one reused buffer per model, ``xa`` (b, P_A) and
``xb`` (b, P_B); the full-data-set CKA
from statistics whose size does not depend on the number of samples, accumulated in
float64:
  - n and the column sums s_A, s_B of the rows shifted by a fixed vector c (the
    first batch's column means: the shifted-data algorithm, so the products do not
    cancel when the features have large means, and the work-dtype products see
    rows of the size of their spread, not of their mean);
  - M = X_A^T X_B (P_A x P_B): every cross block X_i^T Y_j at once; per batch one
    GEMM in the work dtype, in row strips whose result (a few MiB, in a reused
    scratch) is widened into a reused float64 scratch and added to M while it is
    still in cache. When A and B are the same layers of the same model, each strip
    computes only the columns from its first layer on (the blocks on and above the
    diagonal: about half the work) and the blocks below are mirrored at the end;
  - S_i = X_i^T X_i (p_i x p_i) per layer, and the same for B (from M's diagonal
    blocks when A and B are the same layers of the same model), in the same way: in two
    row halves, the second from the diagonal on (3/4 of the product), mirrored at the end;
This GEMM is the estimator's floor: n P_A P_B multiply-adds (n sum p_i^2 more for the
self products), against about n b (P_A + P_B) for the minibatch estimator's Grams
(b the batch size); see ``core``'s docstring for what that means for its time.
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

Minibatch (``MinibatchStats``): Nguyen et al. (2021): per batch of b >= 4 samples the
unbiased HSIC of every pair, summed over batches in float64; CKA = sum HSIC_xy /
sqrt(sum HSIC_xx sum HSIC_yy). The statistics take each layer's output as the forward
pass produces it (``feed``), so a batch's features are never all alive at once: the
Grams are kept, and at most about ``CENTRE_BYTES`` of features. Linear kernel: consecutive
layers of one width are held as they come, up to that size, then stacked into a reused
scratch, centred (the estimator is translation invariant) and their Grams K formed by
one batched product into a reused (L, b, b) buffer (from ``HALF_GRAM_MIN_B`` on only the first b/2 rows and the last
diagonal block: 3/4 of the product, the block below the diagonal kept as zeros and
accounted for where it enters), the diagonal zeroed (K~), and Song et al.'s estimator
evaluated from
  [<K~, L~> + (1^T K~ 1)(1^T L~ 1)/((b-1)(b-2)) - 2/(b-2) (K~1).(L~1)] / (b(b-3)),
all pairs' <K~_i, L~_j> in one batched product (partial sums over ``TRACE_ROWS`` rows of
the Grams, 8 b terms, in the work dtype, then summed in float64), the O(b) terms as (La x b) @ (b x Lb)
products in float64. Few ops per batch: at small b their count, not their arithmetic,
is the cost. Other kernels: each layer's U-centred Gram
(``rk.centered_gram(..., debiased=True)``), <K_u, L_u> / (b (b-3)) as one
(La x b^2) @ (b^2 x Lb) product in float64.

Under torch.distributed the sums are all-reduced (after re-shifting each rank's
exact statistics to the global mean), so the result is the one of the
concatenated data.
"""

from __future__ import annotations

import bisect
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import functional as F
from ..distributed import is_distributed

Tensor = torch.Tensor
f64 = torch.float64

#: bytes of work-dtype scratch (a row strip of M) a product produces before it is added
#: to the float64 sums
SCRATCH_BYTES = 2 << 20
#: rows (samples) summed inside one work-dtype product before the result is added to the
#: float64 sums: bounds the float32 accumulation error whatever the loader's batch size
#: (about 1e-7 relative for typical features; up to ~1e-6 for features whose mean is 1e4
#: times their spread, whose float32 values are coarsely quantized)
PRODUCT_ROWS = 256


#: rows of the Grams whose products <K_i, L_j> are summed in the work dtype before the float64 sum
#: (8 b terms: fewer, larger batched products than row by row, 2-7% of the time; ~3e-7 relative)
TRACE_ROWS = 8
#: batch size from which the minibatch estimator's Grams are formed as 3/4 of the product (their
#: first b/2 rows and last diagonal block): measured on 2 cores, 9% less time at b = 1024, none at
#: 256 (smaller products run slower), a loss at 64 (more ops)
HALF_GRAM_MIN_B = 512
#: bytes of features (of consecutive layers of one width, as they come) that the minibatch estimator
#: holds to centre them and form their Grams in one batched product (fewer ops per batch)
CENTRE_BYTES = 1 << 20


def work_dtype(feats: Sequence[Tensor], product_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype of the per-batch products: ``product_dtype``, else float64 when a
    feature is float64, else float32 (half/bfloat16 features are upcast)."""
    if product_dtype is not None:
        return product_dtype
    return f64 if any(f.dtype == f64 for f in feats) else torch.float32


def _segments(widths: Sequence[int], device) -> Tensor:
    """Layer index of every concatenated column: (sum widths,) long."""
    return torch.repeat_interleave(torch.arange(len(widths), device=device), torch.tensor(list(widths), device=device))


def _rowsum(m: Tensor, seg: Tensor, groups: int) -> Tensor:
    """Sum the rows of m (P, k) by segment -> (groups, k)."""
    return m.new_zeros((groups,) + tuple(m.shape[1:])).index_add_(0, seg, m)


def _vecsum(v: Tensor, seg: Tensor, groups: int) -> Tensor:
    return v.new_zeros(groups).index_add_(0, seg, v)


def _sqnorms(k: Tensor) -> Tensor:
    """The squared norm of each k[i] (k: (L, ...)), float64 (a reduction, no squared copy)."""
    return torch.linalg.vector_norm(k.flatten(1), dim=1).to(f64).square()  # (dtype= would widen a copy of k)


def _mirror_blocks(m: Tensor, offsets: Sequence[int]) -> None:
    """Blocks (j, i) := (i, j)^T for i < j of the square m split at ``offsets`` (in place)."""
    for i in range(len(offsets) - 1):
        for j in range(i + 1, len(offsets) - 1):
            m[offsets[j]:offsets[j + 1], offsets[i]:offsets[i + 1]].copy_(m[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]].mT)


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


def _strips(m: int, n: int, itemsize: int, col_start=None, rows: Optional[int] = None):
    """The row strips (s, e, c) in which ``ExactStats`` computes dst (m, n) += a^T b with
    a, b of ``itemsize``-byte elements: rows s:e of dst, columns from c on. Float64 without
    ``col_start``: one product; otherwise strips whose work-dtype result fits
    ``SCRATCH_BYTES``, of at most ``rows`` rows, from ``col_start(s)`` on (0 without it)."""
    if itemsize == 8 and col_start is None:
        yield 0, m, 0
        return
    rows = min(rows or m, max(16, SCRATCH_BYTES // (n * itemsize)))
    for s in range(0, m, rows):
        yield s, min(s + rows, m), col_start(s) if col_start is not None else 0


def _offsets(widths: Sequence[int]) -> List[int]:
    out = [0]
    for w in widths:
        out.append(out[-1] + w)
    return out


def _layer_start(offsets: Sequence[int], s: int) -> int:
    """The first column of the layer that holds column s (the blocks on and above the diagonal)."""
    return offsets[bisect.bisect_right(offsets, s) - 1]


def _half(w: int) -> int:
    """Rows of the first of the two strips in which a (w, w) self product is computed."""
    return (w + 1) // 2


def _strip_madds(m: int, n: int, itemsize: int, col_start=None, rows: Optional[int] = None) -> int:
    """Multiply-adds per row of a and b of the product ``_strips`` plans."""
    return sum((e - s) * (n - c) for s, e, c in _strips(m, n, itemsize, col_start, rows))


class _Layout:
    """Where each layer's features sit in the packed (b, P) buffer."""

    def __init__(self, widths: Sequence[int], device):
        self.widths = list(widths)
        self.L, self.P = len(self.widths), sum(self.widths)
        self.device = device
        self.seg = _segments(self.widths, device)
        self.offsets = _offsets(self.widths)
        self.buf: Optional[Tensor] = None
        self.rows = 0  # rows of the batch in buf, set by put

    def cols(self, x: Tensor, i: int) -> Tensor:
        """Layer i's columns of x (..., P): a strided view (no copy)."""
        return x[..., self.offsets[i]:self.offsets[i + 1]]

    def put(self, i: int, f: Tensor, dtype: torch.dtype) -> None:
        """Layer i's (b, w) features into its columns of the packed (b, P) buffer, in ``dtype``
        (the buffer is reused across batches)."""
        b = f.shape[0]
        if self.buf is None or self.buf.shape[0] < b or self.buf.dtype != dtype:
            self.buf = torch.empty(b, self.P, dtype=dtype, device=self.device)
        self.rows = b
        self.cols(self.buf[:b], i).copy_(f)


class _Side(_Layout):
    """Per-model part of the exact statistics: shift, sums, self products, debiased extras."""

    def __init__(self, widths: Sequence[int], debiased: bool, device, with_self: bool):
        super().__init__(widths, device)
        self.c: Optional[Tensor] = None
        self.s = torch.zeros(self.P, dtype=f64, device=device)
        self.self_ = [torch.zeros(w, w, dtype=f64, device=device) for w in self.widths] if with_self else None
        self.debiased = debiased
        if debiased:
            self.D = torch.zeros(self.L, dtype=f64, device=device)       # sum_k |x_k|^2 per layer
            self.a_self = torch.zeros(self.L, dtype=f64, device=device)  # sum_k |x_k|^4 per layer
            self.u_self = torch.zeros(self.P, dtype=f64, device=device)  # X_i^T d_i, concatenated

    def prepare(self) -> Tensor:
        """The batch's packed (b, P) rows in the work dtype minus the shift (set from the first batch)."""
        x = self.buf[:self.rows]
        if self.c is None:
            self.c = x.mean(0, dtype=f64).to(x.dtype)
        return x.sub_(self.c)

    def norms(self, x: Tensor) -> Tensor:
        """Per-layer squared row norms (b, L) float64."""
        return torch.stack([torch.linalg.vector_norm(self.cols(x, i), dim=1) for i in range(self.L)], 1).to(f64).square()

    def update(self, x: Tensor, colsum: Tensor, d: Optional[Tensor], add_at_b) -> None:
        self.s += colsum
        if self.self_ is not None:
            for i, m in enumerate(self.self_):
                xi = self.cols(x, i)  # symmetric: the two row halves from the diagonal on (3/4 of the product)
                add_at_b(m, xi, xi, col_start=lambda r: r, rows=_half(m.shape[0]))
        if d is not None:
            self.D += d.sum(0)
            self.a_self += (d * d).sum(0)
            dw = d.to(x.dtype)
            self.u_self += torch.cat([self.cols(x, i).mT @ dw[:, i] for i in range(self.L)]).to(f64)


class _LayerFed:
    """Statistics that take a batch layer by layer (``feed(side, i, features)``, as the forward
    pass produces them) and add it with ``end_batch`` (which returns the batch's probe)."""

    dtype: Optional[torch.dtype]
    product_dtype: Optional[torch.dtype]

    def update(self, fa: List[Tensor], fb: List[Tensor]) -> Optional[Tensor]:
        """``feed`` every layer of a batch (A's, then B's), then ``end_batch``."""
        if self.dtype is None:
            self.dtype = work_dtype(fa + fb, self.product_dtype)
        for side, feats in ((0, fa), (1, fb)):
            for i, f in enumerate(feats):
                self.feed(side, i, f)
        return self.end_batch()


class ExactStats(_LayerFed):
    """Exact linear-kernel statistics for layers A x layers B (see the module docstring).

    ``shared``: the B layers are the A layers of the same model (one set of
    features; self products read from M's diagonal blocks). ``product_dtype``: the
    dtype of the per-batch products (default: the features', see ``work_dtype``);
    the sums over batches are float64 either way.
    """

    def __init__(self, widths_a: Sequence[int], widths_b: Sequence[int], *, debiased: bool, shared: bool, device,
                 product_dtype: Optional[torch.dtype] = None):
        self.debiased, self.shared = debiased, shared
        self.product_dtype = product_dtype
        self.dtype: Optional[torch.dtype] = None
        self.n = 0
        self.a = _Side(widths_a, debiased, device, with_self=not shared)
        self.b = self.a if shared else _Side(widths_b, debiased, device, with_self=True)
        self.M = torch.zeros(self.a.P, self.b.P, dtype=f64, device=device)
        self._work: Optional[Tensor] = None   # work-dtype product scratch (_add_at_b)
        self._wide: Optional[Tensor] = None   # the same widened to float64
        if debiased:
            self.A = torch.zeros(self.a.L, self.b.L, dtype=f64, device=device)   # sum_k d_k e_k
            self.U = torch.zeros(self.a.P, self.b.L, dtype=f64, device=device)   # X_A^T e
            self.V = torch.zeros(self.b.P, self.a.L, dtype=f64, device=device)   # X_B^T d

    def _add_at_b(self, dst: Tensor, a: Tensor, b: Tensor, col_start=None, rows: Optional[int] = None) -> None:
        """dst (m, n) float64 += a^T b for a (k, m), b (k, n) in the work dtype.

        Float64: one addmm. Otherwise in row strips of dst whose work-dtype product (at most
        ``SCRATCH_BYTES``, over at most ``PRODUCT_ROWS`` rows of a and b) goes to a reused
        scratch, is widened into a reused float64 one and added to dst while in cache: no
        allocation per product (torch's mixed-dtype ``add_`` would allocate the widened copy
        every time). ``col_start(s)``: the first column the rows from s need (the blocks on
        and above the diagonal of a symmetric product); the others are left alone. ``rows``:
        at most this many rows per strip.
        """
        m, n = dst.shape
        plan = list(_strips(m, n, a.element_size(), col_start, rows))
        step = a.shape[0] if a.dtype == f64 else PRODUCT_ROWS
        if a.dtype != f64:
            need = max((e - s) * (n - c) for s, e, c in plan)
            if self._work is None or self._work.numel() < need or self._work.dtype != a.dtype:
                self._work = torch.empty(need, dtype=a.dtype, device=a.device)
                self._wide = torch.empty(need, dtype=f64, device=a.device)
        for s, e, c in plan:
            d = dst[s:e, c:]
            for k in range(0, a.shape[0], step):
                ak, bk = a[k:k + step, s:e].mT, b[k:k + step, c:]
                if a.dtype == f64:
                    d.addmm_(ak, bk)
                else:
                    size = (e - s) * (n - c)
                    w = torch.mm(ak, bk, out=self._work[:size].view(e - s, n - c))
                    t = self._wide[:size].view(e - s, n - c)
                    d.add_(t.copy_(w))

    def _upper(self, s: int) -> int:
        """First column of M that row s needs when A and B are the same layers: its layer's first."""
        return _layer_start(self.a.offsets, s)

    @staticmethod
    def madds(widths_a: Sequence[int], widths_b: Sequence[int], shared: bool, itemsize: int = 4) -> int:
        """Multiply-adds per sample of ``update``'s products (``itemsize``: of the work dtype),
        from the same strip plan: P_A P_B plus about 3/4 of each layer's p^2, or M's blocks on
        and above the diagonal when A and B are the same layers."""
        if shared:
            offs = _offsets(widths_a)
            return _strip_madds(offs[-1], offs[-1], itemsize, lambda s: _layer_start(offs, s))
        return (_strip_madds(sum(widths_a), sum(widths_b), itemsize)
                + sum(_strip_madds(w, w, itemsize, lambda r: r, _half(w)) for w in list(widths_a) + list(widths_b)))

    def _mirror(self) -> None:
        """Fill the blocks below the block diagonal of the symmetric products from those above:
        M's when A and B are the same layers, each self product's two halves."""
        if self.shared:
            _mirror_blocks(self.M, self.a.offsets)
        for s in self._sides():
            for m in s.self_ or []:
                _mirror_blocks(m, [0, _half(m.shape[0]), m.shape[0]])

    def feed(self, side: int, i: int, f: Tensor) -> None:
        """Layer i of model A (side 0) or B (side 1): the batch's (b, w) features, copied into
        the side's packed buffer as the forward pass produces them (B's are A's when shared)."""
        if self.shared and side == 1:
            return
        if self.dtype is None:
            self.dtype = work_dtype([f], self.product_dtype)
        (self.a if side == 0 else self.b).put(i, f, self.dtype)

    def end_batch(self) -> Tensor:
        """Add the batch fed so far; returns a 0-dim float64 probe, finite iff every feature is
        (see ``MinibatchStats.end_batch``)."""
        xa = self.a.prepare()
        xb = xa if self.shared else self.b.prepare()
        sa = xa.sum(0).to(f64)   # of at most a batch of shifted rows: the work dtype suffices
        sb = sa if self.shared else xb.sum(0).to(f64)
        self.n += xa.shape[0]
        self._add_at_b(self.M, xa, xb, self._upper if self.shared else None)
        da = db = None
        if self.debiased:
            da = self.a.norms(xa)
            db = da if self.shared else self.b.norms(xb)
            self.A.addmm_(da.mT, db)
            self.U += (xa.mT @ db.to(xa.dtype)).to(f64)
            if not self.shared:
                self.V += (xb.mT @ da.to(xb.dtype)).to(f64)
        self.a.update(xa, sa, da, self._add_at_b)
        if not self.shared:
            self.b.update(xb, sb, db, self._add_at_b)
        return sa.sum() if self.shared else sa.sum() + sb.sum()

    # ------------------------------------------------------------------ finalize

    def _sides(self):
        return [self.a] if self.shared else [self.a, self.b]

    def hsic_terms(self, group=None):
        """(n, hxy (La, Lb), hxx (La,), hyy (Lb,)) float64, all-reduced under torch.distributed.

        Consumes the statistics (the cross products are re-shifted and squared in place).
        """
        self._mirror()
        sides = self._sides()
        dev = self.M.device
        n_local = float(self.n)
        if is_distributed(group):
            # the global mean: sum over ranks of (s_r + n_r c_r), n (a rank's shift c is in its work dtype)
            tot = torch.cat([torch.tensor([n_local], dtype=f64, device=dev)] + [s.s + n_local * s.c.to(f64) for s in sides])
            _all_reduce([tot], group)
            n = float(tot[0])
            means, off = [], 1
            for s in sides:
                means.append(tot[off:off + s.P] / n)
                off += s.P
            deltas = [m - s.c.to(f64) for m, s in zip(means, sides)]
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
                if s.self_ is not None:   # delta_i^T S_i delta_i
                    dsd = torch.stack([s.cols(delta, i) @ m @ s.cols(delta, i) for i, m in enumerate(s.self_)])
                else:  # shared: the diagonal blocks of M
                    dsd = torch.diagonal(dmd)
                s.a_self = s.a_self - 4 * ud + 2 * nd2 * s.D + 4 * dsd - 4 * nd2 * sd + n_local * nd2 * nd2
                s.D = s.D - 2 * sd + n_local * nd2
                extra += [s.a_self, s.D]
        # M' = M - delta t^T - s eps^T + n delta eps^T (rank-1 updates in place); self blocks alike
        self.M.addr_(da, b.s, alpha=-1).addr_(a.s, db, alpha=-1).addr_(da, db, alpha=n_local)
        for s in sides:
            if s.self_ is not None:
                delta = da if s is a else db
                for i, m in enumerate(s.self_):
                    di, si = s.cols(delta, i), s.cols(s.s, i)
                    m.addr_(di, si, alpha=-1).addr_(si, di, alpha=-1).addr_(di, di, alpha=n_local)
        if is_distributed(group):
            _all_reduce([self.M] + [m for s in sides if s.self_ is not None for m in s.self_] + extra, group)
        # squared Frobenius norms of the blocks
        cross = _rowsum(self.M.square_(), a.seg, a.L)
        cross = _rowsum(cross.mT.contiguous(), b.seg, b.L).mT               # (La, Lb)
        if self.shared:
            selfs = [torch.diagonal(cross).clone()]
        else:
            selfs = [torch.stack([torch.linalg.vector_norm(m).square() for m in s.self_]) for s in sides]
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


class MinibatchStats(_LayerFed):
    """Nguyen et al.'s minibatch HSIC sums for the given A and B layers (any kernel).

    Per batch: ``feed`` each layer's features as the forward pass produces them (its Gram is
    formed then, so the batch's features need not all stay alive), then ``end_batch``. The
    Grams of both sides share one buffer (A's layers, then B's), so that the per-layer terms
    of both come from the same few ops.
    """

    MIN_BATCH = 4

    def __init__(self, widths_a: Sequence[int], widths_b: Sequence[int], *, kernel: str, sigma, shared: bool, device,
                 product_dtype: Optional[torch.dtype] = None):
        self.kernel, self.sigma, self.shared = kernel, sigma, shared
        self.product_dtype = product_dtype
        self.dtype: Optional[torch.dtype] = None
        n_a, n_b = len(widths_a), len(widths_b)
        self.La = n_a
        self.L = n_a if shared else n_a + n_b  # Grams in the buffer
        self.grams: Optional[Tensor] = None  # (L, b, b) K~ (linear) or (L, b^2) U-centred Grams (other kernels)
        self.scratch: Optional[Tensor] = None
        self.pending: List[Tensor] = []  # features of consecutive layers of one side and width, waiting for _flush
        self.pending_at = 0  # buffer index of the first of those
        self.rows: Optional[int] = None  # the batch's b, set by its first feed
        self.hxy = torch.zeros(n_a, n_b, dtype=f64, device=device)
        self.h_self = torch.zeros(self.L, dtype=f64, device=device)  # HSIC(K, K) of every Gram in the buffer
        self.hxx = self.h_self[:n_a]
        self.hyy = self.hxx if shared else self.h_self[n_a:]
        self.n = 0
        self.batches = 0
        self.skipped = 0

    def _buffer(self, shape, dtype: torch.dtype, device) -> Tensor:
        g = self.grams
        if g is None or g.shape != shape or g.dtype != dtype:
            g = self.grams = torch.empty(shape, dtype=dtype, device=device)
            if len(shape) == 3 and self._half(shape[1]):
                h = self._half(shape[1])
                g[:, h:, :h] = 0  # never written: the block under the diagonal, stored as zeros
        return g

    def feed(self, side: int, i: int, f: Tensor) -> None:
        """Layer i of model A (side 0) or B (side 1): the batch's (b, w) features. Linear: held
        with the layers before it while they are the previous layers of the same side and width
        and all fit ``CENTRE_BYTES``, else after forming the Grams of those (``_flush``), so at
        most about that many bytes of features are alive. Other kernels: the U-centred Gram."""
        if side == 1:
            if self.shared:
                return
            i += self.La
        b = self.rows = f.shape[0]
        if b < self.MIN_BATCH:
            return
        if self.kernel != "linear":
            g = F.centered_gram(f, kernel=self.kernel, sigma=self.sigma, debiased=True).reshape(-1)
            self._buffer((self.L, b * b), f64, f.device)[i].copy_(g)
            return
        p = self.pending
        if p and (i != self.pending_at + len(p) or f.shape != p[0].shape or f.dtype != p[0].dtype
                  or (len(p) + 1) * f.numel() * 4 > CENTRE_BYTES):
            self._flush()
        if not p:
            self.pending_at = i
        p.append(f)

    def _flush(self) -> None:
        """The pending layers (consecutive in the buffer, of one width): stacked into a reused
        scratch in the work dtype, centred (the estimator is translation invariant, and centred
        rows keep the work-dtype Gram precise) and times their transposes, in one batched
        product, into the (L, b, b) buffer (from ``HALF_GRAM_MIN_B`` on their first b/2 rows
        and last diagonal block only: 3/4 of the product)."""
        p, i = self.pending, self.pending_at
        if self.dtype is None:
            self.dtype = work_dtype(p, self.product_dtype)
        k, (b, w) = len(p), p[0].shape
        if self.scratch is None or self.scratch.numel() < k * b * w or self.scratch.dtype != self.dtype:
            self.scratch = torch.empty(k * b * w, dtype=self.dtype, device=p[0].device)
        xs = self.scratch[:k * b * w].view(k, b, w)
        if p[0].dtype == self.dtype:
            torch.stack(p, out=xs)
        else:
            for t, f in enumerate(p):
                xs[t].copy_(f)
        p.clear()
        xs.sub_(xs.mean(1, keepdim=True))
        g = self._buffer((self.L, b, b), self.dtype, xs.device)[i:i + k]
        h = self._half(b)
        if h:
            torch.bmm(xs[:, :h], xs.mT, out=g[:, :h])
            torch.bmm(xs[:, h:], xs[:, h:].mT, out=g[:, h:, h:])
        else:
            torch.bmm(xs, xs.mT, out=g)

    @staticmethod
    def _row_sums(k: Tensor, h: int):
        """Zero the diagonals of the Grams k (L, b, b) as stored (K~); (row sums K~1 (L, b), totals (L,)) float64."""
        k.diagonal(dim1=1, dim2=2).zero_()
        r = k.sum(2)
        if h:  # the rows below h also hold the transpose of the block right of the diagonal
            r[:, h:] += k[:, :h, h:].sum(1)
        r = r.to(f64)  # (a dtype= reduction would widen a copy of k first)
        return r, r.sum(1)

    @staticmethod
    def _half(b: int) -> int:
        """Rows of the Grams formed in full, the rest from the diagonal on: b // 2 from
        ``HALF_GRAM_MIN_B`` on; 0 below it, meaning the Grams are formed whole."""
        return b // 2 if b >= HALF_GRAM_MIN_B else 0

    @classmethod
    def madds(cls, widths_a: Sequence[int], widths_b: Sequence[int], b: int, shared: bool) -> int:
        """Multiply-adds of ``update``'s products on a batch of b samples (linear kernel): each
        layer's Gram (b^2 p, 3/4 of it from ``HALF_GRAM_MIN_B`` on) and every pair's <K~, L~>."""
        h = cls._half(b)
        gram = h * b + (b - h) ** 2 if h else b * b
        widths = list(widths_a) + ([] if shared else list(widths_b))
        return gram * sum(widths) + (b * b + h * (b - h)) * len(widths_a) * len(widths_b)

    def _pairs(self, ka: Tensor, kb: Tensor, h: int) -> Tensor:
        """<K~_i, L~_j> (La, Lb) float64 from the Grams as stored: per ``TRACE_ROWS`` rows a
        (La x r b) @ (r b x Lb) product in the work dtype, summed in float64; with the block
        below the diagonal stored as zeros, the block right of it once more."""
        b = ka.shape[1]
        r = TRACE_ROWS if b % TRACE_ROWS == 0 else 1
        tr = torch.bmm(ka.view(ka.shape[0], b // r, r * b).transpose(0, 1), kb.view(kb.shape[0], b // r, r * b).permute(1, 2, 0))
        tr = tr.sum(0, dtype=f64)
        if h:
            tr += torch.bmm(ka[:, :h, h:].transpose(0, 1), kb[:, :h, h:].permute(1, 2, 0)).sum(0, dtype=f64)
        return tr

    def _self(self, k: Tensor, h: int) -> Tensor:
        """|K~_i|_F^2 (L,) float64 from the Grams as stored."""
        return _sqnorms(k) + _sqnorms(k[:, :h, h:]) if h else _sqnorms(k)

    def end_batch(self) -> Optional[Tensor]:
        """Add the batch fed so far (skipped when b < 4); returns a 0-dim float64 probe that is
        finite iff every feature (and product) is: a sum of what the batch added, NaN or Inf
        when any of it was (the caller reads it once per batch; no separate isfinite pass), or
        None for a skipped batch."""
        if self.pending:
            self._flush()
        b, self.rows = self.rows, None
        if b < self.MIN_BATCH:
            self.skipped += 1
            return None
        scale = 1.0 / (b * (b - 3))
        k = self.grams
        ka, kb = (k, k) if self.shared else (k[:self.La], k[self.La:])
        if self.kernel == "linear":
            h = self._half(b)
            r, t = self._row_sums(k, h)  # every Gram's K~1 and 1^T K~ 1
            ra, ta = r[:self.La], t[:self.La]
            rb, tb = (ra, ta) if self.shared else (r[self.La:], t[self.La:])
            c1, c2 = scale / ((b - 1) * (b - 2)), scale * 2.0 / (b - 2)
            tr = self._pairs(ka, kb, h)  # <K~_i, L~_j> for every pair
            self.hxy.add_(tr, alpha=scale).addr_(ta, tb, alpha=c1).addmm_(ra, rb.mT, alpha=-c2)
            trk = torch.diagonal(tr) if self.shared else self._self(k, h)
            self.h_self.add_(trk, alpha=scale).addcmul_(t, t, value=c1).sub_(_sqnorms(r), alpha=c2)
            probe = t.sum()
        else:
            hxy = ka @ kb.mT * scale
            self.hxy += hxy
            self.h_self.add_((k * k).sum(1), alpha=scale)
            probe = hxy.sum()
        self.n += b
        self.batches += 1
        return probe

    def hsic_terms(self, group=None):
        """(n used, batches used, batches skipped, hxy, hxx, hyy), all-reduced under torch.distributed."""
        counts = torch.tensor([self.n, self.batches, self.skipped], dtype=f64, device=self.hxy.device)
        if is_distributed(group):
            _all_reduce([counts, self.hxy, self.h_self], group)
        n, used, skipped = (int(v) for v in counts.tolist())
        return n, used, skipped, self.hxy, self.hxx, self.hyy
