"""rcka_kernels against the code people run today: the naive formulas (benchmarks/naive.py:
the official RCKA alignment, the textbook explicit-H CKA, Kornblith's mean-centred Grams, the
three-matrix MMD) and the peer libraries torch-cka 0.21, ckatorch 1.0.3, cka-pytorch 1.1.3 and
geomloss 0.3.1 (installed by `make bench`; one that is missing records its import error).

    python -m benchmarks.bench_naive            # the README's table and plot
    python -m benchmarks.bench_naive --quick    # small sizes

Each contender runs in a fresh process (benchmarks/_harness.py: its own peak memory, an
address-space cap that turns an out-of-memory into a result): fwd+bwd with x requiring grad
(forward only where a library has no gradient: torch-cka, which returns floats), float32.
Values against rcka_kernels.reference in float64. A contender that fails, or whose next size
would take over the time limit (n^3 work), is not run at larger n.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Callable

import torch

from benchmarks import _harness, naive

TIMEOUT_S = 300.0
#: which contenders compute which quantity: (kernel, debiased) -> names; "official" is the uncentred alignment
FAMILIES = {
    "linear CKA p=256": ("cka", "linear", False, 256, ["rcka", "official", "textbook", "naive-centred", "ckatorch"]),
    "linear CKA p=256 debiased": ("cka", "linear", True, 256, ["rcka", "naive-centred", "torch-cka", "cka-pytorch"]),
    "RBF CKA p=64 sigma=8": ("cka", "rbf", False, 64, ["rcka", "textbook", "naive-centred"]),
    "RBF MMD^2 d=64 sigma=8": ("mmd", "rbf", False, 64, ["rcka", "naive-mmd", "geomloss"]),
}
SIZES = {"linear CKA p=256": [512, 1024, 2048, 4096], "linear CKA p=256 debiased": [1024],
         "RBF CKA p=64 sigma=8": [1024, 4096], "RBF MMD^2 d=64 sigma=8": [1024, 4096]}
QUICK = {"linear CKA p=256": [256, 512], "linear CKA p=256 debiased": [256], "RBF CKA p=64 sigma=8": [256], "RBF MMD^2 d=64 sigma=8": [256]}
#: contenders whose n^3 cost is not worth running above this n
MAX_N = {"textbook": 2048, "ckatorch": 1024}


def _submodule(pkg: str, sub: str):
    """Import ``pkg.sub`` even when ``pkg/__init__.py`` needs packages that --no-deps left out."""
    try:
        return importlib.import_module(f"{pkg}.{sub}")
    except ImportError:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise
        shell = types.ModuleType(pkg)
        shell.__path__, shell.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules[pkg] = shell
        return importlib.import_module(f"{pkg}.{sub}")


def _torch_cka(x, y):
    """torch-cka's CKA.compare on two identity 'models' whose one layer outputs x and y."""
    from torch_cka import CKA

    class Feat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Identity()

        def forward(self, t):
            return self.out(t)

    def loader(t):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(t.detach()), batch_size=t.shape[0])

    c = CKA(Feat(), Feat(), "m1", "m2", ["out"], ["out"], device=str(x.device))
    c.compare(loader(x), loader(y))
    return c.export()["CKA"][0, 0]


def _cka_pytorch(x, y):
    hsic1, gram = _submodule("cka_pytorch", "hsic").hsic1, _submodule("cka_pytorch", "utils").gram
    k, l = gram(x)[None], gram(y)[None]
    return (hsic1(k, l) / torch.sqrt(hsic1(k, k) * hsic1(l, l))).sum()


