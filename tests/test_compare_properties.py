"""rk.compare on the shapes users have: property tests over widths 1..8192, batch sizes with a
partial last batch, one to several layers per side, shared and separate models, float32 and
bfloat16 features, biased and debiased, against float64 values from the definitions; real
architectures (a ResNet-18 on 32x32 inputs, a transformer encoder); the user's model handed
back as it came; dict batches fed as the model expects; the memory budget and too few samples."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rcka_kernels as rk
from rcka_kernels import reference
from rcka_kernels.compare.stats import exact_bytes, mirror, strips
from rcka_kernels.distill import models as M

# widths users have once outputs are flattened, the old planner's edges (1024, 1025, 2048) and odd ones
WIDTHS = st.one_of(st.sampled_from([1, 3, 64, 255, 1023, 1024, 1025, 2048, 4097, 8192]), st.integers(1, 700))
PROPERTY = settings(derandomize=True, deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])


class Layers(nn.Module):
    """One input, several ReLU layers of the given widths (features with a mean, as real ones have)."""

    def __init__(self, widths, seed, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.ModuleList(nn.Linear(8, w) for w in widths)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)
        self.act = nn.ModuleList(nn.ReLU() for _ in widths)
        self.to(dtype)

    def forward(self, x):
        return [a(lin(x.to(lin.weight.dtype))) for lin, a in zip(self.lin, self.act)]


def _features(model, names, batches):
    """Each named layer's output over the batches, as compare sees it, concatenated, in float64."""
    out = {n: [] for n in names}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: out[n].append(o.detach().reshape(o.shape[0], -1).double()))
             for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return [torch.cat(out[n]) for n in names]


def _cka64(fa, fb, debiased):
    """The float64 definition on the concatenated features (centred in float64 first)."""
    return torch.stack([torch.stack([reference.cka(a - a.mean(0), b - b.mean(0), debiased=debiased) for b in fb]) for a in fa])


def _nguyen64(fa, fb, sizes):
    """Nguyen et al.'s minibatch CKA from its definition: float64 unbiased HSIC per batch, summed."""
    hxy, hxx, hyy = 0, 0, 0
    start = 0
    for b in sizes:
        A, B = [f[start:start + b] for f in fa], [f[start:start + b] for f in fb]
        start += b
        if b < 4:
            continue
        hxy = hxy + torch.stack([torch.stack([reference.hsic(u, v, debiased=True) for v in B]) for u in A])
        hxx = hxx + torch.stack([reference.hsic(u, u, debiased=True) for u in A])
        hyy = hyy + torch.stack([reference.hsic(v, v, debiased=True) for v in B])
    return hxy / torch.sqrt(hxx[:, None] * hyy[None])


@PROPERTY
@given(wa=st.lists(WIDTHS, min_size=1, max_size=3), wb=st.lists(WIDTHS, min_size=1, max_size=3), n=st.integers(9, 48),
       b=st.integers(4, 20), shared=st.booleans(), bf16=st.booleans(), debiased=st.booleans())
def test_exact_equals_the_definition_at_every_width(wa, wb, n, b, shared, bf16, debiased):
    if sum(wa) + (0 if shared else sum(wb)) > 12000:  # keep the float64 statistics of one example under ~1 GiB
        wb = wb[:1]
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = Layers(wa, 0, dtype)
    m_b = None if shared else Layers(wb, 1, dtype)
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(n))
    batches = [x[i:i + b] for i in range(0, n, b)]  # a partial last batch when b does not divide n
    la = [f"act.{i}" for i in range(len(wa))]
    lb = la[::-1] if shared else [f"act.{i}" for i in range(len(wb))]
    res = rk.compare(a, m_b, batches, la, lb, estimator="exact", debiased=debiased, memory_budget="2GiB", progress=False)
    fa = _features(a, la, batches)
    fb = _features(a if shared else m_b, lb, batches)
    want = _cka64(fa, fb, debiased)
    assert res.estimator == "exact" and res.n_samples == n
    torch.testing.assert_close(res.values, want, rtol=0, atol=2e-6)
    if not debiased:
        assert ((res.values >= 0) & (res.values <= 1 + 1e-12)).all(), res.values


@PROPERTY
@given(wa=st.lists(WIDTHS, min_size=1, max_size=3), wb=st.lists(WIDTHS, min_size=1, max_size=2), n=st.integers(9, 60),
       b=st.integers(4, 24), shared=st.booleans(), bf16=st.booleans())
