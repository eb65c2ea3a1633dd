"""What every numerical test shares: the environments, the shapes, the tolerance table
and the one acceptance rule.

Environments (``ENVIRONMENTS``; the ``env`` and ``kernel_env`` fixtures of
tests/conftest.py yield an ``Env`` for each): every backend wherever it can run. On the
CPU: the float64 reference, the torch backend (with its native ops and without),
Triton in its interpreter and the CUDA C++ kernels under the CPU emulation; on a GPU
(the ``gpu`` marker): torch, Triton and CUDA C++ there.

Acceptance (``accept``): a result is held to the float64 reference evaluated on the
same (quantised) inputs; its largest error may be twice the torch backend's own error
in the same dtype on the same inputs, and never has to be below a floor from ``TOL``.
The torch backend itself is held to the floor.
"""

import contextlib
import importlib.util
import itertools
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

# (dtype) -> (atol, rtol): the floor of the acceptance rule. fp32 accumulates in fp32
# inside blocks and float64 across blocks; half inputs are quantised before that,
# so their error is judged against the reference evaluated on the quantised input.
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (n, p, q): odd sizes, p = 1, n < p and n > p, p != q, sample-space and feature-space
# linear paths; n across Triton's 16-row tiles (the interpreter runs with 16-row tiles)
# and its default 64, features wider than 64 (the backward's 128-column chunks), the
# CUDA kernels' small-group (n <= 128) and tiled paths with a ragged last tile
SHAPES = [
    (4, 1, 1),
    (5, 3, 2),
    (7, 1, 9),
    (33, 17, 5),
    (33, 64, 48),
    (40, 80, 12),
    (70, 6, 3),
    (129, 200, 31),
    (150, 5, 18),
    (300, 12, 7),
    (2049, 64, 128),
]
KERNELS = [("linear", None), ("rbf", None), ("rbf", "mean"), ("rbf", 1.3)]


# ----------------------------------------------------------------------------- environments

