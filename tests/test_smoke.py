import pytest
import torch

import rcka_kernels as rk
from rcka_kernels import reference

from .utils import GPU_ENVIRONMENTS, REQUIRE, accept, lacks, require


def test_linear_cka_matches_reference():
    x = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randn(20, 3, dtype=torch.float64) + x[:, :3]
    accept(rk.cka(x, y), reference.cka(x, y), torch.float64)


@pytest.mark.parametrize("name", [n for n in REQUIRE if n not in GPU_ENVIRONMENTS or torch.cuda.is_available()])
def test_environment_has_what_it_needs(name):
    """Each test environment this machine can have (tests/utils.py: ENVIRONMENTS) has what it
    needs. Where one lacks something its tests are not generated, and this skip says what is
    missing; with the environment's RCKA_REQUIRE_* switch set (CI: .ci/run) it fails instead."""
    require(REQUIRE[name], lacks(name))