def test_minibatch_equals_nguyen_at_every_width(wa, wb, n, b, shared, bf16):
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = Layers(wa, 0, dtype)
    m_b = None if shared else Layers(wb, 1, dtype)
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(n + 1))
    batches = [x[i:i + b] for i in range(0, n, b)]
    la = [f"act.{i}" for i in range(len(wa))]
    lb = la[:1] if shared else [f"act.{i}" for i in range(len(wb))]
    sizes = [len(t) for t in batches]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skipped batches of < 4, layers that do not vary
        res = rk.compare(a, m_b, batches, la, lb, progress=False)
    want = _nguyen64(_features(a, la, batches), _features(a if shared else m_b, lb, batches), sizes)
    assert res.estimator == "minibatch" and res.n_samples == sum(s for s in sizes if s >= 4)
    assert res.skipped_batches == sum(s < 4 for s in sizes)
    ok = torch.isfinite(want)  # a ReLU layer that never fires does not vary: reported as 0
    torch.testing.assert_close(res.values[ok], want[ok], rtol=0, atol=1e-5)


@settings(derandomize=True, deadline=None, max_examples=30)
@given(m=st.integers(1, 1100), k=st.integers(1, 40))
def test_a_symmetric_product_from_its_lower_strips(m, k):
    """The strips cover 0..m in order, and A A^T formed from the strips on and below the
    diagonal, then mirrored, is the full product (float64: exact up to summation order)."""
    cuts = strips(m)
    assert cuts[0][0] == 0 and cuts[-1][1] == m and all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert all(hi - lo >= min(m, 96) for lo, hi in cuts) and len(cuts) <= 8
    a = torch.randn(m, k, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    out = torch.full((m, m), float("nan"), dtype=torch.float64)  # the blocks above the diagonal are never written
    for lo, hi in cuts:
        out[lo:hi, :hi] = a[lo:hi] @ a[:hi].mT
    torch.testing.assert_close(mirror(out, cuts), a @ a.mT, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b", [200, 390, 1030])  # 2, 4 and 8 strips
def test_minibatch_with_batches_formed_in_strips(b):
    """Batches large enough for the Gram to be formed strip by strip (and a partial last
    batch), wide and narrow layers, against Nguyen's float64 definition."""
    a, m_b = Layers([1500, 64], 0), Layers([700], 1)
    x = torch.randn(2 * b + 37, 8, generator=torch.Generator().manual_seed(b))
    batches = [x[i:i + b] for i in range(0, len(x), b)]
    res = rk.compare(a, m_b, batches, ["act.0", "act.1"], ["act.0"], progress=False)
    want = _nguyen64(_features(a, ["act.0", "act.1"], batches), _features(m_b, ["act.0"], batches), [len(t) for t in batches])
    torch.testing.assert_close(res.values, want, rtol=0, atol=1e-5)


def test_resnet18_on_32x32_both_estimators():
    """Every block of a ResNet-18 on 32x32 images (block outputs 4096 .. 512 wide), one model with itself
    and a second one, against the definitions; the model handed back unchanged."""
    torch.manual_seed(0)
    t, s = M.build("resnet18", 10), M.build("resnet18", 10)
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batches = [x[i:i + 16] for i in range(0, 40, 16)]
    sub = ["layer1.0", "layer2.1", "layer4.1"]
    res = rk.compare(t, s, batches, sub, sub, estimator="exact", progress=False)
    assert res.widths_a == [4096, 2048, 512]
    ft, fs = _features(t.eval(), sub, batches), _features(s.eval(), sub, batches)
    torch.testing.assert_close(res.values, _cka64(ft, fs, False), rtol=0, atol=2e-6)
    res = rk.compare(t, s, batches, blocks, blocks, progress=False)
    want = _nguyen64(_features(t, blocks, batches), _features(s, blocks, batches), [16, 16, 8])
    torch.testing.assert_close(res.values, want, rtol=0, atol=1e-5)
    self_ = rk.compare(t, None, batches, blocks, progress=False)
    torch.testing.assert_close(self_.values.diagonal(), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-6)


def test_transformer_encoder_both_estimators():
    """(batch, tokens, dim) outputs of a transformer encoder's layers, flattened per sample."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    x = torch.randn(30, 12, 32, generator=torch.Generator().manual_seed(2))
    batches = [x[i:i + 8] for i in range(0, 30, 8)]
    names = ["layers.0", "layers.1", "layers.2"]
    enc.train()
    res = rk.compare(enc, None, batches, names, estimator="exact", debiased=True, progress=False)
    assert enc.training and all(m.training for m in enc.modules())
    f = _features(enc.eval(), names, batches)
    torch.testing.assert_close(res.values, _cka64(f, f, True), rtol=0, atol=2e-6)
    res = rk.compare(enc, None, batches, names, progress=False)
    torch.testing.assert_close(res.values, _nguyen64(f, f, [8, 8, 8, 6]), rtol=0, atol=1e-5)


def test_model_comes_back_as_it_came():
    """Every submodule's own training flag, no hooks, same parameters and device."""
    m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4))
    x = torch.randn(20, 6)
    m.train()
    m[1].eval()  # a frozen BatchNorm in a training model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rk.compare(m, None, [x], ["0", "3"], progress=False)
    assert [mod.training for mod in m] == [True, False, True, True] and m.training
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # BatchNorm statistics untouched
    m.eval()
    m[2].train()  # an eval model with one Dropout in training mode (MC dropout)
    rk.compare(m, None, [x], ["0", "3"], estimator="exact", progress=False)
    assert [mod.training for mod in m] == [False, False, True, False] and not m.training
    assert all(not mod._forward_hooks for mod in m.modules())
    with pytest.raises(ValueError):
        rk.compare(m, None, [x * float("nan")], ["0"], progress=False)
    assert [mod.training for mod in m] == [False, False, True, False] and all(not mod._forward_hooks for mod in m.modules())


