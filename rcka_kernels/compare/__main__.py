"""Command line of ``rk.compare`` (``python -m rcka_kernels.compare`` or ``rcka-compare``):
layer-by-layer CKA of two checkpoints of the distillation harness on one of its data sets.

Examples
  # two checkpoints, on the digits embedded by default (test split)
  python -m rcka_kernels.compare --model-a mlp_teacher --ckpt-a runs/demo/teacher/teacher.pt \\
      --model-b mlp_student --ckpt-b runs/demo/rcka/student.pt --out runs/compare
  # CIFAR-100 (cifar-100-python/) or ImageNet folders (train/, val/)
  python -m rcka_kernels.compare --data ~/data/cifar100 --model-a resnet56 --ckpt-a t.pth --model-b resnet20 --ckpt-b s.pth
  # a whole `python -m rcka_kernels.distill` run: its teacher vs each of its students, one figure and one table
  python -m rcka_kernels.compare --run runs/demo
Writes <out>/compare.json (``CompareResult.load`` reads it) and <out>/compare.png; ``--run``
writes <run>/compare/{<method>.json, layer_cka.png, layer_cka.md}. Bad input ends with a
one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import torch

from ..distill import data as D
from ..distill import models as M
from ..distill.train import DATASET_DEFAULTS, DistillError, load_checkpoint
from .core import ESTIMATORS, CompareResult, compare


class CompareError(Exception):
    """Bad input to the command line; printed as one line."""


def _names(s: str) -> List[str]:
    return [m.strip() for m in s.split(",") if m.strip()]


def _sigma(s: str):
    try:
        return float(s)
    except ValueError:
        return s


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rcka-compare", description="Layer-by-layer CKA of two networks over a data set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", help="a distillation run folder (summary.json): its teacher vs each student")
    p.add_argument("--model-a", help=f"architecture of model A ({', '.join(sorted(M.MODELS))})")
    p.add_argument("--ckpt-a", help="state dict of model A (harness, torchvision or CRD style)")
    p.add_argument("--model-b", help="architecture of model B (default: model A's)")
    p.add_argument("--ckpt-b", help="state dict of model B (default: model A itself: one forward pass per batch)")
    p.add_argument("--layers-a", type=_names, help="comma-separated module names (default: the model's blocks)")
    p.add_argument("--layers-b", type=_names)
    p.add_argument("--dataset", choices=sorted(DATASET_DEFAULTS), help="default: detected from --data, or digits without --data")
    p.add_argument("--data", help="CIFAR-100 root (cifar-100-python/) or ImageNet root (train/, val/)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split (never augmented)")
    p.add_argument("--image-size", type=int, default=224, help="ImageNet crop size")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-batches", type=int, help="stop after this many batches")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--kernel", choices=("linear", "rbf"), default="linear")
    p.add_argument("--sigma", type=_sigma, help="RBF bandwidth: a float, median or mean")
    p.add_argument("--estimator", choices=ESTIMATORS, default="minibatch",
                   help="minibatch (default): Nguyen et al.'s, as the peer libraries; exact: the data set's CKA")
    p.add_argument("--debiased", action="store_true", help="unbiased HSIC in the exact estimator")
    p.add_argument("--memory-budget", default="1GiB", help="memory the exact estimator's statistics may take (more is an error)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default: runs/compare, or <run>/compare)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CompareError(f"bad --device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompareError("--device cuda was asked for but PyTorch sees no CUDA device")
    return dev


def _dataset(dataset: Optional[str], path: Optional[str], split: str, image_size: int):
    """(dataset name, torch Dataset) of the split, without augmentation."""
    try:
        name = dataset or (D.detect(path) if path else "digits")
        if name == "digits":
            return name, D.DigitsDataset(split == "train")
        if not path:
            raise CompareError(f"--data PATH is needed for {name}")
        if not os.path.exists(path):
            raise CompareError(f"data path {path!r} does not exist")
        if name == "cifar100":
            return name, D.CifarDataset(path, split == "train", augment=False)
        if split == "train":
            return name, D.ImageFolderDataset(os.path.join(path, "train"), False, image_size)
        return name, D.load("imagenet", path, image_size)[1]
    except D.DataError as e:
        raise CompareError(str(e)) from None


def _model(arch: str, ckpt: Optional[str], num_classes: int, dataset: str, role: str):
    if arch not in M.MODELS:
        raise CompareError(f"unknown --{role} {arch!r}; choose from {', '.join(sorted(M.MODELS))}")
    fam = M.MODELS[arch][0]
    if not (fam == dataset or (fam == "cifar" and dataset == "cifar100")):
        raise CompareError(f"--{role} {arch} is a {fam} model; it does not fit the {dataset} data")
    model = M.build(arch, num_classes)
    if ckpt:
        try:
            load_checkpoint(model, ckpt, role="model A" if role == "model-a" else "model B")
        except DistillError as e:
            raise CompareError(str(e)) from None
    return model


def _loader(ds, args):
    if args.batch_size < 1:
        raise CompareError("--batch-size must be >= 1")
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)


def _compare(ma, mb, loader, args, dev, layers_a=None, layers_b=None) -> CompareResult:
    try:
        return compare(ma, mb, loader, layers_a, layers_b, kernel=args.kernel, sigma=args.sigma, estimator=args.estimator,
                       debiased=args.debiased, device=dev, progress=args.progress, memory_budget=args.memory_budget,
                       max_batches=args.max_batches)
    except D.DataError as e:
        raise CompareError(str(e)) from None


def run_pair(args) -> CompareResult:
    if not args.model_a:
        raise CompareError("--model-a (with --ckpt-a) or --run is needed")
    dev = _device(args.device)
    dataset, ds = _dataset(args.dataset, args.data, args.split, args.image_size)
    k = getattr(ds, "num_classes", None) or len(ds.classes)
    ma = _model(args.model_a, args.ckpt_a, k, dataset, "model-a")
    mb = ma if not (args.model_b or args.ckpt_b) else _model(args.model_b or args.model_a, args.ckpt_b, k, dataset, "model-b")
    res = _compare(ma, mb, _loader(ds, args), args, dev, args.layers_a, args.layers_b)
    res.model_a = f"{args.model_a}" + (f" ({os.path.basename(args.ckpt_a)})" if args.ckpt_a else "")
    if mb is not ma:
        res.model_b = f"{args.model_b or args.model_a}" + (f" ({os.path.basename(args.ckpt_b)})" if args.ckpt_b else "")
    else:
        res.model_b = res.model_a
    res.meta.update({"dataset": dataset, "data": args.data, "split": args.split, "ckpt_a": args.ckpt_a, "ckpt_b": args.ckpt_b})
    out = args.out or os.path.join("runs", "compare")
    os.makedirs(out, exist_ok=True)
    res.save(os.path.join(out, "compare.json"))
    if args.plot:
        res.plot(os.path.join(out, "compare.png"))
    print(res.table())
    print(f"\n{res.title()}\nwrote {os.path.join(out, 'compare.json')}" + (f" and {os.path.join(out, 'compare.png')}" if args.plot else ""))
    return res


def run_distill(args) -> Dict[str, CompareResult]:
    """The teacher of a distillation run against each of its students: one figure, one table."""
    path = os.path.join(args.run, "summary.json")
    try:
        with open(path) as f:
            s = json.load(f)
        cfg, summary = s["meta"]["config"], s["summary"]
    except FileNotFoundError:
        raise CompareError(f"{path!r} does not exist: --run takes the --out folder of python -m rcka_kernels.distill") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CompareError(f"cannot read {path!r}: {type(e).__name__}: {e}") from None
    dev = _device(args.device)
    dataset, ds = _dataset(cfg.get("dataset"), cfg.get("data"), args.split, cfg.get("image_size") or args.image_size)
    k = getattr(ds, "num_classes", None) or len(ds.classes)
    t_ckpt = cfg.get("teacher_ckpt") or os.path.join(args.run, "teacher", "teacher.pt")
    teacher = _model(cfg["teacher"], t_ckpt, k, dataset, "model-a")
    methods = [m for m in cfg.get("methods", []) if os.path.isfile(os.path.join(args.run, m, "student.pt"))]
    if not methods:
        raise CompareError(f"no student checkpoints (<method>/student.pt) under {args.run!r}; runs written before they were "
                           "saved need re-running")
    out = args.out or os.path.join(args.run, "compare")
    os.makedirs(out, exist_ok=True)
    results: Dict[str, CompareResult] = {}
    for m in methods:
        student = _model(cfg["student"], os.path.join(args.run, m, "student.pt"), k, dataset, "model-b")
        res = _compare(teacher, student, _loader(ds, args), args, dev, args.layers_a, args.layers_b)
        res.model_a, res.model_b = f"teacher {cfg['teacher']}", f"{m} student {cfg['student']}"
        res.meta.update({"dataset": dataset, "split": args.split, "method": m, "run": args.run})
        res.save(os.path.join(out, f"{m}.json"))
        results[m] = res
    table = distill_table(results, summary)
    with open(os.path.join(out, "layer_cka.md"), "w") as f:
        f.write(table + "\n")
    if args.plot:
        distill_figure(results, os.path.join(out, "layer_cka.png"))
    print(table)
    png = f", {out}/layer_cka.png" if args.plot else ""
    print(f"\nwrote {out}/layer_cka.md{png} and {', '.join(m + '.json' for m in methods)}")
    return results


def distill_table(results: Dict[str, CompareResult], summary: Dict) -> str:
    """One row per student: its accuracy, the CKA of its penultimate features and of its logits
    with the teacher's (the last two default layers of the harness's models), and the mean over
    student layers of the best-matching teacher layer. With several seeds the compared student
    is the first seed's (``<method>/student.pt``), and so is the accuracy shown."""
    any_res = next(iter(results.values()))
    ta, sb = any_res.layers_a, any_res.layers_b
    head = [f"| student | test acc | CKA features (T {ta[-2]} / S {sb[-2]}) | CKA logits ({ta[-1]} / {sb[-1]}) "
            "| mean best-match CKA per student layer | n | estimator |", "|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        runs = summary.get(m, {}).get("runs")
        acc = runs[0].get("test_acc") if runs else summary.get(m, {}).get("test_acc")
        best = float(r.values.max(0).values.mean())
        head.append(f"| {m} | {acc:.2f}% | {r.values[-2, -2]:.4f} | {r.values[-1, -1]:.4f} | {best:.4f} | {r.n_samples} | {r.estimator} |"
                    if acc is not None else
                    f"| {m} | | {r.values[-2, -2]:.4f} | {r.values[-1, -1]:.4f} | {best:.4f} | {r.n_samples} | {r.estimator} |")
    teacher_acc = summary.get("teacher", {}).get("test_acc")
    if teacher_acc is not None:
        head.append(f"\nteacher test acc {teacher_acc:.2f}%; {any_res.kernel} CKA{' (debiased)' if any_res.debiased else ''} "
                    f"on the {any_res.meta.get('split', 'test')} split")
    return "\n".join(head)


def distill_figure(results: Dict[str, CompareResult], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * len(results) + 1, 4.6))
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for k, (ax, (m, r)) in enumerate(zip(axes, results.items())):
        r.plot(ax=ax, title=f"{m} student (n={r.n_samples}, {r.estimator})", vmin=0.0, vmax=1.0, colorbar=k == len(results) - 1)
        ax.set_xlabel(f"{m} student layers")
        if k:
            ax.set_ylabel("")
    fig.suptitle(f"layer CKA: {next(iter(results.values())).model_a} vs its students", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.run:
            run_distill(args)
        else:
            run_pair(args)
    except (CompareError, ValueError, TypeError) as e:
        print(f"rcka-compare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rcka-compare: interrupted", file=sys.stderr)
        return 130
    return 0


def cli() -> None:
    """The rcka-compare console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