# (environment, backend, device); the GPU ones run where a GPU is
ENVIRONMENTS = [
    pytest.param(("reference", "reference", "cpu"), id="reference"),
    pytest.param(("torch", "torch", "cpu"), id="torch"),
    pytest.param(("torch-python", "torch", "cpu"), id="torch-python"),
    pytest.param(("triton-interpreter", "triton", "cpu"), id="triton-interpreter", marks=pytest.mark.interpreter),
    pytest.param(("cuda-emulated", "cuda", "cpu"), id="cuda-emulated"),
    pytest.param(("torch-cuda", "torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param(("triton-cuda", "triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param(("cuda", "cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
]
#: the environments whose kernels are held to the reference (the reference is the yardstick)
KERNEL_ENVIRONMENTS = [e for e in ENVIRONMENTS if e.values[0][0] != "reference"]
GPU_ENVIRONMENTS = ("torch-cuda", "triton-cuda", "cuda")

# The largest n each CPU environment runs in reasonable time (each program of the
# interpreter is NumPy code, each CUDA thread of the emulation a std::thread, and the
# float64 reference with its gradients is O(n^2) memory and O(n^3) time on the CPU):
# larger n runs on GPUs only.
MAX_N = {"triton-interpreter": 80, "cuda-emulated": 140, "torch": 320, "torch-python": 320, "reference": 320}
# The emulators run every dtype on the small shapes (n <= 33 and n (p + q) <= SMALL: one to
# three 16-row tiles, one feature chunk) and float32 on every shape up to their MAX_N.
EMULATORS = ("triton-interpreter", "cuda-emulated")
SMALL_N, SMALL = 33, 1000
# The bandwidth rules are computed before the kernels, by code all backends share, on a path
# that does not change with n below a torch block (RCKA_TORCH_BLOCK_ELEMS): the other rules
# are the same kernels with another gamma. Without the `slow` tests the emulators run the
# median rule only, the other CPU environments the other rules up to RULES_N rows.
RULES_N = 70
# Triton's interpreter computes bf16 tl.dot wrongly (triton 3.9): bf16 runs on GPUs only.
NO_DTYPE = {"triton-interpreter": {torch.bfloat16: "the interpreter's bf16 tl.dot is wrong (triton 3.9); bf16 runs on GPUs"}}


def runs(env: str, n: int = 0, dtype: Optional[torch.dtype] = None, kernel: str = "linear", sigma=None, width: int = 0) -> bool:
    """Whether environment ``env`` runs a case of ``n`` rows and n x ``width`` input elements
    in ``dtype``, with ``kernel`` and its bandwidth rule ``sigma``, at all and in reasonable
    time (MAX_N, NO_DTYPE, EMULATORS; the torch backend without its native op differs
    from the torch environment in the linear kernel only). The rule by which
    tests/conftest.py generates each environment's cases (``grid``)."""
    if n > MAX_N.get(env, n) or dtype in NO_DTYPE.get(env, {}):
        return False
    if env in EMULATORS and (n > SMALL_N or n * width > SMALL) and dtype not in (None, torch.float32):
        return False
    return env != "torch-python" or kernel == "linear"


def one_rule(env: str, n: int, kernel: str, sigma) -> bool:
    """Whether a case is its bandwidth rule's representative in environment ``env`` (RULES_N):
    the cases that are not run only with the `slow` tests."""
    return kernel == "linear" or sigma is None or not (env in EMULATORS or (env in MAX_N and n > RULES_N))


def cross(*axes) -> list:
    """The product of the axes with each case flattened:
    cross([(4, 1), (5, 2)], [f32]) == [(4, 1, f32), (5, 2, f32)]."""
    return [sum((v if isinstance(v, tuple) else (v,) for v in combo), ()) for combo in itertools.product(*axes)]


def grid(argnames: str, cases, admit: Optional[Callable[..., bool]] = None,
         fast: Optional[Callable[..., bool]] = None) -> pytest.MarkDecorator:
    """A test's cases in every environment of its ``env`` or ``kernel_env`` fixture:
    ``argnames`` and ``cases`` as for pytest.mark.parametrize. tests/conftest.py crosses
    them with the environments here and generates only the (environment, case) pairs for
    which ``admit(environment name, **case)`` holds (all when ``admit`` is None), marked
    `slow` where ``fast(environment name, **case)`` does not hold: the exhaustive rest of
    the cross, which `make test` and CI do not run (``pytest -m slow`` does)."""
    return pytest.mark.grid(argnames, [tuple(c) for c in cases], admit, fast)


def case_id(value) -> str:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else str(value)


# What an environment needs beyond torch, and the switch (=1) that turns its absence into a
# failure instead of a skip: CI sets the switch of each thing it installs (.ci/run).
REQUIRE = {
    "torch": "RCKA_REQUIRE_NATIVE",
    "triton-interpreter": "RCKA_REQUIRE_TRITON",
    "cuda-emulated": "RCKA_REQUIRE_CUDA_EMULATION",
    "triton-cuda": "RCKA_REQUIRE_TRITON",
    "cuda": "RCKA_REQUIRE_CUDA",
}


def required(switch: Optional[str]) -> bool:
    return bool(switch) and os.environ.get(switch) == "1"


def require(switch: Optional[str], reason: Optional[str], module: bool = False) -> None:
    """Nothing when ``reason`` is None; else a skip with the reason (of the whole test
    module with ``module``), or a failure when ``switch`` (an RCKA_REQUIRE_* variable) is 1."""
    if reason is None:
        return
    if required(switch):
        pytest.fail(f"{switch}=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def build_cache(name: str) -> Path:
    """Where the test builds keep what they compiled, keyed by everything that goes into it
    (sources, flags, compiler): $RCKA_TEST_CACHE/name, by default ~/.cache/rcka-kernels-tests/name
    (outside the clone, as torch's and Triton's own build caches are, so that a fresh clone
    on a machine that built the same sources before does not compile them again)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rcka-kernels-tests"
    return Path(os.environ.get("RCKA_TEST_CACHE") or default) / name


def cxx() -> Optional[str]:
    """The C++ compiler that builds the CUDA emulation: $CXX, else g++."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def lacks(env: str) -> Optional[str]:
    """What environment ``env`` lacks on this machine, or None. Asked at collection, so it
    builds nothing: the CUDA emulation needs pybind11 and a compiler, its fixture builds it."""
    from rcka_kernels import _dispatch
    from rcka_kernels.ops import triton_backend

    if env in GPU_ENVIRONMENTS and not torch.cuda.is_available():
        return "no CUDA device"
    if env == "torch":
        what, why = "the torch backend's native ops", _dispatch.native_status().reason
    elif env == "triton-interpreter":
        what, why = "Triton's interpreter", triton_backend.interpreter_reason()
    elif env == "cuda-emulated":
        what = "the CUDA emulation"
        why = ("pybind11 is not installed" if importlib.util.find_spec("pybind11") is None
               else "no C++ compiler (g++ or $CXX)" if cxx() is None else None)
    elif env in ("triton-cuda", "cuda"):
        backend = env.removesuffix("-cuda")
        what, why = f"the {backend} backend on the GPU", _dispatch.status(backend, torch.device("cuda")).reason
    else:
        return None
    return why and f"{what}: {why}"


def generated(param) -> bool:
    """Whether the tests of environment ``param`` (an ENVIRONMENTS entry) are generated on
    this machine: the CPU ones, and the GPU ones where a GPU is, when they have what they
    need (the torch environment runs without its native op: torch-python's path) or when
    their switch requires it (their tests then fail, saying what is missing).
    tests/test_smoke.py says what each environment lacks."""
    name = param.values[0][0]
    if name in GPU_ENVIRONMENTS and not torch.cuda.is_available():
        return False
    return name == "torch" or lacks(name) is None or required(REQUIRE.get(name))


def pair(n, p, q, dtype=torch.float64, batch=(), seed=0, offset=True, centred=False, device="cpu"):
    """The inputs of every numerical test: correlated x (..., n, p), y (..., n, q) (CKA far
    from 0), drawn in float64 from ``seed`` and then cast; x with an offset and a scale
    (the centring must be exact) unless ``offset`` is False; with ``centred`` both are
    column-centred instead (the backend contract takes centred inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, p, generator=g, dtype=torch.float64)
    y = 0.5 * torch.randn(*batch, n, q, generator=g, dtype=torch.float64)
    y[..., : min(p, q)] += x[..., : min(p, q)]
    if centred:
        x, y = x - x.mean(-2, keepdim=True), y - y.mean(-2, keepdim=True)
    elif offset:
        x = x * 2.0 + 0.7
    return x.to(device, dtype), y.to(device, dtype)


def weighted_grads(fn, x, y, need=(True, True), **kw):
    """(value, dx, dy) of fn(x, y, **kw) and the gradients of its sum weighted by a gradient that
    is not all ones, for fresh leaves of x and y; dx (dy) is None where need[0] (need[1]) is false."""
    x, y = x.detach().clone().requires_grad_(need[0]), y.detach().clone().requires_grad_(need[1])
    v = fn(x, y, **kw)
    (v * torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype).view(v.shape)).sum().backward()
    return v.detach(), x.grad, y.grad


def gamma(x):
    """An RBF gamma per group of x (G, n, p) for the backend contract, about 1 / (2 x the
    mean squared distance) so that kernel values spread over (0, 1), in the compute dtype."""
    from rcka_kernels.ops.torch_backend import compute_dtype

    return (1.0 / (2 * x.double().var(1).sum(-1).clamp_min(1e-6))).to(compute_dtype(x.dtype))


def cpu64(t: torch.Tensor) -> torch.Tensor:
    """t detached, in float64 on the CPU: what the reference is evaluated on."""
    return t.detach().to("cpu", torch.float64)


class Env:
    """One backend in one environment: ``backend`` to pass to the public functions,
    ``device`` for the inputs; ``kernels()`` is its backend-contract module."""

    def __init__(self, name: str, backend: str, device: str):
        self.name, self.backend, self.device = name, backend, device

    def __repr__(self):
        return f"Env({self.name})"

    def kernels(self):
        from rcka_kernels import _dispatch

        return _dispatch.kernels(self.backend)

    def pair(self, n, p, q, dtype=torch.float32, batch=(), seed=0, offset=True, centred=False):
        """``pair`` on this environment's device."""
        return pair(n, p, q, dtype, batch, seed, offset, centred, self.device)


def make_env(request, monkeypatch, param) -> Env:
    """Set up the environment ``param`` (an ENVIRONMENTS value) for one test; what it lacks
    skips the test, or fails it where the environment's switch requires it (REQUIRE)."""
    from rcka_kernels import _dispatch, _native

    name, backend, device = param
    env = Env(name, backend, device)
    if name == "torch-python":  # the torch backend without its native ops
        stack = contextlib.ExitStack()
        request.addfinalizer(stack.close)
        stack.enter_context(_native.python_path())
    elif name == "cuda-emulated":  # the CUDA C++ kernels on CPU tensors (tests/conftest.py: cuda_emulation)
        from rcka_kernels.ops import cuda_backend

        lib = request.getfixturevalue("cuda_emulation")
        stack = contextlib.ExitStack()
        request.addfinalizer(stack.close)
        stack.enter_context(_dispatch.use_kernels("cuda", cuda_backend.Kernels(lib, ("cpu",)), ("cpu",)))
        return env
    elif name == "triton-interpreter":
        # 16-row tiles: several (partial, upper-triangle) tiles and feature chunks at these n
        monkeypatch.setenv("RCKA_TRITON_MAX_BLOCK", "16")
        if os.environ.get("TRITON_INTERPRET") != "1":
            return env  # the body runs in the interpreter's child pytest (tests/conftest.py), which checks
    st = _dispatch.status(backend, torch.device(device))
    require(REQUIRE.get(name), None if st.available else f"{name}: {st.reason}")
    return env


# ----------------------------------------------------------------------------- acceptance


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((cpu64(a) - cpu64(b)).abs().max()) if b.numel() else 0.0


def accept(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, base: Optional[torch.Tensor] = None,
           what: str = "value") -> None:
    """The acceptance rule of every parity test.

    ``want`` is the float64 reference on the inputs ``got`` saw (quantised to ``dtype``);
    ``base`` the torch backend's result in the same dtype on the same inputs (None when
    ``got`` is the torch backend's). Passes when got has want's shape, is finite where
    want is, and max|got - want| <= max(2 max|base - want|, atol + rtol max|want|) with
    (atol, rtol) = TOL[dtype]: no backend need beat the torch backend by much on an
    ill-conditioned case, and none may be worse than twice it."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    g, w = cpu64(got), cpu64(want)
    assert torch.equal(torch.isfinite(g), torch.isfinite(w)), f"{what}: non-finite values where the reference has none"
    atol, rtol = TOL[dtype]
    scale = float(w.abs().max()) if w.numel() else 0.0
    bound = atol + rtol * scale
    err = _err(g, w)
    err_torch = _err(base, w) if base is not None else 0.0
    assert err <= max(2.0 * err_torch, bound), (
        f"{what}: max error {err:.3e} > max(2 x torch's {err_torch:.3e}, {atol:.0e} + {rtol:.0e} x {scale:.3e})")


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


def join_group(rank: int, port: int, world: int) -> None:
    """In a spawned rank: join the gloo group on localhost. Its timeout bounds every
    collective too, so a rank left waiting (another died or took another path) fails the
    test in two minutes instead of hanging the suite."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def spawn_ranks(worker, out_dir, world: int) -> list:
    """Run ``worker(rank, port, out_dir)`` in ``world`` gloo processes; each writes
    out_dir/rank{r}.pt, which comes back in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
