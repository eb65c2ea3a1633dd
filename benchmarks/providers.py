"""Everything a benchmark can run, by name: rcka_kernels backends, the naive
baselines of ``naive.py``, the peer libraries, and the float64 oracles.

A config is a plain dict (it is written into every JSON record):
  op        "cka" | "mmd"
  n, p, q   samples and widths (mmd: x is (n, p), y is (m, p))
  m         mmd only: rows of y
  G         optional: leading group dim (PCKA's per-channel groups)
  kernel    "linear" | "rbf" (rbf bandwidth: the median heuristic, or ``sigma``)
  debiased  unbiased HSIC (cka) / unbiased U-statistic (mmd)
  dtype     "float32" | "bfloat16" | "float16" | "float64"
  device    "cpu" | "cuda"
  seed      input seed

A provider maps (config, x, y) to a callable returning the value it computes
(a tensor with a graph when ``grad``; the benchmark calls ``.backward()`` on it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import naive

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# ----------------------------------------------------------------------------- inputs


def make_inputs(cfg: dict, requires_grad: bool = True):
    """Deterministic inputs: y is a noisy linear map of x, so CKA is far from 0 and 1."""
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    if cfg["op"] in ("rcka", "pcka"):
        # rcka: (B, classes) logits; pcka: (B, C, H, W) feature maps of one FPN level
        shape = (cfg["B"], cfg["classes"]) if cfg["op"] == "rcka" else (cfg["B"], cfg["C"], cfg["H"], cfg["W"])
        t = torch.randn(*shape, generator=gen) * (3.0 if cfg["op"] == "rcka" else 1.0)
        s = 0.8 * t + 0.6 * torch.randn(*shape, generator=gen) * (3.0 if cfg["op"] == "rcka" else 1.0)
        dt, dev = DTYPES[cfg.get("dtype", "float32")], cfg.get("device", "cpu")
        return s.to(dev, dt).requires_grad_(requires_grad), t.to(dev, dt).requires_grad_(requires_grad)
    lead = (cfg["G"],) if cfg.get("G") else ()
    n, p = cfg["n"], cfg["p"]
    x = torch.randn(*lead, n, p, generator=gen)
    if cfg["op"] == "mmd":
        y = torch.randn(*lead, cfg.get("m", n), p, generator=gen) * 1.1 + 0.25
    else:
        q = cfg["q"]
        w = torch.randn(p, q, generator=gen) / p**0.5
        y = x @ w + 0.5 * torch.randn(*lead, n, q, generator=gen)
    dt, dev = DTYPES[cfg.get("dtype", "float32")], cfg.get("device", "cpu")
    x = x.to(dev, dt).requires_grad_(requires_grad)
    y = y.to(dev, dt).requires_grad_(requires_grad)
    return x, y


# ----------------------------------------------------------------------------- providers


@dataclass
class Provider:
    name: str
    quantity: str  # what it computes: "cka" | "official" | "mmd"
    make: Callable  # (cfg, x, y) -> () -> value
    supports: Callable = lambda cfg: None  # cfg -> None | reason it cannot run this config
    grad: bool = True  # fwd+bwd (else forward only)
    note: str = ""


def _rcka_cka(backend):
    def make(cfg, x, y):
        import rcka_kernels as rk

        kw = dict(kernel=cfg["kernel"], debiased=cfg.get("debiased", False), backend=backend)
        if cfg.get("sigma") is not None:
            kw["sigma"] = cfg["sigma"]
        return lambda: rk.cka_loss(x, y, **kw).sum()

    return make


def _rcka_official(backend):
    def make(cfg, x, y):
        import rcka_kernels as rk

        # 1 - alignment, the official loss up to its weight and sign convention
        return lambda: rk.gram_discrepancy(x, y, centered=False, backend=backend).sum()

    return make


def _rcka_mmd(backend):
    def make(cfg, x, y):
        import rcka_kernels as rk

        kw = dict(kernel=cfg["kernel"], unbiased=cfg.get("debiased", False), backend=backend)
        if cfg.get("sigma") is not None:
            kw["sigma"] = cfg["sigma"]
        return lambda: rk.mmd(x, y, **kw).sum()

    return make


def _groups(fn):
    """Apply a 2-D naive function to each group of a (G, n, p) input, as a loop would."""

    def run(x, y, *a, **k):
        if x.ndim == 2:
            return fn(x, y, *a, **k)
        return torch.stack([fn(xi, yi, *a, **k) for xi, yi in zip(x, y)]).sum()

    return run


def _only(**want):
    def check(cfg):
        for k, v in want.items():
            have = cfg.get(k, False) if k == "debiased" else cfg.get(k)
            if isinstance(v, tuple):
                if have not in v:
                    return f"supports {k} in {v} only"
            elif have != v:
                return f"supports {k}={v!r} only"
        return None

    return check


def _sigma2(cfg):
    return None if cfg.get("sigma") is None else float(cfg["sigma"]) ** 2


def _load_submodule(pkg: str, sub: str):
    """Import ``pkg.sub`` even when ``pkg/__init__.py`` needs packages we did not
    install (peer packages are installed with --no-deps to leave torch alone)."""
    try:
        return importlib.import_module(f"{pkg}.{sub}")
    except ImportError:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise
        for key in [k for k in sys.modules if k == pkg or k.startswith(pkg + ".")]:
            del sys.modules[key]
        shell = types.ModuleType(pkg)
        shell.__path__ = list(spec.submodule_search_locations)
        shell.__spec__ = spec
        sys.modules[pkg] = shell
        return importlib.import_module(f"{pkg}.{sub}")


def _torch_cka(cfg, x, y):
    """torch-cka 0.21: CKA(model1, model2).compare(loader1, loader2) on two identity
    'models' whose one layer outputs x and y; its HSIC calls .item(): no gradient."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from torch_cka import CKA

    class Feat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Identity()

        def forward(self, t):
            return self.out(t)

    xd, yd = x.detach(), y.detach()
    loader1 = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xd), batch_size=xd.shape[0])
    loader2 = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(yd), batch_size=yd.shape[0])
    import warnings

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = CKA(Feat(), Feat(), "m1", "m2", ["out"], ["out"], device=str(x.device))
            c.compare(loader1, loader2)
        return c.export()["CKA"][0, 0]

    return run


