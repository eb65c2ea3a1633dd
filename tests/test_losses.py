"""RCKALoss / PCKALoss: both modes against the float64 reference, a Python-loop
PCKA, gradcheck, and the errors users see."""

import pytest
import torch
import torch.nn.functional as TF

from rcka_kernels import reference
from rcka_kernels.losses import CKALoss, PCKALoss, RCKALoss, official_alignment, patchify

from .utils import SHAPES, accept

D = torch.float64


def _logits(n=12, p=7, dtype=D):
    t = torch.randn(n, p, dtype=dtype)
    s = 0.6 * t + torch.randn(n, p, dtype=dtype)
    return s, t


# ----------------------------------------------------------------------------- official alignment


@pytest.mark.parametrize("n,p,q", SHAPES + [(6, 200, 150)])
@pytest.mark.parametrize("l2_norm", [False, True])
def test_official_alignment_matches_reference(n, p, q, l2_norm):
    x, y = torch.randn(n, p, dtype=D), torch.randn(n, q, dtype=D)
    accept(official_alignment(x, y, l2_norm), reference.official_alignment(x, y, l2_norm), torch.float64)


def test_official_alignment_l2_is_row_scaling_not_symmetric():
    # the transcription: Grams scaled by rows only, traces of K L^T
    x, y = torch.randn(9, 4, dtype=D), torch.randn(9, 3, dtype=D)
    k, l = x @ x.T, y @ y.T
    k2 = k / torch.sqrt(torch.diag(k))[:, None]
    l2 = l / torch.sqrt(torch.diag(l))[:, None]
    want = torch.trace(k2 @ l2.T) / torch.sqrt(torch.trace(k2 @ k2.T) * torch.trace(l2 @ l2.T))
    accept(official_alignment(x, y, True), want, torch.float64)
    sym = (k / torch.sqrt(torch.outer(torch.diag(k), torch.diag(k))))
    assert not torch.allclose(k2, k2.T) and torch.allclose(sym, sym.T)


def test_official_alignment_batched_groups():
    x, y = torch.randn(3, 10, 5, dtype=D), torch.randn(3, 10, 4, dtype=D)
    for l2 in (False, True):
        got = official_alignment(x, y, l2)
        assert got.shape == (3,)
        torch.testing.assert_close(got, torch.stack([reference.official_alignment(x[i], y[i], l2) for i in range(3)]))


# ----------------------------------------------------------------------------- RCKA


@pytest.mark.parametrize("debiased", [False, True])
def test_rcka_true_cka_terms(debiased):
    s, t = _logits()
    fs, ft = torch.randn(12, 3, 4, 4, dtype=D), torch.randn(12, 5, 2, 2, dtype=D)
    loss = RCKALoss(intra_weight=2.0, inter_weight=0.5, temperature=3.0, feature_weight=0.25, debiased=debiased)(s, t, fs, ft)
    ss, ts = (s / 3).softmax(-1), (t / 3).softmax(-1)
    want = (2.0 * (1 - reference.cka(ss, ts, debiased=debiased))
            + 0.5 * (1 - reference.cka(s.T, t.T, debiased=debiased))
            + 0.25 * (1 - reference.cka(fs.flatten(1), ft.flatten(1), debiased=debiased)))
    accept(loss, want, torch.float64)


def test_rcka_inter_weight_none_switches_class_axis_off():
    s, t = _logits()
    torch.testing.assert_close(RCKALoss(intra_weight=1.0)(s, t), 1 - reference.cka(s, t))


@pytest.mark.parametrize("l2_norm", [False, True])
def test_rcka_official_mode(l2_norm):
    s, t = _logits()
    got = RCKALoss(intra_weight=15, inter_weight=3, temperature=4.0, official=True, l2_norm=l2_norm)(s, t)
    ss, ts = (s / 4).softmax(-1), (t / 4).softmax(-1)
    # the published code weights the class-axis term with intra_weight and feeds it raw logits
    want = -15 * reference.official_alignment(ts, ss, l2_norm) - 15 * reference.official_alignment(t.T, s.T, l2_norm)
    accept(got, want, torch.float64)
    off = RCKALoss(intra_weight=15, inter_weight=0, official=True, l2_norm=l2_norm)(s, t)
    torch.testing.assert_close(off, -15 * reference.official_alignment(t, s, l2_norm))


