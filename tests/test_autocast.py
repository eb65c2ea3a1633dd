"""Mixed precision (issue 19): every public function and loss inside ``torch.autocast``
and with a half-precision input beside a float32 one, in every environment of the
parity suite (the ``env`` fixture), plus a short compiled training run under autocast.

The library's precision rule: inputs are used in the dtype they come in (half inputs,
float32 accumulation) and two floating dtypes compute as if both were the wider one.
So inside an autocast region a call gives the value and gradients of the same call
outside it on the same inputs (autocast must not lower the products inside), and a
half input with a float32 one gives the value of the float32 call on the half input
cast up, its gradient coming back in the half dtype. Both are held to the float32 rule
of tests/utils.accept (a lowered product would miss it by orders of magnitude), the
half gradient to its own dtype's rule (it is the float32 gradient rounded).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as TF

import rcka_kernels as rk

from .utils import EMULATORS, accept, cross, grid, pair, runs

HALF = [torch.bfloat16, torch.float16]
f32 = torch.float32
N = 12  # rows: the emulators' small shapes (one or two 16-row tiles)


def _maps(device):
    """Correlated (B, C, H, W) student and teacher maps (PCKALoss)."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 3, 6, 6, generator=g)
    return (0.6 * t + torch.randn(2, 3, 6, 6, generator=g)).to(device), t.to(device)


def _inputs(kind, device):
    """float32 inputs of each kind of call: a (student, teacher) pair or one input."""
    if kind == "pair":
        return pair(N, 5, 4, f32, device=device)
    if kind == "mmd":
        x, y = pair(N, 5, 5, f32, device=device, seed=1)
        return x, 1.3 * y[:9] + 0.4
    if kind == "single":
        return pair(N, 5, 1, f32, device=device)[:1]
    if kind == "logits":
        return pair(N, 7, 7, f32, device=device, seed=3)
    return _maps(device)


# name -> (kind of inputs, kernel, sigma, the call given a backend)
CASES = {
    "cka-linear": ("pair", "linear", None, lambda be: lambda x, y: rk.cka(x, y, backend=be)),
    "cka-rbf": ("pair", "rbf", None, lambda be: lambda x, y: rk.cka(x, y, kernel="rbf", backend=be)),
    "hsic-linear-debiased": ("pair", "linear", None, lambda be: lambda x, y: rk.hsic(x, y, debiased=True, backend=be)),
    "hsic-rbf": ("pair", "rbf", None, lambda be: lambda x, y: rk.hsic(x, y, kernel="rbf", backend=be)),
    "cka_loss-linear": ("pair", "linear", None, lambda be: lambda x, y: rk.cka_loss(x, y, backend=be)),
    "cka_loss-rbf-debiased": ("pair", "rbf", None, lambda be: lambda x, y: rk.cka_loss(x, y, kernel="rbf", debiased=True, backend=be)),
    "mmd-linear": ("mmd", "linear", None, lambda be: lambda x, y: rk.mmd(x, y, kernel="linear", backend=be)),
    "mmd-rbf-unbiased": ("mmd", "rbf", None, lambda be: lambda x, y: rk.mmd(x, y, unbiased=True, backend=be)),
    "gram-linear": ("single", "linear", None, lambda be: lambda x: rk.gram(x, backend=be)),
    "gram-rbf": ("single", "rbf", None, lambda be: lambda x: rk.gram(x, kernel="rbf", backend=be)),
    "centered_gram-linear": ("single", "linear", None, lambda be: lambda x: rk.centered_gram(x, backend=be)),
    "centered_gram-rbf-debiased": ("single", "rbf", None,
                                   lambda be: lambda x: rk.centered_gram(x, kernel="rbf", debiased=True, backend=be)),
    "gram_discrepancy-linear": ("pair", "linear", None, lambda be: lambda x, y: rk.gram_discrepancy(x, y, backend=be)),
    "gram_discrepancy-rbf-uncentred": ("pair", "rbf", None,
                                       lambda be: lambda x, y: rk.gram_discrepancy(x, y, kernel="rbf", centered=False, backend=be)),
    "mmd_upper_bound-linear-uncentred": ("pair", "linear", None,
                                         lambda be: lambda x, y: rk.mmd_upper_bound(x, y, centered=False, backend=be)),
    "mmd_upper_bound-rbf-uncentred": ("pair", "rbf", None,
                                      lambda be: lambda x, y: rk.mmd_upper_bound(x, y, kernel="rbf", centered=False, backend=be)),
    "CKALoss-linear": ("pair", "linear", None, lambda be: rk.CKALoss(backend=be)),
    "CKALoss-rbf": ("pair", "rbf", None, lambda be: rk.CKALoss(kernel="rbf", backend=be)),
    "RCKALoss-linear": ("logits", "linear", None, lambda be: rk.RCKALoss(inter_weight=1.0, temperature=2.0, backend=be)),
    "RCKALoss-rbf": ("logits", "rbf", None, lambda be: rk.RCKALoss(inter_weight=1.0, kernel="rbf", backend=be)),
    "RCKALoss-official": ("logits", "linear", None, lambda be: rk.RCKALoss(inter_weight=1.0, official=True, backend=be)),
    "RCKALoss-official-l2": ("logits", "linear", None,
                             lambda be: rk.RCKALoss(inter_weight=1.0, official=True, l2_norm=True, backend=be)),
    "PCKALoss-linear": ("maps", "linear", None, lambda be: rk.PCKALoss(patch_size=4, inter_weight=0.5, backend=be)),
    "PCKALoss-rbf": ("maps", "rbf", None, lambda be: rk.PCKALoss(patch_size=4, kernel="rbf", backend=be)),
    "PCKALoss-official": ("maps", "linear", None, lambda be: rk.PCKALoss(patch_size=4, inter_weight=1.0, official=True, backend=be)),
}


