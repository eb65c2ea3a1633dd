"""The two accumulators of ``rk.compare``: each takes a batch's layer outputs (``update``)
and gives HSIC terms at the end (``result``); ``estimators`` turns them into CKA.

Layers are *streams*: (model, name) pairs, so a layer of a model compared with itself is
fed once. Features arrive flattened, (b, p), in any float dtype; per-batch products run
in the work dtype (float32, or float64 for float64 features or when asked) and every sum
over batches is float64.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import estimators
from ..functional import gram

Tensor = torch.Tensor
F64 = torch.float64
Pair = Tuple[int, int]


def work_dtype(dtype: torch.dtype, product_dtype: Optional[torch.dtype]) -> torch.dtype:
    """float64 for float64 features or when asked, else float32 (half features included)."""
    return F64 if F64 in (dtype, product_dtype) else torch.float32


def strips(dim: int) -> List[Tuple[int, int]]:
    """0..dim cut into k = min(8, dim // 96) (at least 1) strips (lo, hi). A symmetric
    product A A^T (dim x dim) formed strip by strip, rows lo:hi against rows :hi (the blocks
    on and below the diagonal), takes (k + 1) / (2k) of the full product's multiply-adds,
    each GEMM at least 96 wide (narrower ones cost more in calls than they save);
    ``mirror`` then fills the blocks above the diagonal."""
    k = max(1, min(8, dim // 96))
    cuts = [dim * i // k for i in range(k + 1)]
    return list(zip(cuts, cuts[1:]))


def mirror(m: Tensor, cuts: Sequence[Tuple[int, int]]) -> Tensor:
    """m with each block above the diagonal (of the strips ``cuts``) set to the transpose of
    its mirror image below it: the symmetric matrix whose lower blocks ``m`` holds."""
    for i, (lo, hi) in enumerate(cuts):
        for lo2, hi2 in cuts[i + 1:]:
            m[lo:hi, lo2:hi2] = m[lo2:hi2, lo:hi].mT
    return m


def add_into(total: Tensor, part: Tensor) -> None:
    """total (float64) += part (a product in the work dtype), about 2^20 entries at a time: an
    add_ across dtypes first makes a float64 copy of its whole right-hand side."""
    rows = max(1, (1 << 20) // max(1, part.shape[1]))
    for i in range(0, part.shape[0], rows):
        total[i:i + rows].add_(part[i:i + rows])


#: rows whose products are summed in the work dtype (one GEMM) before they are added in float64:
#: float32 sums over at most this many terms (as one product of a batch this size would be),
#: and one float64 pass over the statistics per block of rows instead of per batch
BLOCK_ROWS = 1024


def exact_bytes(widths: Sequence[int], pairs: Sequence[Pair], debiased: bool, itemsize: int = 4) -> int:
    """Bytes the exact statistics hold: a float64 p_u x p_v block per pair (plus, debiased,
    two vectors and a scalar per pair), float64 sums and shifts per stream, the largest
    product (of ``itemsize`` bytes per entry) before it is added, and up to two blocks of
    rows (the rows waiting and their concatenation)."""
    blocks = sum(widths[u] * widths[v] for u, v in pairs)
    extra = sum(widths[u] + widths[v] + 1 for u, v in pairs) if debiased else 0
    largest = max(widths[u] * widths[v] for u, v in pairs)
    return 8 * (blocks + extra + 3 * sum(widths)) + itemsize * (largest + 2 * BLOCK_ROWS * sum(widths))


class ExactStats:
    """The exact (whole data set) linear-kernel HSIC of stream pairs, from feature-space sums.

    Every stream u is shifted by a fixed c_u (its first batch's mean: HSIC does not depend
    on it, and the sums stay small). For a pair (u, v) with shifted rows x_k, y_k:
        M = sum_k x_k y_k^T,   s = sum_k x_k,   t = sum_k y_k,
    and for the debiased estimator, with d_k = |x_k|^2 and e_k = |y_k|^2,
        D = sum d,  E = sum e,  DE = sum d e,  U = sum e x,  V = sum d y.
    Then the sums of ``estimators.hsic`` over the n x n Grams K = X X^T, L = Y Y^T are
        biased:    <K,L> = |M|^2,       (K1).(L1) = s'Mt,                 1'K1 = |s|^2,
        debiased:  <K,L> = |M|^2 - DE,  (K1).(L1) = s'Mt - s.U - t.V + DE,  1'K1 = |s|^2 - D
    (debiased: the Grams with zero diagonals), so memory does not grow with n. Rows are
    gathered into blocks of up to ``BLOCK_ROWS`` (more when one batch is larger): each
    block's products are GEMMs in the work dtype, added to the float64 sums; a stream's own
    M = X^T X is symmetric, so only its strips on and below the diagonal are formed
    (``strips``) and ``result`` mirrors them.
    """

    def __init__(self, widths: Sequence[int], pairs: Sequence[Pair], debiased: bool, device, dtype: torch.dtype):
        self.widths, self.pairs, self.debiased, self.dtype = list(widths), list(pairs), debiased, dtype
        self.n = 0
        self.rows: List[List[Tensor]] = []  # shifted rows waiting for their block's products: per batch, per stream
        self.shift: Optional[List[Tensor]] = None
        self.s = [torch.zeros(w, dtype=F64, device=device) for w in widths]
        self.D = torch.zeros(len(widths), dtype=F64, device=device)
        self.M = {pq: torch.zeros(widths[pq[0]], widths[pq[1]], dtype=F64, device=device) for pq in self.pairs}
        # each batch's products land here before their float64 sum (one buffer: no allocation per product)
        self.scratch = torch.empty(max(widths[u] * widths[v] for u, v in self.pairs), dtype=dtype, device=device)
        if debiased:
            self.DE = {pq: torch.zeros((), dtype=F64, device=device) for pq in self.pairs}
            self.U = {pq: torch.zeros(widths[pq[0]], dtype=F64, device=device) for pq in self.pairs}
            self.V = {pq: torch.zeros(widths[pq[1]], dtype=F64, device=device) for pq in self.pairs}

    def set_shift(self, shift: List[Tensor]) -> None:
        self.shift = [c.to(self.dtype) for c in shift]

    def update(self, feats: Sequence[Tensor]) -> Tensor:
        """Add one batch (feats[u]: (b, p_u), every stream); returns a probe per stream,
        finite exactly when the batch's features are."""
        xs = [f.to(self.dtype) - c for f, c in zip(feats, self.shift)]
        self.rows.append(xs)
        if sum(x[0].shape[0] for x in self.rows) >= BLOCK_ROWS:
            self.flush()
        return torch.stack([x.sum(dtype=F64) for x in xs])

    def flush(self) -> None:
        """The waiting rows' products, added to the statistics."""
        if not self.rows:
            return
        xs = [torch.cat(block) for block in zip(*self.rows)]
        self.rows = []
        self.n += xs[0].shape[0]
        d = torch.stack([torch.linalg.vector_norm(x, dim=1) for x in xs]).square_() if self.debiased else None
        for u, x in enumerate(xs):
            self.s[u] += x.sum(0, dtype=F64)
        for (u, v) in self.pairs:  # float32 products, float64 sums (no float64 copy of a product)
            if u == v:  # X^T X: the strips on and below the diagonal (``result`` mirrors them)
                for lo, hi in strips(self.widths[u]):
                    add_into(self.M[(u, u)][lo:hi, :hi], torch.mm(xs[u][:, lo:hi].mT, xs[u][:, :hi], out=self._scratch(hi - lo, hi)))
            else:
                add_into(self.M[(u, v)], torch.mm(xs[u].mT, xs[v], out=self._scratch(self.widths[u], self.widths[v])))
            if self.debiased:
                du, dv = d[u].to(F64), d[v].to(F64)
                self.DE[(u, v)] += du @ dv
                self.U[(u, v)] += (dv.to(self.dtype) @ xs[u]).to(F64)
                self.V[(u, v)] += (du.to(self.dtype) @ xs[v]).to(F64)
        if self.debiased:
            self.D += d.sum(1, dtype=F64)

    def _scratch(self, rows: int, cols: int) -> Tensor:
        return self.scratch[: rows * cols].view(rows, cols)

    def all_reduce(self, group) -> None:
        self.flush()
        tensors = [torch.tensor([float(self.n)], dtype=F64, device=self.D.device), *self.s, self.D, *self.M.values()]
        if self.debiased:
            tensors += [*self.DE.values(), *self.U.values(), *self.V.values()]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat, group=group)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))
        self.n = int(tensors[0].item())

    def result(self) -> Dict[Pair, Tensor]:
        """HSIC (float64, 0-dim) of every pair."""
        self.flush()
        out = {}
        for (u, v), m in self.M.items():
            if u == v:
                m = mirror(m, strips(self.widths[u]))
            s, t = self.s[u], self.s[v]
            ab, rr, ta, tb = torch.dot(m.view(-1), m.view(-1)), s @ m @ t, s @ s, t @ t  # |M|^2 without an M-sized temporary
            if self.debiased:
                de = self.DE[(u, v)]
                ab, rr = ab - de, rr - s @ self.U[(u, v)] - t @ self.V[(u, v)] + de
                ta, tb = ta - self.D[u], tb - self.D[v]
            out[(u, v)] = estimators.hsic(ab, rr, ta, tb, self.n, self.debiased)
        return out


