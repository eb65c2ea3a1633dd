"""One table of tolerances and one list of awkward shapes for every test."""

import torch

# (dtype) -> (atol, rtol) against the float64 reference. fp32 accumulates in fp32
# inside blocks and float64 across blocks; half inputs are quantised before that,
# so their error is judged against the reference evaluated on the quantised input.
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}

# (n, p, q): odd sizes, p = 1, n < p and n > p, p != q, sample-space and feature-space linear paths
SHAPES = [
    (4, 1, 1),
    (5, 3, 2),
    (7, 1, 9),
    (33, 17, 5),
    (33, 64, 48),
    (1000, 12, 7),
]


def assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)
