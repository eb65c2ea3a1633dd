"""rk.compare against pytorch-cka 1.1.3 (the strongest peer) on whole networks, layer by layer.

    python -m benchmarks.bench_compare                        # both cases (the README's tables)
    python -m benchmarks.bench_compare --case resnet          # one case
    python -m benchmarks.bench_compare --quick --device cuda --case resnet --out DIR   # the GPU check
    python -m benchmarks.bench_compare --case resnet --n 10000                        # pytorch-cka's README scale

Cases (same models, same data, same layers for every contender):
  mlp     two MLPs on 64 inputs: A 6 hidden Linear+ReLU of width 256 (12 layers), B 5 of width
          192 (10 layers); 10,000 samples (2,000 with --quick), batches of 256.
  resnet  two ResNet-18s (rcka_kernels.distill.models, ImageNet stem) on 2,000 images of
          3x32x32, batches of 200, every BasicBlock (8 + 8 layers, 4096 to 512 features).
Contenders: rk.compare(estimator="minibatch") (Nguyen et al.: per-batch unbiased HSIC summed
over batches) and pytorch-cka's compute_cka (the same estimator, float32) on every layer;
rk.compare(estimator="exact") (the CKA of the whole data set) on every MLP layer, and on the
ResNet on layer1.0, layer2.1, layer4.1 of each, beside its floor: n (P_A P_B + (sum p_i^2 +
sum q_j^2) / 2) multiply-adds (P: the summed widths) at the rate of one batch's float32
cross product (b, P_A)^T (b, P_B), timed in the same rounds, as are both models' forward
passes alone. Each library is imported before anything is timed.
Values: the minibatch contenders against Nguyen's definition evaluated in float64 on the
same features (U-centred Grams, rcka_kernels.reference), exact against rk.cka of the
concatenated features in float64. Peers: `make bench` installs pytorch-cka; if it is
missing its row records the import error.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn

import rcka_kernels as rk
from benchmarks import _harness
from rcka_kernels import reference

MLP_IN = 64
DESCRIBE = {"mlp": "two MLPs on 64 inputs (6 and 5 hidden Linear+ReLU of width 256 and 192, every Linear and ReLU)",
            "resnet": "two ResNet-18s on 3x32x32 images (every BasicBlock: 4096 to 512 features)"}
RESNET_EXACT = ["layer1.0", "layer2.1", "layer4.1"]
GEMM = "float32 GEMM (b, P_A)^T (b, P_B)"


def _mlp(widths, seed):
    torch.manual_seed(seed)
    dims = [MLP_IN] + widths
    return nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())], nn.Linear(dims[-1], 10))


def _resnet(seed):
    from rcka_kernels.distill.models import ImageNetResNet

    torch.manual_seed(seed)
    return ImageNetResNet([2, 2, 2, 2], 10)


def setup(case: str, n: int, device: str) -> dict:
    """Models (eval mode), loader and layer lists of one case."""
    g = torch.Generator().manual_seed(0)
    if case == "mlp":
        ma, mb, bs = _mlp([256] * 6, 1), _mlp([192] * 5, 2), 256
        la, lb = [str(i) for i in range(12)], [str(i) for i in range(10)]
        x = torch.randn(n, MLP_IN, generator=g)
        exact = (la, lb)
    else:
        ma, mb, bs = _resnet(1), _resnet(2), 200
        la = lb = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
        x = torch.randn(n, 3, 32, 32, generator=g)
        exact = (RESNET_EXACT, RESNET_EXACT)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(n)), batch_size=bs)
    return dict(a=ma.to(device).eval(), b=mb.to(device).eval(), loader=loader, la=la, lb=lb, exact=exact, bs=bs, device=device)


def _features(s: dict, names_a, names_b):
    """Per batch: ({layer: float64 features of model a}, {... of model b}) where the models run, from forward hooks."""
    for (x, _) in s["loader"]:
        out = []
        for m, names in ((s["a"], names_a), (s["b"], names_b)):
            got, mods = {}, dict(m.named_modules())
            hooks = [mods[k].register_forward_hook(lambda _m, _i, o, k=k: got.__setitem__(k, o.flatten(1).double())) for k in names]
            with torch.no_grad():
                m(x.to(s["device"]))
            for h in hooks:
                h.remove()
            out.append(got)
        yield out


def oracle(s: dict) -> dict:
    """Nguyen's minibatch CKA of every layer pair and the exact CKA of the exact layers, in float64."""
    f64 = dict(dtype=torch.float64, device=s["device"])
    hxy, hxx, hyy = torch.zeros(len(s["la"]), len(s["lb"]), **f64), torch.zeros(len(s["la"]), **f64), torch.zeros(len(s["lb"]), **f64)
    ea, eb = s["exact"]
    cat_a, cat_b = {k: [] for k in ea}, {k: [] for k in eb}
    for fa, fb in _features(s, s["la"], s["lb"]):
        b = next(iter(fa.values())).shape[0]
        ka = torch.stack([reference.centered_gram(fa[k], "linear", None, True).flatten() for k in s["la"]])
        kb = torch.stack([reference.centered_gram(fb[k], "linear", None, True).flatten() for k in s["lb"]])
        hxy += ka @ kb.T / (b * (b - 3))
        hxx += ka.square().sum(1) / (b * (b - 3))
        hyy += kb.square().sum(1) / (b * (b - 3))
        for k in ea:
            cat_a[k].append(fa[k])
        for k in eb:
            cat_b[k].append(fb[k])
    xa = [torch.cat(cat_a[k]) - torch.cat(cat_a[k]).mean(0) for k in ea]  # centred in float64, then the feature-space
    xb = [torch.cat(cat_b[k]) - torch.cat(cat_b[k]).mean(0) for k in eb]  # form |Xc^T Yc|^2 / (|Xc^T Xc| |Yc^T Yc|)
    num = torch.tensor([[float((u.T @ v).square().sum()) for v in xb] for u in xa], dtype=torch.float64)
    na, nb = (torch.tensor([float((u.T @ u).square().sum().sqrt()) for u in xs], dtype=torch.float64) for xs in (xa, xb))
    return {"minibatch": (hxy / torch.sqrt(hxx[:, None] * hyy[None])).cpu(), "exact": num / (na[:, None] * nb[None])}