def _ckatorch(method):
    def make(cfg, x, y):
        core = _load_submodule("ckatorch", "core")
        kw = dict(kernel=cfg["kernel"], unbiased=cfg.get("debiased", False), method=method)
        return lambda: core.cka_base(x, y, **kw)

    return make


def _cka_pytorch(cfg, x, y):
    """cka-pytorch 1.1.3: its hook stores gram(feature) = f f^T, its HSIC is hsic1
    (the unbiased minibatch estimator); CKA of one batch from three hsic1 calls."""
    hsic1 = _load_submodule("cka_pytorch", "hsic").hsic1
    gram = _load_submodule("cka_pytorch", "utils").gram

    def run():
        k, l = gram(x)[None], gram(y)[None]
        return (hsic1(k, l) / torch.sqrt(hsic1(k, k) * hsic1(l, l))).sum()

    return run


def _geomloss(backend):
    def make(cfg, x, y):
        from geomloss import SamplesLoss

        if cfg.get("sigma") is None:
            raise ValueError("geomloss needs an explicit sigma (blur)")
        loss = SamplesLoss("gaussian", blur=float(cfg["sigma"]), backend=backend)
        # geomloss returns 1/2 MMD^2 (biased, uniform weights)
        return lambda: 2.0 * loss(x, y)

    return make


def _keops_reason(cfg):
    try:
        import pykeops  # noqa: F401
    except Exception as e:
        return f"pykeops not importable ({type(e).__name__}: {e})"
    return None


def _losses():
    try:
        from rcka_kernels.losses import PCKALoss, RCKALoss
    except ImportError as e:
        raise RuntimeError(f"rcka_kernels has no RCKALoss/PCKALoss ({e})")
    return RCKALoss, PCKALoss


def _rcka_loss(backend, official):
    def make(cfg, x, y):
        loss = _losses()[0](intra_weight=1.0, inter_weight=1.0, official=official, backend=backend)
        return lambda: loss(x, y)

    return make


def _pcka_loss(backend, official):
    def make(cfg, x, y):
        loss = _losses()[1](patch_size=cfg["patch"], intra_weight=1.0, inter_weight=1.0 if cfg.get("inter") else None,
                            official=official, backend=backend)
        return lambda: loss(x, y)

    return make


def _naive_rcka(fn, official):
    """Both RCKA terms with a naive 2-D function: sample axis (B x B) and class axis (P x P)."""

    def make(cfg, x, y):
        if official:  # -A(t, s) on both axes, class-axis weighted like the sample axis
            return lambda: -(fn(y, x) + fn(y.T, x.T))
        return lambda: (1.0 - fn(x, y)) + (1.0 - fn(x.T, y.T))

    return make


def _naive_pcka(fn, official):
    """The per-channel loop a naive PCKA loss runs, on the patch matrices (C, patches, B*ps*ps)."""

    def make(cfg, x, y):
        from rcka_kernels.losses import patchify

        def run():
            sp, tp = patchify(x, cfg["patch"]), patchify(y, cfg["patch"])
            terms = []
            for si, ti in zip(sp, tp):
                v = -fn(ti, si) if official else 1.0 - fn(si, ti)
                if cfg.get("inter"):
                    v = v + (-fn(ti.T, si.T) if official else 1.0 - fn(si.T, ti.T))
                terms.append(v)
            return torch.stack(terms).mean()

        return run

    return make