def _formula(name: str, op: str, kernel: str, debiased: bool, sigma: float) -> Callable:
    s2 = sigma**2 if kernel == "rbf" else None
    if name == "rcka":
        import rcka_kernels as rk

        if op == "mmd":
            return lambda x, y: rk.mmd(x, y, kernel="rbf", sigma=sigma, unbiased=debiased)
        return lambda x, y: rk.cka(x, y, kernel=kernel, sigma=None if kernel == "linear" else sigma, debiased=debiased)
    return {
        "official": naive.official_alignment,
        "textbook": lambda x, y: naive.textbook_cka(x, y, kernel, s2),
        "naive-centred": lambda x, y: naive.centred_cka(x, y, kernel, debiased, s2),
        "naive-mmd": lambda x, y: naive.mmd2(x, y, s2, debiased),
        "ckatorch": lambda x, y: _submodule("ckatorch", "core").cka_base(x, y, kernel=kernel, unbiased=debiased, method="hsic"),
        "torch-cka": _torch_cka,
        "cka-pytorch": _cka_pytorch,
        "geomloss": lambda x, y: 2.0 * importlib.import_module("geomloss").SamplesLoss("gaussian", blur=sigma)(x, y),
    }[name]


def _inputs(op: str, n: int, p: int, device: str):
    x, y = _harness.inputs((n, p), p, device)
    return (x, 1.1 * y + 0.25) if op == "mmd" else (x, y)


def contender(name: str, family: str, n: int, device: str) -> Callable:
    """The call a fresh process times (the harness's ``isolated`` target)."""
    op, kernel, debiased, p, _ = FAMILIES[family]
    fn = _formula(name, op, kernel, debiased, float(p) ** 0.5)
    x, y = _inputs(op, n, p, device)
    if name == "torch-cka":  # no gradient: it returns floats
        return lambda: fn(x, y)

    def call():
        out = fn(x, y)
        out.backward()
        x.grad = None
        return out.detach()
    return call


def reference_value(family: str, name: str, n: int) -> float:
    from rcka_kernels import reference

    op, kernel, debiased, p, _ = FAMILIES[family]
    x, y = (t.detach().double() for t in _inputs(op, n, p, "cpu"))
    sigma = float(p) ** 0.5 if kernel == "rbf" else None
    if name == "official":
        return float(reference.official_alignment(x, y))
    if op == "mmd":
        return float(reference.mmd(x, y, "rbf", sigma, debiased))
    return float(reference.cka(x, y, kernel, sigma, debiased))


def main(argv=None):
    args = _harness.parser(__doc__).parse_args(argv)
    sizes = QUICK if args.quick else SIZES
    res = _harness.Results("naive", args, {"sizes": sizes, "timeout_s": TIMEOUT_S, "dtype": "float32"})
    for family, (_, _, _, _, names) in FAMILIES.items():
        stopped = {}
        for n in sizes[family]:
            for name in names:
                rec = {"case": f"{family} n={n}", "contender": name, "family": family, "n": n}
                if n > MAX_N.get(name, n) or name in stopped:
                    continue
                rec.update(_harness.isolated("benchmarks.bench_naive:contender", dict(name=name, family=family, n=n, device=args.device),
                                             args.device, budget_s=5.0, reps=3, timeout_s=TIMEOUT_S, mem_cap_gb=12.0))
                if rec["status"] != "ok" or rec["first_call_s"] * 8 > TIMEOUT_S / 3:
                    stopped[name] = True
                if rec["status"] == "ok" and n <= 4096:
                    rec["abs_err"] = abs(rec["value"] - reference_value(family, name, n))
                res.add([rec])
    res.config["plot"] = plot([r for r in res.results if r["family"] == "linear CKA p=256"], args)
    res.write()
    return res


def plot(recs, args) -> str:
    """Time and extra memory against n, log-log, one line per contender: naive_linear_<device>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["contender"] for r in recs):
        ok = [r for r in recs if r["contender"] == name and r["status"] == "ok"]
        axes[0].plot([r["n"] for r in ok], [r["time_s"] for r in ok], "o-", label=name)
        axes[1].plot([r["n"] for r in ok], [max(r["peak_bytes"], 1 << 16) / (1 << 20) for r in ok], "o-", label=name)
    for ax, label in zip(axes, ("time per fwd+bwd [s]", "extra peak memory [MiB]")):
        ax.set(xscale="log", yscale="log", xlabel="n (samples)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("linear CKA, p = q = 256, float32", fontsize=10)
    fig.tight_layout()
    name = f"naive_linear_{args.device}{'_quick' if args.quick else ''}.png"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(args.out) / name, dpi=100)
    print(f"wrote {Path(args.out) / name}")
    return name


if __name__ == "__main__":
    main()
