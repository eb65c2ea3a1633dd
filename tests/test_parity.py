"""Values and gradients of every backend in every environment against the float64
reference, judged by the one acceptance rule (tests/utils.py: ``accept``).

The ``kernel_env`` fixture yields the torch backend (with and without its native
linear op), Triton in its interpreter, the CUDA C++ kernels under the CPU emulation,
and on a GPU torch, Triton and CUDA C++ there. Two levels:
- the public functions (cka, hsic, mmd, centered_gram) over the shared shapes,
  dtypes, kernels and bandwidth rules, estimators and batched groups, values and
  gradients of a weighted sum (an upstream gradient that is not all ones);
- the backend contract (rcka_kernels/ops/_contract.py): each statistic and its raw
  backward of arbitrary cotangents against the torch backend's in float64 on the same
  inputs, over shapes that take every path of the kernels (small groups and tiles,
  ragged last tiles, sample- and feature-space linear, features wider than a chunk).
Plus ``gradcheck`` in float64 for every differentiable function, the reference
included. The bad-input catalogue is tests/test_catalogue.py, on the same environments.

Each test's cases (``grid``) are generated only in the environments that run them
(tests/utils.py: ``runs``); where a case repeats what another environment or case
already checks it is not generated, and where it is the exhaustive rest of the cross
it is marked `slow` (``pytest -m slow``; `make test` and CI leave those out).
"""

import torch
from torch.autograd import gradcheck

import rcka_kernels as rk
from rcka_kernels import reference
from rcka_kernels.ops import torch_backend as tb

from .utils import DTYPES, EMULATORS, KERNELS, SHAPES, accept, cpu64, cross, gamma, grid, one_rule, runs

f64 = torch.float64
BOOLS = [False, True]


def _value_and_grads(fn, inputs, w):
    """fn(*inputs), and the gradient of sum(fn * w) for each input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    v = fn(*leaves)
    grads = torch.autograd.grad((v * w.to(v.device, v.dtype)).sum(), leaves)
    return (v.detach(),) + grads


def _check(env, fn, ref, inputs, dtype, w):
    """fn(*inputs, backend) and its gradients held to ref on the float64 inputs, with the
    torch backend's own result in the same dtype as the rule's base."""
    got = _value_and_grads(lambda *a: fn(*a, env.backend), inputs, w)
    cd = tb.compute_dtype(inputs[0].dtype)
    assert got[0].dtype == cd, f"value dtype {got[0].dtype} for {inputs[0].dtype} inputs, want {cd}"
    want = _value_and_grads(ref, [cpu64(t) for t in inputs], w.cpu())
    base = _value_and_grads(lambda *a: fn(*a, "torch"), inputs, w) if env.backend != "torch" else [None] * len(got)
    for what, g, r, b, t in zip(["value"] + [f"d/d{i}" for i in range(len(inputs))], got, want, base, [None] + list(inputs)):
        assert t is None or g.dtype == t.dtype, f"{what}: gradient dtype {g.dtype}, input {t.dtype}"
        accept(g, r, dtype, b, what)


# ----------------------------------------------------------------------------- public functions


def _fast(env: str, n: int, dtype: torch.dtype, kernel: str, sigma, debiased: bool) -> bool:
    """The public functions' cases that run without the `slow` tests: each bandwidth rule's
    representative (``one_rule``), and in the emulators one case per shape and kernel, in
    float32 with the biased estimator. The other dtypes, estimators and rules take the same
    public code in the torch environment (the estimators and rules are the arithmetic before
    and after the kernels), and the emulators' kernels run in every dtype, with arbitrary
    cotangents, in the contract tests below (against the torch backend in float64)."""
    return one_rule(env, n, kernel, sigma) and (env not in EMULATORS or (dtype == torch.float32 and not debiased))


@grid("n,p,q,dtype,kernel,sigma,debiased", cross(SHAPES, DTYPES, KERNELS, BOOLS),
      lambda env, n, p, q, dtype, kernel, sigma, **_: runs(env, n, dtype, kernel, sigma, p + q),
      lambda env, n, dtype, kernel, sigma, debiased, **_: _fast(env, n, dtype, kernel, sigma, debiased))
def test_cka_hsic(kernel_env, n, p, q, dtype, kernel, sigma, debiased):
    if isinstance(sigma, float):  # a fixed bandwidth of the data's scale, not K = I
        sigma *= max(p, q) ** 0.5
    x, y = kernel_env.pair(n, p, q, dtype, batch=(2,))
    w = torch.randn(2, dtype=f64, device=kernel_env.device)
    kw = dict(kernel=kernel, sigma=sigma, debiased=debiased)
    _check(kernel_env, lambda a, b, be: rk.cka(a, b, backend=be, **kw), lambda a, b: reference.cka(a, b, kernel, sigma, debiased),
           (x, y), dtype, w)
    # HSIC from the same statistics (its gradients are the contract's arbitrary cotangents below)
    base = rk.hsic(x, y, backend="torch", **kw) if kernel_env.backend != "torch" else None
    accept(rk.hsic(x, y, backend=kernel_env.backend, **kw), reference.hsic(cpu64(x), cpu64(y), kernel, sigma, debiased),
           dtype, base, "hsic")


def _mmd_pair(g, n, m, d, dtype, device, seed):
    """x (g, n, d), z (g, m, d) from two distributions (z scaled and shifted)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g, n, d, generator=gen, dtype=f64)
    z = torch.randn(g, m, d, generator=gen, dtype=f64) * 1.3 + 0.4
    return x.to(device, dtype), z.to(device, dtype)


