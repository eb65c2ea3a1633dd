"""rcka-kernels: exact, fast, memory-efficient kernel alignment (CKA, HSIC, MMD)
and the RCKA/PCKA distillation losses, for PyTorch.

    import rcka_kernels as rk
    loss = rk.cka_loss(student_feats, teacher_feats)     # 1 - linear CKA
    res = rk.compare(teacher, student, loader)           # layer-by-layer CKA over a data set
    rk.available_backends()                              # what can run here, and why not
    rk.native_status()                                   # whether the native ops are built
"""

from . import distributed
from ._dispatch import BackendStatus, available_backends, native_status
from ._validate import config
from .compare import CompareResult, compare
from .functional import (
    centered_gram,
    cka,
    cka_loss,
    gram,
    gram_discrepancy,
    hsic,
    mmd,
    mmd_upper_bound,
)
from .losses import CKALoss, PCKALoss, RCKALoss

__version__ = "0.1.0"

__all__ = [
    "cka",
    "cka_loss",
    "hsic",
    "mmd",
    "gram",
    "centered_gram",
    "gram_discrepancy",
    "mmd_upper_bound",
    "CKALoss",
    "RCKALoss",
    "PCKALoss",
    "distributed",
    "compare",
    "CompareResult",
    "available_backends",
    "native_status",
    "BackendStatus",
    "config",
    "__version__",
]
