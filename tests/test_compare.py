"""rk.compare: exact full-data-set CKA (equal to rk.cka on the concatenated features,
whatever the batch size), Nguyen et al.'s minibatch estimator (against its float64
definition), the memory budget, batch and output formats, errors, the model handed back
as it came, save/load, plot, torch.distributed (2 gloo processes), and the command line on
fake data sets in the harness's on-disk formats. Property tests over widths and real
architectures: tests/test_compare_properties.py."""

import json
import os
import subprocess
import sys
import warnings

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import rcka_kernels as rk  # noqa: E402
from rcka_kernels import reference  # noqa: E402
from rcka_kernels.compare import CompareResult, default_layers  # noqa: E402
from rcka_kernels.compare.__main__ import main as cli_main  # noqa: E402
from rcka_kernels.compare.stats import ExactStats, exact_bytes  # noqa: E402

from .utils import join_group, spawn_ranks  # noqa: E402


class Net(nn.Module):
    """Layers of different widths, some outputs 4-D (flattened), an offset to test the shifted sums."""

    def __init__(self, w=12, seed=0, offset=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(6, w)
        self.body = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 8))
        self.fc = nn.Linear(8, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
        with torch.no_grad():
            self.body[2].bias += offset  # features with a large mean (body.2, fc) after the tanh

    def forward(self, x):
        h = self.body(self.inp(x))
        return self.fc(h.reshape(-1, 2, 2, 2).flatten(1))


N = 53


def _data(n=N, seed=1):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def _feats(model, names, batches):
    """Features of each named layer, concatenated over the same batches compare sees, in float64."""
    mods = dict(model.named_modules())
    out = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: out[n].append(o.detach().reshape(o.shape[0], -1))) for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return [torch.cat(out[n]).double() for n in names]


def _batches(x, bs):
    return [x[i:i + bs] for i in range(0, len(x), bs)]


LAYERS = ["inp", "body.0", "body.1", "body.2", "fc"]
F64 = torch.float64
# (rtol, atol) of the exact estimator against the float64 CKA of the concatenated features, by
# product dtype: float64 products are exact to rounding; float32 ones (the default for float32
# features: float32 sums over blocks of up to stats.BLOCK_ROWS rows, float64 across blocks) to
# 2e-6 relative, the float32 rule of the property tests
EXACT_TOL = {None: (2e-6, 1e-9), F64: (1e-9, 1e-12)}


def _concat_cka(fa, fb, debiased):
    """rk.cka (held to the float64 textbook reference by the other tests) of the concatenated
    float64 features, columns centred first (CKA does not change; the explicit-H reference
    would lose digits to the large means)."""
    fa, fb = [f - f.mean(0) for f in fa], [f - f.mean(0) for f in fb]
    return torch.tensor([[rk.cka(a, b, debiased=debiased).item() for b in fb] for a in fa], dtype=torch.float64)