def registry() -> dict:
    """name -> Provider. rcka[<backend>] for every backend this machine can load."""
    import rcka_kernels as rk

    P = {}
    for b, st in rk.available_backends().items():
        if b == "reference" or not st.available:
            continue
        P[f"rcka[{b}]"] = Provider(f"rcka[{b}]", "cka", _rcka_cka(b), _only(op="cka"))
        P[f"rcka-official[{b}]"] = Provider(
            f"rcka-official[{b}]", "official", _rcka_official(b), _only(op="cka", kernel="linear", debiased=False),
            note="1 - gram_discrepancy(centered=False): the official alignment, computed by rcka_kernels")
        P[f"rcka-mmd[{b}]"] = Provider(f"rcka-mmd[{b}]", "mmd", _rcka_mmd(b), _only(op="mmd"))
        P[f"RCKALoss[{b}]"] = Provider(f"RCKALoss[{b}]", "rcka", _rcka_loss(b, False), _only(op="rcka"),
                                       note="RCKALoss(intra_weight=1, inter_weight=1): true CKA, both axes")
        P[f"RCKALoss-official[{b}]"] = Provider(f"RCKALoss-official[{b}]", "rcka_official", _rcka_loss(b, True), _only(op="rcka"),
                                                note="RCKALoss(official=True): the published loss, both axes")
        P[f"PCKALoss[{b}]"] = Provider(f"PCKALoss[{b}]", "pcka", _pcka_loss(b, False), _only(op="pcka"),
                                       note="PCKALoss(patch 16, intra_weight=1): all channels in one batched call")
        P[f"PCKALoss-official[{b}]"] = Provider(f"PCKALoss-official[{b}]", "pcka_official", _pcka_loss(b, True), _only(op="pcka"),
                                                note="PCKALoss(official=True)")
    P["official"] = Provider(
        "official", "official", lambda c, x, y: (lambda: _groups(naive.official_alignment)(x, y)),
        _only(op="cka", kernel="linear", debiased=False),
        note="official RCKA CenterKernelAlignment transcribed (n x n Grams, traces of n x n products)")
    P["textbook"] = Provider(
        "textbook", "cka", lambda c, x, y: (lambda: _groups(naive.textbook_cka)(x, y, c["kernel"], _sigma2(c))),
        _only(op="cka", debiased=False), note="explicit H = I - 11^T/n, tr(KHLH)")
    P["naive-centred"] = Provider(
        "naive-centred", "cka",
        lambda c, x, y: (lambda: _groups(naive.centred_cka)(x, y, c["kernel"], c.get("debiased", False), _sigma2(c))),
        _only(op="cka"), note="Kornblith et al.'s mean-centred Grams (O(n^2) memory)")
    P["torch-cka"] = Provider("torch-cka", "cka", _torch_cka, _only(op="cka", kernel="linear", debiased=True, G=None, dtype="float32"),
                              grad=False, note="torch_cka.CKA.compare; unbiased HSIC, linear only, returns floats (no gradient)")
    P["ckatorch"] = Provider("ckatorch", "cka", _ckatorch("hsic"), _only(op="cka", debiased=False, G=None),
                             note="ckatorch.cka_base(method='hsic'): explicit H; rbf bandwidth = torch.median (lower median)")
    P["ckatorch-fro"] = Provider("ckatorch-fro", "cka", _ckatorch("fro_norm"), _only(op="cka", G=None), grad=False,
                                 note="ckatorch.cka_base(method='fro_norm'): centring detaches the Grams, so no gradient")
    P["cka-pytorch"] = Provider("cka-pytorch", "cka", _cka_pytorch, _only(op="cka", kernel="linear", debiased=True, G=None),
                                note="cka_pytorch hsic1 on gram(x) = x x^T (unbiased minibatch HSIC)")
    P["official-rcka"] = Provider("official-rcka", "rcka_official", _naive_rcka(naive.official_alignment, True), _only(op="rcka"),
                                  note="official formula on the sample and class axes")
    P["textbook-rcka"] = Provider("textbook-rcka", "rcka", _naive_rcka(naive.textbook_cka, False), _only(op="rcka"),
                                  note="explicit-H CKA on the sample and class axes")
    P["official-pcka"] = Provider("official-pcka", "pcka_official", _naive_pcka(naive.official_alignment, True), _only(op="pcka"),
                                  note="official formula in a loop over channels")
    P["textbook-pcka"] = Provider("textbook-pcka", "pcka", _naive_pcka(naive.textbook_cka, False), _only(op="pcka"),
                                  note="explicit-H CKA in a loop over channels")
    P["naive-mmd"] = Provider("naive-mmd", "mmd",
                              lambda c, x, y: (lambda: _groups(naive.mmd2)(x, y, _sigma2(c), c.get("debiased", False))),
                              _only(op="mmd", kernel="rbf"), note="three explicit kernel matrices")
    P["geomloss"] = Provider("geomloss", "mmd", _geomloss("tensorized"), _only(op="mmd", kernel="rbf", debiased=False, G=None),
                             note="geomloss SamplesLoss('gaussian', backend='tensorized'), x2 (it returns MMD^2/2)")
    P["geomloss-keops"] = Provider("geomloss-keops", "mmd", _geomloss("online"),
                                   lambda c: _only(op="mmd", kernel="rbf", debiased=False, G=None)(c) or _keops_reason(c),
                                   note="geomloss SamplesLoss('gaussian', backend='online') = KeOps")
    return P