def _admit(env: str, case: str, half: torch.dtype) -> bool:
    """The (environment, case) pairs generated: what the environment runs (tests/utils.runs);
    the emulators, slow, run one half dtype (their kernels' half inputs are the parity
    suite's; the policy under test is the public layer's)."""
    kernel = CASES[case][1]
    return runs(env, N, half, kernel, CASES[case][2], 12) and (env not in EMULATORS or half == torch.float16)


def _value_and_grads(f, inputs, autocast=None):
    """f(*inputs) (inside ``torch.autocast(device, dtype=autocast)`` if given) and the
    gradient of sum(f * w) for each input, taken outside the region as training loops do."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if autocast is None:
        v = f(*leaves)
    else:
        with torch.autocast(leaves[0].device.type, dtype=autocast):
            v = f(*leaves)
    w = torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype, device=v.device).reshape(v.shape)
    grads = torch.autograd.grad((v * w).sum(), leaves)
    return [v.detach()] + list(grads)


def _same(got, want, dtypes, what):
    for i, (g, w) in enumerate(zip(got, want)):
        name = "value" if i == 0 else f"d/d input {i - 1}"
        assert g.dtype == w.dtype, f"{what} {name}: dtype {g.dtype}, want {w.dtype}"
        accept(g, w, dtypes[i], what=f"{what} {name}")


@grid("case,half", cross(list(CASES), HALF), _admit)
def test_autocast_and_mixed_dtypes(env, case, half):
    kind, _, _, build = CASES[case]
    f = build(env.backend)
    wide = _inputs(kind, env.device)
    low = [wide[0].to(half)] + list(wide[1:])  # a student's output under autocast, a float32 teacher
    variants = {"half student": low}
    if env.name not in EMULATORS:
        variants.update({"float32": wide, "half": [t.to(half) for t in wide]})
    # inside autocast: the value and gradients of the same call outside it, on the same inputs
    outside = {}
    for what, inputs in variants.items():
        outside[what] = _value_and_grads(f, inputs)
        got = _value_and_grads(f, inputs, autocast=half)
        _same(got, outside[what], [f32] * len(got), f"autocast {what}:")
        assert got[0].dtype == f32
    if kind == "single":
        return
    # a half student with a float32 teacher, outside autocast: the float32 call on the student cast up
    mixed = outside["half student"]
    want = _value_and_grads(f, [low[0].float(), low[1]])
    assert mixed[1].dtype == half and mixed[2].dtype == f32, "each gradient in its input's dtype"
    _same(mixed, [want[0], want[1].to(half), want[2]], [f32, half, f32], "mixed dtypes:")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] != "single"])
def test_half_with_float64_computes_in_float64(case):
    kind, _, _, build = CASES[case]
    f = build("auto")
    x, y = (t.double() for t in _inputs(kind, "cpu"))
    got = _value_and_grads(f, [x.to(torch.float16), y])
    want = _value_and_grads(f, [x.to(torch.float16).double(), y])
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float16 and got[2].dtype == torch.float64
    _same(got, [want[0], want[1].half(), want[2]], [torch.float64, torch.float16, torch.float64], "float16 with float64:")


@pytest.mark.parametrize("other", [torch.int64, torch.complex64])
def test_integer_and_complex_inputs_stay_errors(other):
    x, y = pair(N, 5, 4, f32)
    bad = torch.ones(N, 4, dtype=other)
    for call in (lambda: rk.cka(x.half(), bad), lambda: rk.CKALoss()(x, bad), lambda: rk.hsic(bad, y, kernel="rbf")):
        with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64"):
            call()
    s, _ = pair(N, 7, 7, f32)
    with pytest.raises(TypeError, match="RCKALoss: teacher_logits must be float16, bfloat16, float32 or float64"):
        rk.RCKALoss()(s, torch.ones(N, 7, dtype=other))
    maps = _maps("cpu")[0]
    with pytest.raises(TypeError, match="PCKALoss: teacher_feat must be"):
        rk.PCKALoss(patch_size=4)(maps, torch.ones(maps.shape, dtype=other))


# ----------------------------------------------------------------------------- training under autocast


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("half", HALF, ids=lambda d: str(d).removeprefix("torch."))
def test_compiled_training_step_under_autocast(device, half):
    """A student (CE + RCKA to a float32 teacher's logits) trained in autocast with
    torch.compile: the loss falls over a few steps (float16 on a GPU with GradScaler)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g).to(device)
    teacher = _Net().to(device)
    with torch.no_grad():
        t_logits = teacher(x)  # float32, outside autocast
    labels = t_logits.argmax(-1)
    student = _Net().to(device)
    rcka = rk.RCKALoss(intra_weight=1.0, inter_weight=1.0)

    def loss_fn(xb):
        with torch.autocast(device, dtype=half):
            s_logits = student(xb)
            assert s_logits.dtype == half  # autocast lowered the student, as in real training
            return TF.cross_entropy(s_logits, labels) + rcka(s_logits, t_logits)

    compiled = torch.compile(loss_fn, backend="aot_eager")
    opt = torch.optim.SGD(student.parameters(), lr=0.2)
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda" and half == torch.float16)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = compiled(x)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("case", ["cka-linear-debiased", "rcka", "cka-rbf-streamed", "mmd-rbf"])
def test_backward_inside_autocast(case, native, monkeypatch, request):
    """A backward run inside the autocast region (PyTorch advises against it, users do it): the
    ops' own backwards keep their products in the compute dtype, so the gradient is the one of
    the same call outside autocast (before: a dtype error, or a streamed RBF gradient off by
    more than half)."""
    from rcka_kernels import _native

    if not native:
        stack = contextlib.ExitStack()
        request.addfinalizer(stack.close)
        stack.enter_context(_native.python_path())
    if case == "cka-rbf-streamed":
        monkeypatch.setenv("RCKA_TORCH_BLOCK_ELEMS", "64")  # tiles of 8 x 8: the streamed custom op, not the dense Grams
    x, y = pair(N, 5, 4, f32)
    calls = {
        "cka-linear-debiased": lambda a: rk.cka(a, y, debiased=True),
        "rcka": lambda a: rk.RCKALoss(inter_weight=1.0)(a, y[:, :1].repeat(1, 5) + x),
        "cka-rbf-streamed": lambda a: rk.cka(a, y, kernel="rbf", sigma=2.0),
        "mmd-rbf": lambda a: rk.mmd(a, y[:, :4].repeat(1, 2)[:, :5], sigma=2.0),
    }
    xs = x.clone().requires_grad_()
    want, = torch.autograd.grad(calls[case](xs), xs)
    for half in HALF:
        with torch.autocast("cpu", dtype=half):
            got, = torch.autograd.grad(calls[case](xs), xs)
        assert got.dtype == f32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