@pytest.mark.parametrize("block_rows", [None, 8])
@pytest.mark.parametrize("product_dtype", [None, F64])
@pytest.mark.parametrize("debiased", [False, True])
def test_exact_equals_concatenated_features_any_batch_size(debiased, product_dtype, block_rows, monkeypatch):
    """Any batch size, and rows gathered into blocks (8 rows: several blocks, batches larger than a block)."""
    if block_rows is not None:
        from rcka_kernels.compare import stats

        monkeypatch.setattr(stats, "BLOCK_ROWS", block_rows)
    a, b = Net(12, 0, offset=300.0), Net(9, 1)
    x = _data()
    first = None
    rtol, atol = EXACT_TOL[product_dtype]
    for bs in (1, 4, 17, N):
        bx = _batches(x, bs)
        want = _concat_cka(_feats(a, LAYERS, bx), _feats(b, LAYERS, bx), debiased)
        res = rk.compare(a, b, bx, LAYERS, LAYERS, estimator="exact", debiased=debiased, product_dtype=product_dtype, progress=False)
        assert res.estimator == "exact" and res.n_samples == N and res.values.dtype == torch.float64
        assert res.values.shape == (5, 5)
        torch.testing.assert_close(res.values, want, rtol=rtol, atol=atol)
        # batch-size independent up to the float32 rounding of the features themselves
        first = res.values if first is None else first
        torch.testing.assert_close(res.values, first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("product_dtype", [None, F64])
@pytest.mark.parametrize("debiased", [False, True])
def test_exact_same_model_one_pass_and_layer_subsets(debiased, product_dtype):
    a = Net(12, 0, offset=-50.0)
    x = _data()
    f = _feats(a, LAYERS, _batches(x, 10))
    want = _concat_cka(f, f, debiased)
    calls = []
    a.register_forward_pre_hook(lambda m, i: calls.append(1))
    kw = dict(estimator="exact", debiased=debiased, product_dtype=product_dtype, progress=False)
    rtol, atol = EXACT_TOL[product_dtype]
    res = rk.compare(a, None, _batches(x, 10), LAYERS, **kw)
    assert len(calls) == 6  # one forward pass per batch
    torch.testing.assert_close(res.values, want, rtol=rtol, atol=atol)
    torch.testing.assert_close(res.values, res.values.T, rtol=rtol, atol=atol)
    calls.clear()
    res2 = rk.compare(a, a, _batches(x, 10), LAYERS[:2], LAYERS[1:], **kw)
    assert len(calls) == 6
    torch.testing.assert_close(res2.values, res.values[:2, 1:], rtol=rtol, atol=atol)


def test_exact_float32_features_against_rk_cka():
    """The issue's target: float32 features, 1e-6 relative to rk.cka on the concatenated features."""
    a, b = Net(12, 0, offset=1e3), Net(9, 1)
    x = _data(200)
    fa, fb = _feats(a, ["inp", "fc"], _batches(x, 64)), _feats(b, ["body.1"], _batches(x, 64))
    res = rk.compare(a, b, _batches(x, 64), ["inp", "fc"], ["body.1"], estimator="exact", progress=False)
    for i, f in enumerate(fa):
        want = rk.cka(f.float(), fb[0].float()).double()
        assert abs(res.values[i, 0] - want) <= 1e-6 * abs(want)


def _nguyen(fa, fb, bs, kernel="linear", sigma=None):
    """Nguyen et al.'s minibatch CKA from its definition, float64 textbook HSIC per batch."""
    n = fa[0].shape[0]
    hxy = torch.zeros(len(fa), len(fb), dtype=torch.float64)
    hxx, hyy = torch.zeros(len(fa), dtype=torch.float64), torch.zeros(len(fb), dtype=torch.float64)
    for s in range(0, n, bs):
        if min(bs, n - s) < 4:
            continue
        A, B = [f[s:s + bs] for f in fa], [f[s:s + bs] for f in fb]
        for i, u in enumerate(A):
            hxx[i] += reference.hsic(u, u, kernel, sigma, True)
            for j, v in enumerate(B):
                hxy[i, j] += reference.hsic(u, v, kernel, sigma, True)
        for j, v in enumerate(B):
            hyy[j] += reference.hsic(v, v, kernel, sigma, True)
    return hxy / torch.sqrt(hxx[:, None] * hyy[None])


@pytest.mark.parametrize("kernel,sigma", [("linear", None), ("rbf", 2.0), ("rbf", "median")])
def test_minibatch_equals_nguyen_definition(kernel, sigma):
    a, b = Net(12, 0, offset=20.0), Net(9, 1)
    x = _data()
    la, lb = (LAYERS, LAYERS[1:]) if kernel == "linear" else (LAYERS[:2], LAYERS[3:])
    fa, fb = _feats(a, la, _batches(x, 16)), _feats(b, lb, _batches(x, 16))
    want = _nguyen(fa, fb, 16, kernel, sigma)
    with pytest.warns(RuntimeWarning, match="fewer than 4 samples"):  # 53 = 3 x 16 + 5: no skip; 53 = 4 x 13 + 1: skip
        rk.compare(a, b, _batches(x, 13), la, lb, estimator="minibatch", kernel=kernel, sigma=sigma, progress=False)
    res = rk.compare(a, b, _batches(x, 16), la, lb, estimator="minibatch", kernel=kernel, sigma=sigma, progress=False)
    assert res.estimator == "minibatch" and res.batches == 4 and res.skipped_batches == 0
    torch.testing.assert_close(res.values, want, rtol=1e-5, atol=1e-6)
    if kernel == "rbf":
        assert rk.compare(a, b, _batches(x, 16), LAYERS, kernel=kernel, sigma=sigma, progress=False).estimator == "minibatch"


def test_minibatch_moves_with_batch_size_exact_does_not():
    a, b = Net(12, 0), Net(9, 1)
    x = _data(120)
    mb = [rk.compare(a, b, _batches(x, bs), ["inp"], ["fc"], estimator="minibatch", progress=False).values.item() for bs in (8, 120)]
    ex = [rk.compare(a, b, _batches(x, bs), ["inp"], ["fc"], estimator="exact", progress=False).values.item() for bs in (8, 120)]
    assert abs(mb[0] - mb[1]) > 1e-3
    assert abs(ex[0] - ex[1]) < 1e-6


def test_exact_statistics_do_not_grow_with_samples():
    pairs = [(0, 0), (0, 2), (1, 1), (1, 2), (2, 2)]
    st = ExactStats([256, 256, 128], pairs, debiased=True, device="cpu", dtype=torch.float32)
    st.set_shift([torch.zeros(w) for w in (256, 256, 128)])

    def nbytes():
        ts = [*st.M.values(), *st.U.values(), *st.V.values(), *st.DE.values(), *st.s, st.D]
        return sum(t.numel() * t.element_size() for t in ts)

    before = nbytes()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        st.update([torch.randn(1000, w, generator=g) for w in (256, 256, 128)])
    st.flush()
    assert nbytes() == before <= exact_bytes([256, 256, 128], pairs, True) and st.n == 3000


def test_batch_formats_and_output_types():
    class Out:
        def __init__(self, h):
            self.last_hidden_state = h

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 5)
            self.pair = nn.Identity()

        def forward(self, x):
            h = self.lin(x)
            return self.pair((h, h * 2)), Out(h + 1)

    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Wrap()

        def forward(self, x):
            return self.enc(x)[1]

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = HF()
            self.out = nn.Identity()

        def forward(self, x):
            return self.out(self.inner(x).last_hidden_state)

    m = Named()
    x = _data()
    want = rk.compare(m, None, _batches(x, 20), ["inner.enc.lin", "inner.enc.pair", "inner.enc", "out"], estimator="exact", progress=False)
    # tuple output -> first element (= lin's output), last_hidden_state -> it: all the same features up to a shift
    torch.testing.assert_close(want.values, torch.ones(4, 4, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    ys = torch.arange(N)
    for loader in ([(b, ys[:len(b)]) for b in _batches(x, 20)], [[b] for b in _batches(x, 20)],
                   [{"pixel_values": b, "labels": 0} for b in _batches(x, 20)], [{"input": b} for b in _batches(x, 20)]):
        res = rk.compare(m, None, loader, ["inner.enc.lin", "out"], estimator="exact", progress=False)
        torch.testing.assert_close(res.values, want.values[[0, 3]][:, [0, 3]], rtol=1e-6, atol=1e-9)
    res = rk.compare(m, None, [{"feats": b} for b in _batches(x, 20)], ["out"], inputs=lambda d: d["feats"], progress=False)
    assert res.n_samples == N


def test_errors_are_clear():
    a, b = Net(12, 0), Net(9, 1)
    x = _data()
    with pytest.raises(ValueError, match="model_b has no layer 'body.7'"):
        rk.compare(a, b, _batches(x, 10), ["inp"], ["body.7"], progress=False)
    with pytest.raises(ValueError, match="model_a has no layer 'nope'"):
        rk.compare(a, b, _batches(x, 10), ["nope"], progress=False)
    with pytest.raises(ValueError, match="estimator must be"):
        rk.compare(a, b, _batches(x, 10), estimator="fast", progress=False)
    with pytest.raises(ValueError, match="exact estimator needs the linear kernel"):
        rk.compare(a, b, _batches(x, 10), kernel="rbf", estimator="exact", progress=False)
    with pytest.raises(ValueError, match="yielded no batches"):
        rk.compare(a, b, [], progress=False)
    with pytest.raises(ValueError, match="needs at least 4"):
        rk.compare(a, b, [x[:3]], estimator="exact", debiased=True, progress=False)
    with pytest.raises(ValueError, match="no batch has at least 4"), pytest.warns(RuntimeWarning):
        rk.compare(a, b, _batches(x[:9], 3), estimator="minibatch", progress=False)
    with pytest.raises(ValueError, match="dict batch needs keys"):
        rk.compare(a, b, [{"foo": x}], progress=False)
    with pytest.raises(TypeError, match="a batch must be a tensor"):
        rk.compare(a, b, [3.0], progress=False)
    xn = x.clone()
    xn[7, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 0: layer 'inp' has NaN or Inf"):
        rk.compare(a, b, [xn], progress=False)
    relu = nn.ReLU()
    twice = nn.Sequential(nn.Linear(6, 4), relu, nn.Linear(4, 4), relu)
    with pytest.raises(ValueError, match="ran 2 times in one forward pass"):
        rk.compare(twice, None, [x], ["1"], progress=False)
    # the hooks are gone and the training flags back after an error
    assert all(not m._forward_hooks for m in twice.modules()) and twice.training


class Moody(nn.Module):
    """Well behaved until ``mode`` says otherwise (set by the loader before each batch)."""

    def __init__(self):
        super().__init__()
        self.a, self.flat, self.b = nn.Linear(6, 5), nn.Flatten(), nn.Linear(5, 4)
        self.mode = "ok"

    def forward(self, x):
        h = self.a(x)
        if self.mode == "twice":
            self.a(x)
        g = self.flat(torch.cat([h, h], 1) if self.mode == "wide" else h[:-1] if self.mode == "rows" else h)
        return g if self.mode == "skip" else self.b(g[:, :5])


@pytest.mark.parametrize("estimator", ["exact", "minibatch"])
@pytest.mark.parametrize("mode,match", [
    ("nan", "batch 1: layer 'a' has NaN or Inf features"),
    ("twice", "layer 'a' ran 2 times in one forward pass"),
    ("wide", "batch 1: layer 'flat' has 10 features, 5 in the first batch"),
    ("rows", "batch 1: layer 'flat' has 9 rows but 'a' has 10"),
    ("skip", "layer 'b' did not run in the forward pass"),
])
def test_errors_after_the_first_batch(estimator, mode, match):
    """From the second batch on the statistics take each layer's output during the forward pass:
    the same checks, the batch and the layer named, the hooks gone afterwards."""
    m = Moody()
    x = _data(20)

    def loader():
        m.mode = "ok"
        yield x[:10]
        m.mode = mode
        yield x[10:] * float("nan") if mode == "nan" else x[10:]

    with pytest.raises(ValueError, match=match):
        rk.compare(m, None, loader(), ["a", "flat", "b"], estimator=estimator, progress=False)
    assert all(not mod._forward_hooks for mod in m.modules())


def test_constant_layer_gives_zero_with_warning_and_no_clamp():
    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.const = nn.Linear(6, 3)
            self.lin = nn.Linear(6, 4)

        def forward(self, x):
            return self.const(x * 0), self.lin(x)

    m = C()
    x = _data(12)
    with pytest.warns(RuntimeWarning, match="'const' do not vary"):
        res = rk.compare(m, None, [x], ["const", "lin"], estimator="exact", progress=False)
    assert res.values[0].tolist() == [0.0, 0.0] and res.values[1, 1] == pytest.approx(1.0)
    # debiased CKA of unrelated features is negative at small n: reported as is
    g = torch.Generator().manual_seed(3)
    z = torch.randn(12, 6, generator=g)
    two = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    res = rk.compare(two, None, [torch.cat([z, torch.randn(12, 6, generator=g)])], ["0"], ["1"], estimator="exact",
                     debiased=True, progress=False)
    assert res.values.numel() == 1


def test_save_load_plot_table(tmp_path):
    a, b = Net(12, 0), Net(9, 1)
    res = rk.compare(a, b, _batches(_data(), 20), LAYERS, LAYERS[:3], progress=False)
    p = tmp_path / "r.json"
    res.save(p)
    back = CompareResult.load(p)
    torch.testing.assert_close(back.values, res.values, rtol=0, atol=0)
    assert (back.layers_a, back.layers_b, back.estimator, back.n_samples, back.batches) == \
        (res.layers_a, res.layers_b, "minibatch", N, 3)
    assert json.loads(p.read_text())["kernel"] == "linear"
    fig = res.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG" and fig.axes
    assert res["inp", "body.0"] == float(res.values[0, 1])
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a saved rcka_kernels compare result"):
        CompareResult.load(bad)


def test_default_layers_of_harness_models():
    from rcka_kernels.distill import models as M

    assert default_layers(M.build("mlp_teacher", 10)) == ["body.0", "body.1", "body.2", "body.3", "fc"]
    r = default_layers(M.build("resnet8", 100))
    assert r[:3] == ["conv1", "bn1", "relu"] and "layer2.0" in r and r[-2:] == ["avgpool", "fc"]


# ----------------------------------------------------------------------------- torch.distributed

WORLD = 2
SPLIT = [23, 30]  # uneven shards; batches of 10 on each rank (a 3-sample batch: skipped by minibatch)
# (estimator, debiased, product_dtype): the all-reduce algebra with float64 products (to rounding),
# the default float32 products to the 1e-6 target (each rank shifts by its own first batch)
DIST_CASES = [("exact", False, F64), ("exact", True, F64), ("exact", True, None), ("minibatch", False, None)]
FAILURES = [("exact", "nan"), ("minibatch", "nan"), ("exact", "empty"), ("minibatch", "empty")]



def _dist_worker(rank, port, out_dir):
    join_group(rank, port, WORLD)
    try:
        torch.set_num_threads(1)
        a, b = Net(12, 0, offset=40.0), Net(9, 1)
        x = _data()
        lo = sum(SPLIT[:rank])
        shard = x[lo:lo + SPLIT[rank]]
        res = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for est, deb, pd in DIST_CASES:
                r = rk.compare(a, b, _batches(shard, 10), LAYERS, LAYERS[2:], estimator=est, debiased=deb, product_dtype=pd,
                               progress=False)
                res[(est, deb, pd)] = (r.values, r.n_samples)
            for est, bad in FAILURES:  # rank 1 fails (NaN features in its second batch, or no batch): nobody hangs
                mine = shard.clone()
                if rank == 1 and bad == "nan":
                    mine[12] = float("nan")
                try:
                    rk.compare(a, b, [] if rank == 1 and bad == "empty" else _batches(mine, 10), LAYERS, LAYERS[2:],
                               estimator=est, progress=False)
                    res[(est, bad)] = None
                except (ValueError, RuntimeError) as e:  # PeerFailed is a RuntimeError
                    res[(est, bad)] = (type(e).__name__, str(e))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed.py: skip the interpreter teardown where gloo threads can abort


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmpdist")
    return spawn_ranks(_dist_worker, out, WORLD)


@pytest.mark.parametrize("est,deb,pd", DIST_CASES)
def test_distributed_equals_single_process(dist_results, est, deb, pd):
    a, b = Net(12, 0, offset=40.0), Net(9, 1)
    x = _data()
    # the same batches as the ranks fed, in one process (so that the float32 features are the same)
    batches = _batches(x[:SPLIT[0]], 10) + _batches(x[SPLIT[0]:], 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = rk.compare(a, b, batches, LAYERS, LAYERS[2:], estimator=est, debiased=deb, product_dtype=pd, progress=False).values
    rtol, atol = EXACT_TOL[pd] if est == "exact" else EXACT_TOL[F64]
    for r in range(WORLD):
        values, n = dist_results[r][(est, deb, pd)]
        torch.testing.assert_close(values, want, rtol=rtol, atol=atol)
        assert n == (N if est == "exact" else N - 3)


@pytest.mark.parametrize("est,bad", FAILURES)
def test_distributed_failure_on_one_rank_stops_every_rank(dist_results, est, bad):
    """The failing rank raises its own error; the others raise instead of waiting for it."""
    mine, other = dist_results[1][(est, bad)], dist_results[0][(est, bad)]
    if bad == "nan":
        assert mine[0] == "ValueError" and "batch 1" in mine[1] and "NaN or Inf" in mine[1], mine
    else:
        assert mine == ("ValueError", "compare: the loader yielded no batches (on this rank)"), mine
    assert other[0] == "PeerFailed" and "another rank failed" in other[1], other


# ----------------------------------------------------------------------------- command line


def _one_line_error(capsys, argv, match):
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("rcka-compare: error:") and match in err[-1], err


def test_cli_fake_cifar_and_imagefolder(tmp_path, capsys):
    pytest.importorskip("PIL.Image")
    from rcka_kernels.distill import models as M

    from .test_distill_data import _write_cifar, _write_folder

    _write_cifar(str(tmp_path / "c100"), n_train=6, n_test=9)
    torch.manual_seed(0)
    ck = tmp_path / "r8.pt"
    torch.save({"model": M.build("resnet8", 100).state_dict()}, ck)
    out = tmp_path / "out_c"
    rc = cli_main(["--data", str(tmp_path / "c100"), "--model-a", "resnet8", "--ckpt-a", str(ck), "--model-b", "resnet14",
                   "--layers-a", "layer1.0,avgpool,fc", "--layers-b", "fc", "--batch-size", "4", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    res = CompareResult.load(out / "compare.json")
    # the unbiased per-batch HSIC can make minibatch CKA of unrelated layers negative (on 2 batches of 4 here)
    assert res.values.shape == (3, 1) and res.n_samples == 8 and res.estimator == "minibatch" and res.skipped_batches == 1
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    _write_folder(str(tmp_path / "inet"), per_class=3)
    out = tmp_path / "out_i"
    rc = cli_main(["--data", str(tmp_path / "inet"), "--model-a", "resnet18", "--image-size", "32", "--batch-size", "4",
                   "--estimator", "minibatch", "--layers-a", "layer3.0,layer4.1,fc", "--out", str(out), "--no-progress", "--no-plot"])
    assert rc == 0
    res = CompareResult.load(out / "compare.json")
    assert res.n_samples == 4 and res.skipped_batches == 1 and res.meta["split"] == "test"  # 6 images: batches of 4 and 2
    torch.testing.assert_close(res.values.diagonal(), torch.ones(3, dtype=torch.float64))
    capsys.readouterr()
    _one_line_error(capsys, ["--data", str(tmp_path / "nowhere"), "--model-a", "resnet8"], "does not exist")
    _one_line_error(capsys, ["--model-a", "resnet8"], "does not fit the digits data")
    _one_line_error(capsys, ["--model-a", "mlp_teacher", "--layers-a", "body.0,nope"], "no layer 'nope'")
    _one_line_error(capsys, ["--model-a", "mlp_teacher", "--ckpt-a", str(ck)], "model A checkpoint")
    _one_line_error(capsys, ["--run", str(tmp_path)], "summary.json")


def test_cli_run_folder_of_a_distillation(tmp_path):
    from rcka_kernels.distill.train import Config, run

    run(Config(out=str(tmp_path), epochs=1, teacher_epochs=1, max_steps=3, progress=False, plot=False, threads=1))
    r = subprocess.run([sys.executable, "-m", "rcka_kernels.compare", "--run", str(tmp_path), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for m in ("ce", "kd", "rcka"):
        res = CompareResult.load(tmp_path / "compare" / f"{m}.json")
        assert res.layers_a == ["body.0", "body.1", "body.2", "body.3", "fc"] and res.layers_b == ["body.0", "body.1", "fc"]
        assert res.n_samples == 360 and res.estimator == "minibatch" and res.values.abs().max() <= 1
    assert (tmp_path / "compare" / "layer_cka.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "compare" / "layer_cka.md").read_text()
    assert table == r.stdout.split("\n\nwrote")[0] + "\n" and "| rcka |" in table
