"""What only the CUDA C++ kernels under the CPU emulation show.

csrc/module.cpp and the SIMT kernels of csrc/pair_kernels.cuh are compiled with g++
against tests/build/cuda_host/emu.h (one std::thread per CUDA thread, barriers for
__syncthreads and shuffles, NaN-filled shared memory) into a stand-in for
rcka_kernels._rcka_cuda (tests/conftest.py: cuda_emulation). Its values and
gradients are held to the reference by tests/test_parity.py and its bad inputs by
tests/test_catalogue.py (the cuda-emulated environment); here: the module's own
argument checks, and that the backward does not depend on the order the blocks run in.
The fp16/bf16 tensor-core path runs on an emulation of wmma (the documented fragment
layouts): that checks the tile offsets and alignment, not the hardware (GPU runs do).
"""

import pytest
import torch

from rcka_kernels.ops import cuda_backend

from .utils import gamma, pair


@pytest.fixture
def cb(cuda_emulation):
    """The cuda backend's contract over the emulation, on CPU tensors."""
    return cuda_backend.Kernels(cuda_emulation, ("cpu",))


def _inputs(g, n, p, q, dtype):
    return pair(n, p, q, dtype, batch=(g,), centred=True, device="cpu")


def test_emulated_module_checks_arguments(cuda_emulation):
    emu = cuda_emulation
    with pytest.raises(ValueError, match="unknown dtype"):
        emu.pair_forward(0, 9, 1, (256, 0, 4, 4, 2, 8, 0, 2, 1), (256, 0, 4, 4, 2, 8, 0, 2, 1), 256, 256, 256, 256, 256, 0, 0)
    assert emu.device_status()["device_count"] == 1


# one dtype stands for the others (the same kernel templates); float64 with the slow tests
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float64, marks=pytest.mark.slow)])
def test_backward_is_deterministic_whatever_the_block_order(cb, monkeypatch, dtype):
    """Each block owns the rows it updates (no atomics): with the blocks run in
    shuffled orders, as a GPU may run them, the gradients are bitwise equal."""
    x, y = _inputs(2, 150, 5, 18, dtype)  # several row blocks: the tiled path
    gx, gy = gamma(x), gamma(y)
    gen = torch.Generator().manual_seed(5)
    gs = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    grx = torch.randn(2, 150, generator=gen, dtype=torch.float64).to(dtype)
    gry = torch.randn(2, 150, generator=gen, dtype=torch.float64).to(dtype)
    z = torch.cat([x, x + 0.5], 1)[:, :130].contiguous()
    outs = []
    for seed in (None, "1", "2"):
        if seed is None:
            monkeypatch.delenv("RCKA_EMU_BLOCK_ORDER", raising=False)
        else:
            monkeypatch.setenv("RCKA_EMU_BLOCK_ORDER", seed)
        outs.append(cb.rbf_stats_backward(x, y, gx, gy, gs, grx, gry) + cb.rbf_mmd_sums_backward(x, z, gx, gs))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