# ----------------------------------------------------------------------------- oracles


def oracle(quantity: str, cfg: dict, ref_max_n: int):
    """(value, kind): the float64 value the providers are judged against.

    ``rcka_kernels.reference`` (float64, explicit Grams, CPU) up to ``ref_max_n``
    samples; beyond, the torch backend on float64 inputs on the config's device
    (the reference is O(n^3) and would take longer than the benchmark),
    reported as such. Low-precision configs are judged against the float64 value
    of the float32 inputs they were cast from (input quantisation included)."""
    import rcka_kernels as rk
    from rcka_kernels import reference

    x, y = make_inputs(dict(cfg, dtype="float32"), requires_grad=False)
    small = cfg["n"] <= ref_max_n and cfg.get("m", cfg["n"]) <= ref_max_n
    # the reference runs on the CPU; the float64 torch backend on the benchmark's device
    x, y = (x.double().cpu(), y.double().cpu()) if small else (x.double(), y.double())
    sigma = cfg.get("sigma")
    with torch.no_grad():
        if quantity in ("rcka", "rcka_official"):
            if quantity == "rcka":
                v = 2.0 - reference.cka(x, y) - reference.cka(x.T, y.T)
            else:
                v = -(reference.official_alignment(y, x) + reference.official_alignment(y.T, x.T))
            return float(v), "reference-fp64"
        if quantity in ("pcka", "pcka_official"):
            from rcka_kernels.losses import patchify

            sp, tp = patchify(x, cfg["patch"]), patchify(y, cfg["patch"])
            if quantity == "pcka":
                v = 1.0 - reference.cka(sp, tp)
                if cfg.get("inter"):
                    v = v + 1.0 - reference.cka(sp.transpose(1, 2), tp.transpose(1, 2))
            else:
                v = -reference.official_alignment(tp, sp)
                if cfg.get("inter"):
                    v = v - reference.official_alignment(tp.transpose(1, 2), sp.transpose(1, 2))
            return float(v.mean()), "reference-fp64"
        if quantity == "cka":
            if small:
                v = reference.cka(x, y, cfg["kernel"], sigma, cfg.get("debiased", False))
            else:
                v = rk.cka(x, y, kernel=cfg["kernel"], sigma=sigma, debiased=cfg.get("debiased", False), backend="torch")
        elif quantity == "official":
            v = reference.official_alignment(x, y) if small else 1.0 - rk.gram_discrepancy(x, y, centered=False, backend="torch")
        elif quantity == "mmd":
            if small:
                v = reference.mmd(x, y, cfg["kernel"], sigma, cfg.get("debiased", False))
            else:
                v = rk.mmd(x, y, kernel=cfg["kernel"], sigma=sigma, unbiased=cfg.get("debiased", False), backend="torch")
        else:
            raise ValueError(quantity)
    return float(v.sum()), ("reference-fp64" if small else "torch-backend-fp64")


def value_of(quantity: str, out) -> Optional[float]:
    """The provider's value in the oracle's units (losses are turned back into values)."""
    v = float(out.detach().double().sum()) if isinstance(out, torch.Tensor) else float(out)
    return v


def provider_value(p: Provider, cfg: dict, out) -> float:
    v = value_of(p.quantity, out)
    if p.quantity.startswith(("rcka", "pcka")):
        return v  # losses, compared with the loss computed by the oracle
    if p.name.startswith("rcka["):
        g = cfg.get("G") or 1
        return g - v  # sum over groups of 1 - cka
    if p.name.startswith("rcka-official["):
        g = cfg.get("G") or 1
        return g - v
    return v
