import torch

import rcka_kernels as rk
from rcka_kernels import reference

from .utils import accept


def test_linear_cka_matches_reference():
    x = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randn(20, 3, dtype=torch.float64) + x[:, :3]
    accept(rk.cka(x, y), reference.cka(x, y), torch.float64)