# (n, m, d): one sample each, small, Z = [X; Y] in one tile and over several
MMD_SHAPES = [(1, 1, 1), (5, 9, 3), (40, 23, 7), (100, 45, 20), (150, 90, 37)]


def _mmd(env: str, kernel: str) -> bool:
    """mmd's repetitions left out: the native op computes no MMD (torch-python is the torch
    environment here), and the linear MMD is the same float64 arithmetic on every backend,
    run by the torch environment (no kernel to emulate)."""
    return env != "torch-python" and not (env in EMULATORS and kernel == "linear")


@grid("n,m,d,dtype,kernel,sigma,unbiased",  # the unbiased estimator needs two samples on each side
      [c for c in cross(MMD_SHAPES, DTYPES, KERNELS, BOOLS) if not (c[-1] and min(c[0], c[1]) < 2)],
      lambda env, n, m, d, dtype, kernel, sigma, **_: _mmd(env, kernel) and runs(env, n + m, dtype, kernel, sigma, d),
      lambda env, n, m, dtype, kernel, sigma, unbiased, **_: _fast(env, n + m, dtype, kernel, sigma, unbiased))
def test_mmd(kernel_env, n, m, d, dtype, kernel, sigma, unbiased):
    x, z = _mmd_pair(2, n, m, d, dtype, kernel_env.device, seed=1)
    w = torch.randn(2, dtype=f64, device=kernel_env.device)
    _check(kernel_env, lambda a, b, be: rk.mmd(a, b, kernel=kernel, sigma=sigma, unbiased=unbiased, backend=be),
           lambda a, b: reference.mmd(a, b, kernel, sigma, unbiased), (x, z), dtype, w)


# (g, n, p): n below, at and across tiles, p = 1, one and three groups
GRAM_SHAPES = [(1, 4, 1), (3, 5, 7), (3, 33, 7), (1, 33, 1), (3, 70, 1), (2, 150, 5)]


def _gram(env: str, shape: tuple) -> bool:
    """centered_gram's repetitions left out: the cuda backend has none (the torch backend's
    runs for it: one representative shape), nor has the native op (not torch-python)."""
    return env != "torch-python" and (env != "cuda-emulated" or shape == GRAM_SHAPES[2])


# Triton's fused centered_gram has no contract test: the interpreter runs it in every dtype
@grid("g,n,p,dtype,kernel,sigma,debiased", cross(GRAM_SHAPES, DTYPES, KERNELS, BOOLS),
      lambda env, g, n, p, dtype, kernel, sigma, **_: _gram(env, (g, n, p)) and runs(env, n, dtype, kernel, sigma, g * p),
      lambda env, n, dtype, kernel, sigma, **_: one_rule(env, n, kernel, sigma) and (env != "cuda-emulated" or dtype == torch.float32))
