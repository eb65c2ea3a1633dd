"""Loss modules: thin nn.Module wrappers over rcka_kernels.functional."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F

__all__ = ["CKALoss"]


def _reduce(v: torch.Tensor, reduction: str) -> torch.Tensor:
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