def _take(k: Tensor, idx: List[int]) -> Tensor:
    """Rows ``idx`` (sorted) of k: a view where they are consecutive (one model's layers), else a copy."""
    if idx == list(range(idx[0], idx[-1] + 1)):
        return k[idx[0]: idx[-1] + 1]
    return k[torch.tensor(idx, device=k.device)]


class MinibatchStats:
    """Nguyen et al. (2021): each batch's unbiased HSIC of every pair, summed over batches.

    Each stream's Gram with its diagonal set to 0 (b x b: the linear Gram of the batch's
    centred features, formed strip by strip and mirrored (``strips``); ``rk.gram`` for other
    kernels) is formed as its output arrives and stored, in float64, as row u of K (S, b^2),
    so a batch's features need not all stay alive. At the end of the batch the sums of
    ``estimators.hsic`` for every pair come from K in float64 (the estimator's terms cancel;
    float64 keeps the digits they share): <K_u, K_v> from one product of the pairs' two sides
    (and each stream's own from its row), the row sums r_u = K_u 1 and totals t_u = 1' K_u 1.
    Batches of fewer than 4 samples are skipped (counted).
    """

    def __init__(self, n_streams: int, pairs: Sequence[Pair], kernel: str, sigma, device, dtype: torch.dtype):
        self.pairs, self.kernel, self.sigma, self.dtype = list(pairs), kernel, sigma, dtype
        self.h = torch.zeros(len(self.pairs), dtype=F64, device=device)
        self.k: Optional[Tensor] = None  # K of the batch: row u = stream u's zero-diagonal Gram, flattened
        self.formed = False
        self.n = self.batches = self.skipped = self.b = 0
        us = torch.tensor([u for u, _ in self.pairs], dtype=torch.long)
        vs = torch.tensor([v for _, v in self.pairs], dtype=torch.long)
        self.index = (us.to(device), vs.to(device))
        cross = [(i, u, v) for i, (u, v) in enumerate(self.pairs) if u != v]
        self.own = torch.tensor([i for i, (u, v) in enumerate(self.pairs) if u == v], dtype=torch.long, device=device)
        self.own_u = self.index[0][self.own]
        self.rows, self.cols = sorted({u for _, u, _ in cross}), sorted({v for _, _, v in cross})
        self.cross = torch.tensor([i for i, _, _ in cross], dtype=torch.long, device=device)
        self.at = (torch.tensor([self.rows.index(u) for _, u, _ in cross], dtype=torch.long, device=device),
                   torch.tensor([self.cols.index(v) for _, _, v in cross], dtype=torch.long, device=device))
        self.n_streams, self.device = n_streams, device

    def add(self, u: int, f: Tensor) -> None:
        """Stream u's features for this batch (its Gram is formed now)."""
        b = self.b = f.shape[0]
        if b < 4:
            return
        f = f.to(self.dtype)
        if self.kernel == "linear":
            f = f - f.mean(0, keepdim=True)  # the Gram's entries without the features' mean: no digits lost to it
            cuts = strips(b)
            g = f.new_empty(b, b)
            for lo, hi in cuts:
                torch.mm(f[lo:hi], f[:hi].mT, out=g[lo:hi, :hi])
            g = mirror(g, cuts)
        else:
            g = gram(f, kernel=self.kernel, sigma=self.sigma)
        if self.k is None or self.k.shape[1] != b * b:
            self.k = torch.empty(self.n_streams, b * b, dtype=F64, device=self.device)
        self.k[u].view(b, b).copy_(g).fill_diagonal_(0.0)
        self.formed = True

    def _inner(self, k: Tensor) -> Tensor:
        """<K_u, K_v> of every pair."""
        ab = k.new_empty(len(self.pairs))
        ab[self.own] = torch.einsum("ij,ij->i", k, k)[self.own_u]
        if self.rows:
            ab[self.cross] = (_take(k, self.rows) @ _take(k, self.cols).mT)[self.at]
        return ab

    def update(self) -> Optional[Tensor]:
        """Close the batch; returns a probe per stream (finite exactly when its features were),
        or None for a skipped batch."""
        if not self.formed:
            self.skipped += 1
            return None
        self.formed = False
        k, b = self.k, self.b
        r = k.view(k.shape[0], b, b).sum(2)  # row sums
        t = r.sum(1)
        u, v = self.index
        self.h += estimators.hsic(self._inner(k), (r @ r.mT)[u, v], t[u], t[v], b, True)
        self.n += b
        self.batches += 1
        return t

    def all_reduce(self, group) -> None:
        counts = torch.tensor([self.n, self.batches, self.skipped], dtype=F64, device=self.h.device)
        torch.distributed.all_reduce(self.h, group=group)
        torch.distributed.all_reduce(counts, group=group)
        self.n, self.batches, self.skipped = (int(c) for c in counts.tolist())

    def result(self) -> Dict[Pair, Tensor]:
        return dict(zip(self.pairs, self.h.unbind()))
