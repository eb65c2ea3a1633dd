"""What only the cuda backend on a GPU shows: many small groups in one launch equal the
same groups one at a time (bitwise), the kernels run on the current stream, and the
wrapper's own checks. Its values and gradients are held to the reference by
tests/test_parity.py and its bad inputs by tests/test_catalogue.py (the cuda
environment). Skipped without a CUDA device (the ``gpu`` marker); on a GPU machine
where the library is not built, skipped with the reason unless RCKA_REQUIRE_CUDA=1.
"""

import pytest
import torch

from rcka_kernels import _cuda

from .utils import gamma, pair, require

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_library():
    require("RCKA_REQUIRE_CUDA", _cuda.reason() and f"cuda backend unavailable: {_cuda.reason()}")


def _cb():
    from rcka_kernels.ops import cuda_backend

    return cuda_backend


def _inputs(g, n, p, q, dtype):
    return pair(n, p, q, dtype, batch=(g,), centred=True, device="cuda")


def test_many_small_groups_match_one_by_one():
    # PCKA-style: many tiny groups in one launch equal the same groups one at a time
    x, y = _inputs(37, 16, 9, 4, torch.float32)
    gx, gy = gamma(x), gamma(y)
    s, rx, _ = _cb().rbf_stats(x, y, gx, gy)
    for i in (0, 17, 36):
        si, rxi, _ = _cb().rbf_stats(x[i : i + 1].contiguous(), y[i : i + 1].contiguous(), gx[i : i + 1], gy[i : i + 1])
        torch.testing.assert_close(s[i : i + 1], si, rtol=0, atol=0)
        torch.testing.assert_close(rx[i : i + 1], rxi, rtol=0, atol=0)


def test_runs_on_the_current_stream():
    x, y = _inputs(2, 150, 10, 6, torch.float32)
    gx, gy = gamma(x), gamma(y)
    expected = _cb().rbf_stats(x, y, gx, gy)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _cb().rbf_stats(x, y, gx, gy)[0]
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)


def test_wrapper_rejects_bad_inputs():
    x, y = _inputs(1, 10, 4, 3, torch.float32)
    g = torch.ones(1, device="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        _cb().rbf_stats(x.transpose(1, 2).contiguous().transpose(1, 2), y, g, g)
    with pytest.raises(TypeError, match="dtype"):
        _cb().rbf_stats(x, y.double(), g, g)
    with pytest.raises(ValueError, match="rows"):
        _cb().rbf_stats(x, y[:, :9].contiguous(), g, g)
    with pytest.raises(ValueError, match="features"):
        _cb().rbf_mmd_sums(x, y, g)
    with pytest.raises(ValueError, match="shape"):
        _cb().rbf_stats(x, y, torch.ones(2, device="cuda"), g)