def test_centered_gram(kernel_env, g, n, p, dtype, kernel, sigma, debiased):
    x, _ = kernel_env.pair(n, p, 1, dtype, batch=(g,))
    w = torch.randn(g, n, n, dtype=f64, device=kernel_env.device)
    _check(kernel_env, lambda a, be: rk.centered_gram(a, kernel=kernel, sigma=sigma, debiased=debiased, backend=be),
           lambda a: reference.centered_gram(a, kernel, sigma, debiased), (x,), dtype, w)
    if debiased:
        k = rk.centered_gram(x, kernel=kernel, sigma=sigma, debiased=True, backend=kernel_env.backend)
        assert torch.all(torch.diagonal(k, dim1=-2, dim2=-1) == 0)


@grid("kernel,sigma,debiased", cross(KERNELS, BOOLS), lambda env, kernel, sigma, **_: runs(env, 19, f64, kernel, sigma, 6 * 10))
def test_batched_groups_equal_each_group_alone(kernel_env, kernel, sigma, debiased):
    """A (2, 3) leading batch is six independent groups: each as the reference of that
    group alone (a bandwidth rule is applied per group)."""
    x, y = kernel_env.pair(19, 4, 6, f64, batch=(2, 3))
    got = rk.cka(x, y, kernel=kernel, sigma=sigma, debiased=debiased, backend=kernel_env.backend)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            accept(got[i, j], reference.cka(cpu64(x[i, j]), cpu64(y[i, j]), kernel, sigma, debiased), f64, what=f"group {i, j}")


# ----------------------------------------------------------------------------- gradcheck


def _gradcheck(env, fn, inputs):
    """gradcheck in float64; the emulators check a random projection of the Jacobian
    (fast_mode: two evaluations per input instead of two per input element), with the
    biased estimator for cka, hsic and mmd unless the `slow` tests run (the estimator is
    the same kernels' statistics combined in Python: the other environments check it)."""
    return gradcheck(fn, tuple(t.detach().requires_grad_() for t in inputs), fast_mode=env.name in EMULATORS)


# n,p,q: sample- and feature-space linear paths
@grid("n,p,q,kernel,sigma,debiased", cross([(5, 2, 3), (6, 4, 3)], [("linear", None), ("rbf", 1.1)], BOOLS),
      lambda env, n, kernel, **_: runs(env, n, f64, kernel),
      lambda env, debiased, **_: env not in EMULATORS or not debiased)
def test_gradcheck_cka_hsic(env, n, p, q, kernel, sigma, debiased):
    x, y = env.pair(n, p, q, f64, batch=(2,))
    for fn in (rk.cka, rk.hsic):
        assert _gradcheck(env, lambda a, b: fn(a, b, kernel=kernel, sigma=sigma, debiased=debiased, backend=env.backend), (x, y))


@grid("kernel,sigma,unbiased", cross([("linear", None), ("rbf", 0.9)], BOOLS),
      lambda env, kernel, **_: _mmd(env, kernel) and runs(env, 9, f64, kernel),
      lambda env, unbiased, **_: env not in EMULATORS or not unbiased)
def test_gradcheck_mmd(env, kernel, sigma, unbiased):
    x, z = env.pair(5, 2, 2, f64, batch=(2,))
    z = z[:, :4] + 0.3
    assert _gradcheck(env, lambda a, b: rk.mmd(a, b, kernel=kernel, sigma=sigma, unbiased=unbiased, backend=env.backend), (x, z))


@grid("kernel,sigma,debiased", cross([("linear", None), ("rbf", 1.7)], BOOLS),
      lambda env, kernel, **_: _gram(env, ()) and runs(env, 7, f64, kernel))
def test_gradcheck_centered_gram(env, kernel, sigma, debiased):
    x, _ = env.pair(7, 2, 1, f64, batch=(2,))
    assert _gradcheck(env, lambda a: rk.centered_gram(a, kernel=kernel, sigma=sigma, debiased=debiased, backend=env.backend), (x,))


# ----------------------------------------------------------------------------- backend contract

# (G, n, p, q): the CUDA kernels' small-group path (n <= 128: 1, 2 or 4 tiles) and tiled
# path (n > 128, ragged last tile), p and q below and above a staging chunk, both linear
# paths (sample space p + q > n, feature space), many 16-row Triton tiles
CONTRACT_SHAPES = [(1, 5, 3, 2), (3, 33, 17, 5), (2, 64, 40, 8), (2, 128, 7, 70), (1, 129, 12, 7),
                   (2, 150, 5, 18), (2, 200, 45, 33), (1, 300, 3, 1), (2, 500, 20, 30)]
