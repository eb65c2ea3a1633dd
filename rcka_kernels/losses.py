"""Loss modules: thin nn.Module wrappers over rcka_kernels.functional.

- ``CKALoss``: 1 - CKA(x, y), the drop-in for naive CKA losses.
- ``RCKALoss``: the relation-based CKA distillation loss of Zhou et al. (IJCAI
  2024) on classification logits (sample-axis + class-axis terms).
- ``PCKALoss``: its patch-based variant on detection feature maps.

Two modes (see docs/losses.md for the side-by-side comparison):

``official=False`` (default): true centred CKA. Each term is
``weight * (1 - CKA)`` and lies in [0, weight] (biased CKA is in [0, 1]).

``official=True``: what the published code computes, for exact reproduction.
No centring; each term is ``-weight * A(K, L)`` with the uncentred alignment
``A = tr(K L^T) / sqrt(tr(K K^T) tr(L L^T))`` of linear Grams K = X X^T, L = Y Y^T;
``l2_norm=True`` divides row i of each Gram by sqrt(K_ii) (rows only, so the
scaled Grams are not symmetric); and the class-axis term is weighted by
``intra_weight`` (``inter_weight`` only switches it on).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as TF
from torch import nn

from . import _dispatch, _validate, estimators, reference
from . import functional as F
from .ops.linear import axis_pair_alignment
from .ops.torch_backend import compute_dtype

__all__ = ["CKALoss", "RCKALoss", "PCKALoss", "official_alignment"]

Tensor = torch.Tensor


def _reduce(v: torch.Tensor, reduction: str) -> torch.Tensor:
    if v.dim() == 0 and reduction in ("mean", "sum", "none"):  # one group: nothing to reduce (no extra op)
        return v
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    if reduction == "none":
        return v
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class CKALoss(nn.Module):
    """1 - CKA(x, y): the drop-in for naive CKA losses.

    ``forward(x, y)``: by default (``flatten=True``) x (n, ...) and y (n, ...) are
    flattened to (n, p) and (n, q), as naive losses do with ``x.view(n, -1)``,
    and the loss is a scalar. With ``flatten=False`` inputs are (..., n, p) and
    (..., n, q) groups whose losses are reduced by ``reduction``
    ("mean" | "sum" | "none").
    """

    def __init__(self, kernel: str = "linear", sigma=None, debiased: bool = False, backend: str = "auto",
                 flatten: bool = True, reduction: str = "mean"):
        super().__init__()
        _reduce(torch.zeros(1), reduction)  # validate early
        _validate.check_options("CKALoss", kernel, sigma, debiased, backend)
        _validate.check_flag("CKALoss", "flatten", flatten)
        self.kernel, self.sigma, self.debiased = kernel, sigma, debiased
        self.backend, self.flatten, self.reduction = backend, flatten, reduction

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            if x.ndim < 2 or y.ndim < 2:
                raise ValueError(f"CKALoss: inputs must be (n, ...) with at least 2 dims, got {tuple(x.shape)} and {tuple(y.shape)}")
            x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
        loss = F.cka_loss(x, y, kernel=self.kernel, sigma=self.sigma, debiased=self.debiased, backend=self.backend)
        return _reduce(loss, self.reduction)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, sigma={self.sigma!r}, debiased={self.debiased}, backend={self.backend!r}"


# ----------------------------------------------------------------------------- official alignment


def _inv_sqrt(d: Tensor) -> Tensor:
    """1/sqrt(d) where d > 0, else 0 (a zero row has a zero Gram row: it contributes nothing)."""
    pos = d > 0
    return torch.where(pos, torch.rsqrt(torch.where(pos, d, torch.ones_like(d))), torch.zeros_like(d))


def _official_l2(x: Tensor, y: Tensor) -> Tensor:
    """A(K', L') with K'_ij = K_ij / sqrt(K_ii), without any n x n x n product.

    tr(K' L'^T) = sum_ij K_ij L_ij / (|x_i| |y_i|)
                = <X^T D Y, X^T Y>_F,   D = diag(1 / (|x_i| |y_i|))      (feature space)
    tr(K' K'^T) = sum_ij K_ij^2 / |x_i|^2 = <X^T D_x X, X^T X>_F          (D_x = diag(1/|x_i|^2))
    The sample-space form sums the n x n products directly; the cheaper side is used.
    """
    n, p, q = x.shape[-2], x.shape[-1], y.shape[-1]
    ix = _inv_sqrt((x * x).sum(-1))  # 1/|x_i|
    iy = _inv_sqrt((y * y).sum(-1))
    xt, yt = x.transpose(-1, -2), y.transpose(-1, -2)
    if n * (p * q + p * p + q * q) <= n * n * (p + q):
        xty = xt @ y
        kl = (xty * (xt @ (y * (ix * iy)[..., None]))).sum((-1, -2))
        kk = ((xt @ x) * (xt @ (x * (ix * ix)[..., None]))).sum((-1, -2))
        ll = ((yt @ y) * (yt @ (y * (iy * iy)[..., None]))).sum((-1, -2))
    else:
        k, l = x @ xt, y @ yt
        kl = ((k * l).sum(-1) * ix * iy).sum(-1)
        kk = ((k * k).sum(-1) * ix * ix).sum(-1)
        ll = ((l * l).sum(-1) * iy * iy).sum(-1)
    return estimators.alignment(kl, kk, ll)


@_validate.autocast_off
def official_alignment(x: Tensor, y: Tensor, l2_norm: bool = False, backend: str = "auto") -> Tensor:
    """The official RCKA code's alignment tr(K L^T) / sqrt(tr(K K^T) tr(L L^T)).

    x (..., n, p), y (..., n, q) -> x.shape[:-2]. Uncentred linear Grams
    K = X X^T, L = Y Y^T; with ``l2_norm`` each Gram row i is divided by
    sqrt(K_ii) (rows only). Without ``l2_norm`` this is the uncentred linear
    alignment |X^T Y|_F^2 / (|X^T X|_F |Y^T Y|_F) and runs on the library's
    backends; with it, it is computed in O(n p q) or O(n^2 (p + q)), whichever
    is cheaper. A single sample (n = 1) has alignment 1. Zero rows contribute 0.
    """
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"official_alignment: x and y must have the same leading dims and samples, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not l2_norm:
        return F.official_alignment(x, y, backend=backend)
    x, y = _validate.promote(x, y)
    cd = compute_dtype(x.dtype)
    if backend == "reference":
        return reference.official_alignment(x, y, l2_norm).to(cd)
    return _official_l2(x.to(cd), y.to(cd))


# ----------------------------------------------------------------------------- shared term


class _AlignmentTerms(nn.Module):
    """Options and the one-term computation shared by RCKALoss and PCKALoss."""

    def __init__(self, intra_weight, inter_weight, official, l2_norm, debiased, kernel, sigma, backend):
        super().__init__()
        fn = type(self).__name__
        _validate.check_options(fn, kernel, sigma, debiased, backend)
        _validate.check_flag(fn, "official", official)
        _validate.check_flag(fn, "l2_norm", l2_norm)
        if l2_norm and not official:
            raise ValueError("l2_norm=True is the official code's Gram row scaling; it needs official=True")
        if official and (kernel != "linear" or debiased):
            raise ValueError("official=True reproduces the published code: linear kernel, no centring, no debiasing")
        self.intra_weight, self.inter_weight = float(intra_weight), inter_weight
        self.official, self.l2_norm, self.debiased = official, l2_norm, debiased
        self.kernel, self.sigma, self.backend = kernel, sigma, backend

    @property
    def _class_axis_on(self) -> bool:
        # official: `if inter_weight:` (0 and None are off); true CKA: None is off
        return bool(self.inter_weight) if self.official else self.inter_weight is not None

    def _term(self, s: Tensor, t: Tensor, weight: float) -> Tensor:
        """weight * (1 - CKA(s, t)) or, officially, -weight * A(t, s); (G, n, p) -> (G,) or (n, p) -> ()."""
        n = s.shape[-2]
        if self.official:
            return -weight * official_alignment(t, s, self.l2_norm, self.backend)
        if n < (4 if self.debiased else 2):
            # no pairwise relation to align between fewer than two samples: a constant term
            z = 0.0 * s.sum((-1, -2))
            return z.to(compute_dtype(z.dtype))
        return weight * F.cka_loss(s, t, kernel=self.kernel, sigma=self.sigma, debiased=self.debiased, backend=self.backend)

    def extra_repr(self) -> str:
        mode = f"official=True, l2_norm={self.l2_norm}" if self.official else f"kernel={self.kernel!r}, debiased={self.debiased}"
        return f"intra_weight={self.intra_weight}, inter_weight={self.inter_weight}, {mode}, backend={self.backend!r}"


# ----------------------------------------------------------------------------- RCKA


class RCKALoss(_AlignmentTerms):
    """Relation-based CKA distillation loss on logits (Zhou et al., IJCAI 2024).

    ``forward(student_logits, teacher_logits, student_features=None, teacher_features=None)``:
    logits are (N, P) (the same shape for both); features (N, ...) are flattened
    to (N, -1) (their widths may differ). Returns a scalar (no cross-entropy).

    Terms (true CKA, ``official=False``):
      - sample axis (N x N relations):  intra_weight * (1 - CKA(s, t))
      - class axis (P x P relations):   inter_weight * (1 - CKA(s^T, t^T));  inter_weight=None: off
      - features (optional):            feature_weight * (1 - CKA(fs, ft))
    ``temperature`` T: the sample-axis term compares softmax(logits / T) (as in
    the published code, the class-axis term sees the raw logits).

    ``official=True``: each term is -weight * A (uncentred alignment, see
    ``official_alignment``), the class-axis term uses ``intra_weight`` (set
    ``inter_weight`` to any non-zero value to switch it on), ``l2_norm`` scales
    Gram rows by 1/sqrt(diag). Defaults (intra_weight=15, inter_weight=None)
    follow the published code.

    ``kernel``, ``sigma``, ``debiased`` and ``backend`` are passed to
    ``rcka_kernels.functional.cka``.
    """

    def __init__(self, intra_weight: float = 15.0, inter_weight: Optional[float] = None,
                 temperature: Optional[float] = None, feature_weight: Optional[float] = None,
                 official: bool = False, l2_norm: bool = False, debiased: bool = False,
                 kernel: str = "linear", sigma=None, backend: str = "auto"):
        super().__init__(intra_weight, inter_weight, official, l2_norm, debiased, kernel, sigma, backend)
        if temperature is not None and temperature <= 0:
            raise ValueError(f"RCKALoss: temperature must be positive, got {temperature}")
        self.temperature, self.feature_weight = temperature, feature_weight

    @property
    def _class_weight(self) -> float:
        return self.intra_weight if self.official else float(self.inter_weight)

    def _both_axes(self, ss: Tensor, ts: Tensor, s: Tensor, t: Tensor) -> Optional[Tensor]:
        """The sample-axis term on (ss, ts) plus the class-axis term on (s, t) in one op
        (ops/linear.axis_pair_alignment), for the linear options it covers; None otherwise."""
        if self.kernel != "linear" or self.sigma is not None or self.debiased or self.l2_norm or not self._class_axis_on:
            return None
        if not self.official and min(s.shape) < 2:
            return None  # a constant term (see _term)
        _validate.check_pair("RCKALoss", ss, ts, same_rows=True, same_cols=True, min_rows=1, finite=False)
        name = _dispatch.resolve(self.backend, s.device, "linear")
        if name == "reference":
            return None
        check = "RCKALoss" if _validate.wants_finite_check(s.device) else None
        ws, wc = self.intra_weight, self._class_weight
        offset = 0.0 if self.official else ws + wc  # official: -w A; true CKA: w (1 - CKA)
        return axis_pair_alignment(ss, ts, s, t, -ws, -wc, offset, not self.official, name, check)

    @_validate.autocast_off
    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                student_features: Optional[Tensor] = None, teacher_features: Optional[Tensor] = None) -> Tensor:
        s, t = student_logits, teacher_logits
        if s.ndim != 2 or s.shape != t.shape:
            raise ValueError(
                f"RCKALoss: student and teacher logits must both be (N, P) with the same shape, got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        _validate.check_tensor("RCKALoss", "student_logits", s)
        _validate.check_tensor("RCKALoss", "teacher_logits", t)
        s, t = _validate.promote(s, t)
        if self.temperature is not None:
            ss, ts = (s / self.temperature).softmax(-1), (t / self.temperature).softmax(-1)
        else:
            ss, ts = s, t
        loss = self._both_axes(ss, ts, s, t)
        if loss is None:
            loss = self._term(ss, ts, self.intra_weight)
            if self._class_axis_on:
                loss = loss + self._term(s.transpose(0, 1), t.transpose(0, 1), self._class_weight)
        if (student_features is None) != (teacher_features is None):
            raise ValueError("RCKALoss: give both student_features and teacher_features, or neither")
        if student_features is not None and self.feature_weight:
            fs, ft = student_features, teacher_features
            if fs.shape[0] != s.shape[0] or ft.shape[0] != s.shape[0]:
                raise ValueError(
                    f"RCKALoss: features must have the logits' batch size {s.shape[0]}, got {tuple(fs.shape)} and {tuple(ft.shape)}"
                )
            _validate.check_tensor("RCKALoss", "student_features", fs)
            _validate.check_tensor("RCKALoss", "teacher_features", ft)
            fs, ft = _validate.promote(fs.reshape(fs.shape[0], -1), ft.reshape(ft.shape[0], -1))
            loss = loss + self._term(fs, ft, float(self.feature_weight))
        return loss


# ----------------------------------------------------------------------------- PCKA


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def patchify(f: Tensor, patch_size: int = 16, size=None) -> Tensor:
    """(B, C, H, W) -> (C, U*V, B*ps*ps): per channel, one row per ps x ps patch.

    The map is first resized (bilinear) to ``size`` (default: H and W rounded up
    to multiples of ``patch_size``), as the published PCKA code does.
    """
    b, c, h, w = f.shape
    hp, wp = size if size is not None else (_round_up(h, patch_size), _round_up(w, patch_size))
    if (h, w) != (hp, wp):
        f = TF.interpolate(f, size=(hp, wp), mode="bilinear", align_corners=False)
    u, v = hp // patch_size, wp // patch_size
    f = f.reshape(b, c, u, patch_size, v, patch_size).permute(1, 2, 4, 0, 3, 5)
    return f.reshape(c, u * v, b * patch_size * patch_size)


class PCKALoss(_AlignmentTerms):
    """Patch-based CKA distillation loss on detection feature maps (one FPN level per call).

    ``forward(student_feat, teacher_feat)``: (B, C, H, W) maps with the same B
    and C, and H, W that round up to the same multiples of ``patch_size``.
    Both are resized (bilinear) to H, W rounded up to multiples of
    ``patch_size``; for each channel the (patches) x (B * ps * ps) matrix is
    compared: intra_weight * (1 - CKA over patches) plus, if ``inter_weight`` is
    set, inter_weight * (1 - CKA of the transposed matrices); the loss is the
    mean over channels. All channels go to the backend in one batched call.
    With a single patch the patch-axis term is constant (0 for true CKA; -weight
    officially, where the alignment of 1 x 1 Grams is 1).

    ``official=True`` as in ``RCKALoss`` (the transposed term uses intra_weight).
    """

    def __init__(self, patch_size: int = 16, intra_weight: float = 15.0, inter_weight: Optional[float] = None,
                 official: bool = False, l2_norm: bool = False, debiased: bool = False,
                 kernel: str = "linear", sigma=None, backend: str = "auto"):
        super().__init__(intra_weight, inter_weight, official, l2_norm, debiased, kernel, sigma, backend)
        if patch_size < 1:
            raise ValueError(f"PCKALoss: patch_size must be >= 1, got {patch_size}")
        self.patch_size = int(patch_size)

    @_validate.autocast_off
    def forward(self, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        s, t = student_feat, teacher_feat
        ps = self.patch_size
        if s.ndim != 4 or t.ndim != 4 or s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"PCKALoss: student and teacher maps must be (B, C, H, W) with the same B and C, got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        _validate.check_tensor("PCKALoss", "student_feat", s)
        _validate.check_tensor("PCKALoss", "teacher_feat", t)
        s, t = _validate.promote(s, t)
        size = (_round_up(s.shape[2], ps), _round_up(s.shape[3], ps))
        if size != (_round_up(t.shape[2], ps), _round_up(t.shape[3], ps)):
            raise ValueError(
                f"PCKALoss: student {tuple(s.shape[2:])} and teacher {tuple(t.shape[2:])} spatial sizes round up to "
                f"different multiples of patch_size={ps}"
            )
        sp, tp = patchify(s, ps, size), patchify(t, ps, size)
        loss = self._term(sp, tp, self.intra_weight)
        if self._class_axis_on:
            w = self.intra_weight if self.official else float(self.inter_weight)
            loss = loss + self._term(sp.transpose(1, 2), tp.transpose(1, 2), w)
        return loss.mean()

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, " + super().extra_repr()
