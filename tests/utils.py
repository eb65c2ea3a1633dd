"""One table of tolerances and one list of awkward shapes for every test."""

import contextlib
import socket

import pytest
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


def centred_pair(g, n, p, q, seed=0):
    """Correlated, column-centred float64 groups x (g, n, p), y (g, n, q): the
    inputs of the backend-contract tests (the contract takes centred inputs)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g, n, p, generator=gen, dtype=torch.float64)
    y = 0.5 * torch.randn(g, n, q, generator=gen, dtype=torch.float64)
    k = min(p, q)
    y[..., :k] += x[..., :k]
    return x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)


def assert_grads_within_torch_error(got, base, want, inputs, rtol):
    """Gradients of a fused backend (got) against the float64 reference (want),
    judged by the torch backend's own error in the same precision (base)."""
    for g, b, ref, inp in zip(got, base, want, inputs):
        assert g.dtype == inp.dtype and g.shape == inp.shape
        scale = float(ref.abs().max()) or 1.0
        err = float((g.double() - ref).abs().max()) / scale
        err_torch = float((b.double() - ref).abs().max()) / scale
        assert err <= max(2.0 * err_torch, 5.0 * rtol), (err, err_torch)


@contextlib.contextmanager
def fp32_matmul_precision(prec: str, current_api: bool = False):
    """PyTorch's fp32 matmul precision ("tf32" or "ieee") for the block, set through
    torch.backends.cuda.matmul.fp32_precision (the current API), or the legacy
    allow_tf32 where this torch lacks it (a skip instead with ``current_api``)."""
    m = torch.backends.cuda.matmul
    new = getattr(m, "fp32_precision", None) is not None
    if current_api and not new:
        pytest.skip("this torch has only the legacy allow_tf32")
    attr, value = ("fp32_precision", prec) if new else ("allow_tf32", prec == "tf32")
    old = getattr(m, attr)
    setattr(m, attr, value)
    try:
        yield
    finally:
        setattr(m, attr, old)


def free_port() -> int:
    """A free TCP port on localhost, for a gloo process group in a test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, out_dir, world: int) -> list:
    """Run ``worker(rank, port, out_dir)`` in ``world`` gloo processes; each writes
    out_dir/rank{r}.pt, which comes back in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