# (G, n, m, p): MMD over Z = [X; Y] in one tile and over several, the X/Y boundary inside a tile
CONTRACT_MMD_SHAPES = [(1, 4, 3, 2), (2, 40, 70, 9), (1, 100, 29, 5), (2, 150, 90, 37), (1, 7, 200, 3)]


def _contract(env: str, n: int, dtype: torch.dtype) -> bool:
    """Whether ``env`` runs the contract on n rows in ``dtype``: every dtype up to MAX_N (no
    reference to evaluate); not the torch backend in float64 (the contract's yardstick),
    nor torch-python (the torch backend's contract is the torch environment's: the native
    op is above it)."""
    return not (env == "torch" and dtype == f64) and env != "torch-python" and runs(env, n, dtype)


def _contract_check(env, dtype, name, args):
    """Contract function ``name`` of env's backend on args, held to the torch backend's on
    the same arguments in float64 (the inputs and gammas, in ``dtype`` or its compute
    dtype; the float64 cotangents gS as they are)."""
    def call(mod, a):
        out = getattr(mod, name)(*a)
        if name == "linear_stats" and isinstance(out, tuple):
            out = out[0]  # the torch backend may add what its backward reuses
        return out if isinstance(out, tuple) else (out,)

    got = call(env.kernels(), args)
    want = call(tb, [a.to(f64) if a.dtype in (dtype, tb.compute_dtype(dtype)) else a for a in args])
    base = call(tb, args) if env.backend != "torch" else [None] * len(got)
    for i, (g, r, b) in enumerate(zip(got, want, base)):
        accept(g, r, dtype, b, f"{name} output {i}")
    return got


def _cotangents(g, n, dtype, device, seed=3):
    gen = torch.Generator().manual_seed(seed)
    gs = torch.randn(g, 3, generator=gen, dtype=f64).to(device)
    grx, gry = (torch.randn(g, n, generator=gen, dtype=f64).to(device, tb.compute_dtype(dtype)) for _ in range(2))
    return gs, grx, gry


@grid("g,n,p,q,dtype", cross(CONTRACT_SHAPES, DTYPES), lambda env, n, dtype, **_: _contract(env, n, dtype))
def test_contract_linear(kernel_env, g, n, p, q, dtype):
    x, y = kernel_env.pair(n, p, q, dtype, batch=(g,), centred=True)
    gs, _, _ = _cotangents(g, n, dtype, kernel_env.device)
    _contract_check(kernel_env, dtype, "linear_stats", [x, y])
    _contract_check(kernel_env, dtype, "linear_stats_backward", [x, y, gs])


@grid("g,n,p,q,dtype", cross(CONTRACT_SHAPES, DTYPES), lambda env, n, dtype, **_: _contract(env, n, dtype))
def test_contract_rbf(kernel_env, g, n, p, q, dtype):
    x, y = kernel_env.pair(n, p, q, dtype, batch=(g,), seed=1, centred=True)
    gx, gy = gamma(x), gamma(y)
    gs, grx, gry = _cotangents(g, n, dtype, kernel_env.device)
    s, rx, ry = _contract_check(kernel_env, dtype, "rbf_stats", [x, y, gx, gy])
    cd = tb.compute_dtype(dtype)
    assert s.dtype == f64 and rx.dtype == cd and ry.dtype == cd and rx.shape == (g, n)
    dx, dy = _contract_check(kernel_env, dtype, "rbf_stats_backward", [x, y, gx, gy, gs, grx, gry])
    assert dx.dtype == dtype and dy.dtype == dtype


@grid("g,n,m,p,dtype", cross(CONTRACT_MMD_SHAPES, DTYPES), lambda env, n, m, dtype, **_: _contract(env, n + m, dtype))
def test_contract_mmd(kernel_env, g, n, m, p, dtype):
    x, y = _mmd_pair(g, n, m, p, dtype, kernel_env.device, seed=2)
    gz = gamma(torch.cat([x, y], 1))
    gs, _, _ = _cotangents(g, n, dtype, kernel_env.device)
    _contract_check(kernel_env, dtype, "rbf_mmd_sums", [x, y, gz])
    dx, dy = _contract_check(kernel_env, dtype, "rbf_mmd_sums_backward", [x, y, gz, gs])
    assert dx.dtype == dtype and dy.shape == y.shape