def _pytorch_cka(s: dict) -> Callable:
    from cka import compute_cka

    def call():
        return compute_cka(s["a"], s["b"], s["loader"], layers=s["la"], model2_layers=s["lb"], device=s["device"], progress=False)[0]
    return call


def contenders(s: dict, values: dict) -> Dict[str, Callable]:
    """Every contender of a case; each call leaves its CKA matrix in ``values``."""
    def keep(name, fn):
        def call():
            values[name] = fn().double().cpu()
            return values[name]
        return call

    def compare(est, la, lb):
        return lambda: rk.compare(s["a"], s["b"], s["loader"], la, lb, estimator=est, progress=False).values

    calls = {"rcka minibatch": keep("rcka minibatch", compare("minibatch", s["la"], s["lb"])),
             "rcka exact": keep("rcka exact", compare("exact", *s["exact"]))}
    try:
        calls["pytorch-cka 1.1.3"] = keep("pytorch-cka 1.1.3", _pytorch_cka(s))
    except ImportError as e:
        values["pytorch-cka 1.1.3 error"] = f"{type(e).__name__}: {e}"

    def forward():
        with torch.no_grad():
            for x, _ in s["loader"]:
                s["a"](x.to(s["device"]))
                s["b"](x.to(s["device"]))
    calls["forward passes only"] = forward
    pa, pb = (sum(w) for w in widths(s, *s["exact"]))
    xa, xb = torch.randn(s["bs"], pa, device=s["device"]), torch.randn(s["bs"], pb, device=s["device"])
    out = torch.empty(pa, pb, device=s["device"])  # the product's rate, not the page faults of a new output
    calls[GEMM] = lambda: torch.mm(xa.T, xb, out=out)
    return calls


def widths(s: dict, names_a: List[str], names_b: List[str]):
    """The flattened output widths of the named layers of each model."""
    x = next(iter(s["loader"]))[0][:4]
    fa, fb = next(_features(dict(s, loader=[(x, None)]), names_a, names_b))
    return [fa[k].shape[1] for k in names_a], [fb[k].shape[1] for k in names_b]


def run_cases(sizes: Dict[str, int], device: str, reps: int) -> List[dict]:
    """Every case's contenders timed in one interleaved() call (no timing may follow its memory
    pass), each record with the case's sizes, its values against the definitions and the floor."""
    setups = {case: setup(case, n, device) for case, n in sizes.items()}
    values: Dict[str, dict] = {case: {} for case in sizes}
    want = {case: oracle(s) for case, s in setups.items()}
    recs = _harness.interleaved([(case, lambda c=case: contenders(setups[c], values[c])) for case in sizes], device,
                                budget_s=0.0, min_reps=reps)
    for case in sizes:
        if "pytorch-cka 1.1.3 error" in values[case]:
            err = values[case]["pytorch-cka 1.1.3 error"]
            recs.append({"case": case, "contender": "pytorch-cka 1.1.3", "status": "error", "error": err})
    exact_widths = {case: widths(s, *s["exact"]) for case, s in setups.items()}  # one forward pass per case
    for r in recs:
        case, s, got = r["case"], setups[r["case"]], values[r["case"]]
        wa, wb = exact_widths[case]
        r.update(n=sizes[case], batch_size=s["bs"], layers=[len(s["la"]), len(s["lb"])])
        if r["contender"] in got:
            exact = r["contender"] == "rcka exact"
            r["max_abs_vs_definition"] = float((got[r["contender"]] - want[case]["exact" if exact else "minibatch"]).abs().max())
        if r["contender"] == "rcka exact":
            r.update(layers=[len(wa), len(wb)], layer_names=list(s["exact"]),
                     floor_madds=sizes[case] * (sum(wa) * sum(wb) + (sum(w * w for w in wa) + sum(w * w for w in wb)) / 2))
        if r["contender"] == GEMM:
            r["madds"] = s["bs"] * sum(wa) * sum(wb)
    return recs


def main(argv=None):
    ap = _harness.parser(__doc__)
    ap.add_argument("--case", default="mlp,resnet", help="comma list of cases: mlp, resnet")
    ap.add_argument("--n", type=int, help="samples (default: mlp 10,000 (quick 2,000); resnet 2,000)")
    args = ap.parse_args(argv)
    reps = 2 if args.quick else 5
    cases = args.case.split(",")
    if set(cases) - set(DESCRIBE):
        ap.error(f"--case: unknown {sorted(set(cases) - set(DESCRIBE))}; choose from {', '.join(DESCRIBE)}")
    sizes = {c: args.n or (2000 if c == "resnet" or args.quick else 10_000) for c in cases}
    res = _harness.Results("compare", args, {"cases": sizes, "min_reps": reps, "describe": {c: DESCRIBE[c] for c in cases}})
    res.add(run_cases(sizes, args.device, reps))
    res.write()
    return res


if __name__ == "__main__":
    main()