def test_too_few_samples_are_clear_errors():
    m = Layers([5], 0)
    for n, debiased in ((1, False), (2, True), (3, True)):
        with pytest.raises(ValueError, match=f"has {n} samples; the exact estimator needs at least"):
            rk.compare(m, None, [torch.randn(n, 8)], ["act.0"], estimator="exact", debiased=debiased, progress=False)


def test_dict_batches_go_to_the_forward_as_keywords():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.out = nn.Linear(16, 16)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            if attention_mask is not None:
                h = h * attention_mask[..., None]
            return self.out(h)

    torch.manual_seed(0)
    enc = Encoder()
    ids = torch.randint(0, 50, (24, 7))
    mask = (torch.rand(24, 7) > 0.3).float()
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8], "labels": torch.zeros(8)} for i in range(0, 24, 8)]
    with pytest.warns(RuntimeWarning, match="'labels' are not passed"):
        res = rk.compare(enc, None, batches, ["emb"], ["out"], estimator="exact", progress=False)
    masked = enc.out(enc.emb(ids) * mask[..., None]).detach().reshape(24, -1).double()
    unmasked = enc.out(enc.emb(ids)).detach().reshape(24, -1).double()
    emb = enc.emb(ids).detach().reshape(24, -1).double()
    assert abs(res.values.item() - reference.cka(emb - emb.mean(0), masked - masked.mean(0)).item()) < 1e-5
    assert abs(res.values.item() - reference.cka(emb - emb.mean(0), unmasked - unmasked.mean(0)).item()) > 1e-3
    # inputs= returning a tuple: positional arguments
    res2 = rk.compare(enc, None, [(ids[i:i + 8], mask[i:i + 8]) for i in range(0, 24, 8)], ["emb"], ["out"], estimator="exact",
                      inputs=lambda b: (b[0], b[1]), progress=False)
    assert res2.values.item() == pytest.approx(res.values.item(), abs=1e-9)


def test_memory_budget_is_checked_before_allocating():
    m = Layers([4096, 2048, 512], 0)
    x = torch.randn(8, 8)
    names = ["act.0", "act.1", "act.2"]
    with pytest.raises(ValueError, match=r"needs .* GiB .*'act.0' \(4096\).*memory_budget.*estimator='minibatch'"):
        rk.compare(m, None, [x], names, estimator="exact", memory_budget="100MiB", progress=False)
    # the default 1 GiB admits these three layers on each side of two models (the ResNet test runs such a case)
    streams = [4096, 2048, 512] * 2
    pairs = [(u, v) for u in range(3) for v in range(3, 6)] + [(u, u) for u in range(6)]
    assert exact_bytes(streams, pairs, debiased=True) < rk.compare.__globals__["DEFAULT_MEMORY_BUDGET"] == 1 << 30