def test_rcka_identical_logits():
    s, _ = _logits()
    torch.testing.assert_close(RCKALoss(inter_weight=1.0)(s, s.clone()), torch.zeros((), dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(RCKALoss(intra_weight=2, inter_weight=1.0, official=True)(s, s.clone()), torch.tensor(-4.0, dtype=D))


def test_rcka_backends_agree_float32():
    s, t = _logits(64, 100, torch.float32)
    a = RCKALoss(inter_weight=1.0, backend="torch")(s, t)
    b = RCKALoss(inter_weight=1.0, backend="reference")(s, t)
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
    "kw",
    [dict(inter_weight=1.0, temperature=2.0, feature_weight=0.5), dict(inter_weight=1.0, debiased=True),
     dict(official=True, inter_weight=1.0, l2_norm=True), dict(official=True, inter_weight=1.0, temperature=2.0),
     dict(kernel="rbf", sigma=2.0)],
)
def test_rcka_gradcheck(kw):
    s, t = _logits(8, 5)
    s.requires_grad_(True)
    fs, ft = torch.randn(8, 6, dtype=D, requires_grad=True), torch.randn(8, 3, dtype=D)
    loss = RCKALoss(**kw)
    fn = (lambda a, b: loss(a, t, b, ft)) if "feature_weight" in kw else (lambda a, b: loss(a, t) + 0 * b.sum())
    assert torch.autograd.gradcheck(fn, (s, fs))


def test_rcka_errors():
    s, t = _logits()
    with pytest.raises(ValueError, match="same shape"):
        RCKALoss()(s, t[:, :5])
    with pytest.raises(ValueError, match="same shape"):
        RCKALoss()(s[:10], t)
    with pytest.raises(ValueError, match="official=True"):
        RCKALoss(l2_norm=True)
    with pytest.raises(ValueError, match="linear kernel"):
        RCKALoss(official=True, kernel="rbf")
    with pytest.raises(ValueError, match="batch size"):
        RCKALoss(feature_weight=1.0)(s, t, torch.randn(5, 3, dtype=D), torch.randn(12, 3, dtype=D))
    with pytest.raises(ValueError, match="neither"):
        RCKALoss(feature_weight=1.0)(s, t, torch.randn(12, 3, dtype=D), None)
    # a non-float teacher is refused, as CKALoss refuses it (not cast to the student's dtype)
    with pytest.raises(TypeError, match="RCKALoss: teacher_logits must be float16, bfloat16, float32 or float64, got torch.int64"):
        RCKALoss()(s, t.long())
    with pytest.raises(TypeError, match="cka: y must be float16, bfloat16, float32 or float64, got torch.int64"):
        CKALoss()(s, t.long())
    with pytest.raises(TypeError, match="RCKALoss: teacher_features must be float"):
        RCKALoss(feature_weight=1.0)(s, t, torch.randn(12, 3, dtype=D), torch.ones(12, 3, dtype=torch.int64))


BAD_OPTIONS = [
    (dict(kernel="rbff"), ValueError, "kernel must be one of"),
    (dict(kernel="rbf", sigma=-1.0), ValueError, "sigma must be a positive"),
    (dict(kernel="rbf", sigma=0.0), ValueError, "sigma must be a positive"),
    (dict(kernel="rbf", sigma="medain"), ValueError, "sigma must be a positive float, a tensor, or one of"),
    (dict(kernel="rbf", sigma=torch.tensor([1.0, -2.0])), ValueError, "sigma must be positive and finite"),
    (dict(sigma=1.0), ValueError, "sigma is a bandwidth of the 'rbf' kernel; the linear kernel takes none"),
    (dict(debiased="yes"), TypeError, "debiased must be True or False, got 'yes'"),
    (dict(backend="numpy"), ValueError, "unknown backend 'numpy'"),
]


@pytest.mark.parametrize("cls", [CKALoss, RCKALoss, PCKALoss], ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs,error,match", BAD_OPTIONS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_constructors_check_their_options(cls, kwargs, error, match):
    """A mistake in a loss's options fails when the loss is built, in its name, before any
    forward pass (issue 20); the same options are accepted by the functions' checks."""
    with pytest.raises(error, match=f"^{cls.__name__}: {match}"):
        cls(**kwargs)


@pytest.mark.parametrize("cls,flag", [(CKALoss, "flatten"), (RCKALoss, "official"), (RCKALoss, "l2_norm"), (PCKALoss, "official")])
def test_constructors_check_their_flags(cls, flag):
    with pytest.raises(TypeError, match=f"^{cls.__name__}: {flag} must be True or False, got 'no'"):
        cls(**{flag: "no"})


# ----------------------------------------------------------------------------- PCKA


def _pcka_loop(s, t, ps, intra, inter, official, l2_norm):
    """The same loss with a Python loop over channels (the published code's shape)."""
    hp, wp = -(-s.shape[2] // ps) * ps, -(-s.shape[3] // ps) * ps
    s = TF.interpolate(s, size=(hp, wp), mode="bilinear", align_corners=False)
    t = TF.interpolate(t, size=(hp, wp), mode="bilinear", align_corners=False)
    b, c = s.shape[:2]
    total = 0.0
    for ch in range(c):
        # rows: patches in (u, v) order; columns: (b, h, w) inside a patch
        sc = s[:, ch].reshape(b, hp // ps, ps, wp // ps, ps).permute(1, 3, 0, 2, 4).reshape(-1, b * ps * ps)
        tc = t[:, ch].reshape(b, hp // ps, ps, wp // ps, ps).permute(1, 3, 0, 2, 4).reshape(-1, b * ps * ps)
        if official:
            total = total - intra * reference.official_alignment(tc, sc, l2_norm)
            if inter:
                total = total - intra * reference.official_alignment(tc.T, sc.T, l2_norm)
        else:
            total = total + intra * (1 - reference.cka(sc, tc))
            if inter is not None:
                total = total + inter * (1 - reference.cka(sc.T, tc.T))
    return total / c


@pytest.mark.parametrize("official,l2_norm", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("hw", [(32, 48), (20, 37)])
def test_pcka_matches_python_loop(official, l2_norm, hw):
    t = torch.randn(2, 5, *hw, dtype=D)
    s = 0.5 * t + torch.randn(2, 5, *hw, dtype=D)
    got = PCKALoss(patch_size=16, intra_weight=3.0, inter_weight=2.0, official=official, l2_norm=l2_norm)(s, t)
    want = _pcka_loop(s, t, 16, 3.0, 2.0, official, l2_norm)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_patchify_layout():
    f = torch.arange(2 * 1 * 4 * 4, dtype=D).reshape(2, 1, 4, 4)
    p = patchify(f, 2)
    assert p.shape == (1, 4, 8)
    # patch (u=0, v=1) of channel 0: image 0 rows 0-1, cols 2-3, then image 1
    torch.testing.assert_close(p[0, 1], torch.cat([f[0, 0, :2, 2:].flatten(), f[1, 0, :2, 2:].flatten()]))


def test_pcka_single_patch_is_constant():
    s = torch.randn(2, 3, 7, 9, dtype=D, requires_grad=True)
    t = torch.randn(2, 3, 7, 9, dtype=D)
    loss = PCKALoss(patch_size=16)(s, t)
    loss.backward()
    assert loss.item() == 0.0 and s.grad.abs().max().item() == 0.0
    torch.testing.assert_close(PCKALoss(patch_size=16, intra_weight=4.0, official=True)(s, t), torch.tensor(-4.0, dtype=D))


@pytest.mark.parametrize("kw", [dict(inter_weight=1.0), dict(official=True, inter_weight=1.0, l2_norm=True)])
def test_pcka_gradcheck(kw):
    s = torch.randn(1, 2, 8, 8, dtype=D, requires_grad=True)
    t = torch.randn(1, 2, 8, 8, dtype=D)
    loss = PCKALoss(patch_size=4, **kw)
    assert torch.autograd.gradcheck(lambda a: loss(a, t), (s,))


def test_pcka_errors():
    with pytest.raises(ValueError, match="same B and C"):
        PCKALoss()(torch.randn(2, 3, 16, 16), torch.randn(2, 4, 16, 16))
    with pytest.raises(ValueError, match="round up"):
        PCKALoss()(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 17, 16))
    with pytest.raises(ValueError, match="same B and C"):
        PCKALoss()(torch.randn(3, 16, 16), torch.randn(3, 16, 16))
    # sizes that round up to the same multiple are accepted (both are resized)
    assert torch.isfinite(PCKALoss()(torch.randn(2, 3, 30, 20), torch.randn(2, 3, 32, 18)))
