"""The training loop: teacher training, and student training with CE, KD or CE + RCKA.

``run(cfg)`` is what ``python -m rcka_kernels.distill`` calls. Per epoch it
records losses, accuracies, throughput (images/s) and peak memory to
``<out>/<method>/metrics.{json,csv}`` and draws ``curves.png`` at the end.
With ``parity`` every step also evaluates the distillation loss and its
gradient with the float64 reference backend and the fast backend on the same
batch and records the largest relative error (and each backend's time).
Under ``torchrun`` with ``distributed`` the student is wrapped in DDP and the
RCKA loss sees the global batch (logits are all-gathered with gradient).
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import distributed as rkd
from .._dispatch import resolve
from ..losses import RCKALoss
from . import data as D
from . import models as M

__all__ = ["Config", "DistillError", "run", "kd_loss", "load_checkpoint"]

DEFAULT_PAIRS = {"digits": ("mlp_teacher", "mlp_student"), "cifar100": ("resnet56", "resnet20"), "imagenet": ("resnet34", "resnet18")}
METHODS = ("ce", "kd", "rcka")


class DistillError(Exception):
    """Bad input to the harness; the CLI prints the message as one line."""


@dataclass
class Config:
    dataset: Optional[str] = None          # digits | cifar100 | imagenet (None: digits, or detected from data)
    data: Optional[str] = None
    teacher: Optional[str] = None
    student: Optional[str] = None
    teacher_ckpt: Optional[str] = None
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    epochs: Optional[int] = None
    teacher_epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 4.0
    intra_weight: float = 15.0
    inter_weight: Optional[float] = None
    rcka_temperature: Optional[float] = None
    official: bool = False
    l2_norm: bool = False
    backend: str = "auto"
    parity: bool = False
    out: str = "runs/distill"
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    image_size: int = 224
    max_steps: Optional[int] = None        # per epoch (smoke runs)
    distributed: bool = False
    progress: bool = True
    plot: bool = True
    threads: Optional[int] = None          # torch CPU threads (None: 1 for digits, else torch's default)


DATASET_DEFAULTS = {
    # epochs, teacher_epochs, batch size, lr
    "digits": (15, 20, 64, 0.05),
    "cifar100": (240, 240, 64, 0.05),
    "imagenet": (100, 100, 256, 0.1),
}


# ----------------------------------------------------------------------------- losses


def kd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.: T^2 KL(softmax(t/T) || softmax(s/T)), batch mean."""
    kl = TF.kl_div(TF.log_softmax(s / temperature, -1), TF.log_softmax(t / temperature, -1), reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def _rcka(cfg: Config, backend: str) -> RCKALoss:
    return RCKALoss(intra_weight=cfg.intra_weight, inter_weight=cfg.inter_weight, temperature=cfg.rcka_temperature,
                    official=cfg.official, l2_norm=cfg.l2_norm, backend=backend)


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoint(model: nn.Module, path: str, role: str = "teacher") -> None:
    """Load a state dict saved raw or under 'model' / 'state_dict' / 'net' (a 'module.' prefix is dropped).
    ``role`` names the model in error messages ("teacher checkpoint ..."; rk.compare loads students too)."""
    if not os.path.isfile(path):
        raise DistillError(f"{role} checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DistillError(f"cannot read {role} checkpoint {path!r}: {type(e).__name__}: {first}") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DistillError(f"{role} checkpoint {path!r} does not hold a state dict")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}
    own = model.state_dict()
    fc = next((k for k in ("fc.weight",) if k in own and k in sd), None)
    if fc and sd[fc].shape[0] != own[fc].shape[0]:
        raise DistillError(f"{role} checkpoint {path!r} has {sd[fc].shape[0]} classes but the data set has {own[fc].shape[0]}")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        what = "; ".join(f"{n}: {', '.join(v[:3])}{'...' if len(v) > 3 else ''}" for n, v in
                         (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if v)
        raise DistillError(f"{role} checkpoint {path!r} does not fit the {type(model).__name__} {role} ({what})")
    model.load_state_dict(sd)


# ----------------------------------------------------------------------------- loop helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:
        return float("nan")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loader(ds, cfg: Config, train: bool):
    sampler = DistributedSampler(ds, shuffle=train, seed=cfg.seed) if cfg.distributed else None
    g = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=cfg.workers, drop_last=train, generator=g)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> Dict[str, float]:
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        tot += torch.stack([TF.cross_entropy(out, y, reduction="sum").double(), (out.argmax(-1) == y).sum().double(),
                            torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    if rkd.is_distributed():
        dist.all_reduce(tot)
    n = max(tot[2].item(), 1.0)
    return {"test_loss": tot[0].item() / n, "test_acc": 100.0 * tot[1].item() / n}


def _parity(cfg: Config, s_logits: torch.Tensor, t_logits: torch.Tensor, fast: str) -> Dict[str, float]:
    """Distillation loss and d loss / d student logits with the reference and the fast backend:
    the largest relative error, and each backend's time (ms) and, on CUDA, extra peak memory (MiB)."""
    out = {}
    res = {}
    dev = s_logits.device
    for name in ("reference", fast):
        leaf = s_logits.detach().requires_grad_(True)
        _sync(dev)
        if dev.type == "cuda":
            out["_peak_before"] = max(out.get("_peak_before", 0.0), torch.cuda.max_memory_allocated(dev) / 2 ** 20)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        val = _rcka(cfg, name)(leaf, t_logits.detach())
        (g,) = torch.autograd.grad(val, leaf)
        _sync(dev)
        out[f"loss_ms_{name}"] = 1e3 * (time.perf_counter() - t0)
        if dev.type == "cuda":
            out[f"loss_peak_mb_{name}"] = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
        res[name] = (val.detach().double(), g.double())
    (lr_, gr), (lf, gf) = res["reference"], res[fast]
    rel_l = (lf - lr_).abs() / lr_.abs().clamp_min(1e-30)
    rel_g = (gf - gr).abs().max() / gr.abs().max().clamp_min(1e-30)
    out["rel_err"] = max(rel_l.item(), rel_g.item())
    return out


def train_epochs(model: nn.Module, teacher: Optional[nn.Module], method: str, train_ds, test_ds, cfg: Config,
                 epochs: int, device, tag: str) -> List[Dict[str, float]]:
    """Train ``model`` with ``method`` (ce | kd | rcka) and return the per-epoch history."""
    rank = _rank()
    net = model
    if cfg.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    milestones = [int(epochs * f) for f in (0.625, 0.75, 0.875)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    train_loader, test_loader = _loader(train_ds, cfg, True), _loader(test_ds, cfg, False)
    fast = resolve(cfg.backend, device)
    if fast == "reference":
        fast = resolve("auto", device)
    rcka = _rcka(cfg, cfg.backend) if method == "rcka" else None
    if teacher is not None:
        teacher.eval()
    history = []
    bar_mod = None
    if cfg.progress and rank == 0:
        try:
            from tqdm.auto import tqdm as bar_mod
        except ImportError:
            bar_mod = None
    for epoch in range(1, epochs + 1):
        if cfg.distributed:
            train_loader.sampler.set_epoch(epoch)
        net.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sums = torch.zeros(5, dtype=torch.float64)  # loss, ce, aux, correct, count
        parity = {"rel_err": 0.0}
        peak_seen = 0.0  # CUDA peak before parity resets the counter
        steps = len(train_loader) if cfg.max_steps is None else min(cfg.max_steps, len(train_loader))
        it = iter(train_loader)
        bar = bar_mod(total=steps, desc=f"{tag} {epoch}/{epochs}", leave=False, file=sys.stderr) if bar_mod else None
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            s = net(x)
            ce = TF.cross_entropy(s, y)
            aux = torch.zeros((), device=device)
            if method != "ce":
                with torch.no_grad():
                    t = teacher(x)
                if method == "kd":
                    aux = cfg.kd_weight * kd_loss(s, t, cfg.kd_temperature)
                else:
                    sg, tg = (rkd.all_gather(s), rkd.all_gather(t)) if cfg.distributed else (s, t)
                    aux = rcka(sg, tg)
                    if cfg.parity:
                        p = _parity(cfg, sg, tg, fast)
                        peak_seen = max(peak_seen, p.pop("_peak_before", 0.0))
                        parity["rel_err"] = max(parity["rel_err"], p.pop("rel_err"))
                        for k, v in p.items():  # times: mean per step; memory: max
                            parity[k] = parity.get(k, 0.0) + v / steps if k.startswith("loss_ms") else max(parity.get(k, 0.0), v)
            loss = cfg.ce_weight * ce + aux
            if not torch.isfinite(loss):
                raise DistillError(f"{tag}: the loss became {loss.item()} at epoch {epoch}; lower --lr or the loss weights")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                sums += torch.tensor([loss.item() * len(y), ce.item() * len(y), float(aux) * len(y),
                                      (s.argmax(-1) == y).sum().item(), len(y)], dtype=torch.float64)
            if bar:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.update()
        _sync(device)
        seconds = time.perf_counter() - t0
        if bar:
            bar.close()
        sched.step()
        if rkd.is_distributed():
            sums_d = sums.to(device)
            dist.all_reduce(sums_d)
            sums = sums_d.cpu()
        n = max(sums[4].item(), 1.0)
        row = {"epoch": epoch, "train_loss": sums[0].item() / n, "train_ce": sums[1].item() / n,
               "train_aux": sums[2].item() / n, "train_acc": 100.0 * sums[3].item() / n,
               **evaluate(model, test_loader, device),
               "images_per_s": n / seconds if seconds > 0 else float("nan"),
               "seconds": seconds, "peak_memory_mb": max(peak_seen, _peak_memory_mb(device)), "lr": opt.param_groups[0]["lr"]}
        if cfg.parity and method == "rcka":
            row["parity_max_rel_err"] = parity.pop("rel_err")
            row.update(parity)
        history.append(row)
        if rank == 0:
            msg = (f"[{tag}] epoch {epoch}/{epochs} loss {row['train_loss']:.4f} acc {row['train_acc']:.2f} "
                   f"test {row['test_acc']:.2f} {row['images_per_s']:.0f} img/s")
            if "parity_max_rel_err" in row:
                msg += f" parity {row['parity_max_rel_err']:.2e}"
            print(msg, file=sys.stderr, flush=True)
    return history


# ----------------------------------------------------------------------------- logs


def write_logs(history: List[Dict], out_dir: str, meta: Dict, plot: bool) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"meta": meta, "history": history}, f, indent=1)
    keys = sorted({k for r in history for k in r}, key=lambda k: (k != "epoch", k))
    with open(os.path.join(out_dir, "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    if plot:
        plot_curves({meta.get("method", "run"): history}, os.path.join(out_dir, "curves.png"))


def plot_curves(runs: Dict[str, List[Dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, h) in enumerate(runs.items()):
        ep, c = [r["epoch"] for r in h], f"C{i}"
        a.plot(ep, [r["train_loss"] for r in h], color=c, label=f"{name} train")
        a.plot(ep, [r["test_loss"] for r in h], ":", color=c, label=f"{name} test CE")
        b.plot(ep, [r["test_acc"] for r in h], color=c, label=f"{name} test")
        b.plot(ep, [r["train_acc"] for r in h], "--", color=c, label=f"{name} train")
    a.set(xlabel="epoch", ylabel="loss", title="training loss")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry


def _device(cfg: Config) -> torch.device:
    if cfg.device != "auto":
        try:
            dev = torch.device(cfg.device)
        except RuntimeError as e:
            raise DistillError(f"bad --device {cfg.device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DistillError("--device cuda was asked for but PyTorch sees no CUDA device")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _resolve(cfg: Config) -> Config:
    if cfg.dataset is None:
        cfg.dataset = D.detect(cfg.data) if cfg.data else "digits"
    if cfg.dataset not in DATASET_DEFAULTS:
        raise DistillError(f"unknown --dataset {cfg.dataset!r}; choose digits, cifar100 or imagenet")
    ep, tep, bs, lr = DATASET_DEFAULTS[cfg.dataset]
    cfg.epochs = ep if cfg.epochs is None else cfg.epochs
    cfg.teacher_epochs = tep if cfg.teacher_epochs is None else cfg.teacher_epochs
    cfg.batch_size = bs if cfg.batch_size is None else cfg.batch_size
    cfg.lr = lr if cfg.lr is None else cfg.lr
    t, s = DEFAULT_PAIRS[cfg.dataset]
    cfg.teacher, cfg.student = cfg.teacher or t, cfg.student or s
    for role, name in (("teacher", cfg.teacher), ("student", cfg.student)):
        if name not in M.MODELS:
            raise DistillError(f"unknown --{role} {name!r}; choose from {', '.join(sorted(M.MODELS))}")
        fam = M.MODELS[name][0]
        fits = fam == cfg.dataset or (fam == "cifar" and cfg.dataset == "cifar100") or (fam == "imagenet" and cfg.dataset == "imagenet")
        if not fits:
            raise DistillError(f"--{role} {name} is a {fam} model; it does not fit the {cfg.dataset} data")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise DistillError(f"unknown method(s) {bad or cfg.methods}; choose from {', '.join(METHODS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise DistillError("--epochs and --batch-size must be >= 1 and --lr > 0")
    if cfg.l2_norm and not cfg.official:
        raise DistillError("--l2-norm is the published code's Gram row scaling; it needs --official")
    return cfg


def run(cfg: Config) -> Dict[str, Dict]:
    """Train (or load) the teacher, then a student per method; returns {method: summary}."""
    cfg = _resolve(cfg)
    threads = cfg.threads if cfg.threads is not None else (1 if cfg.dataset == "digits" else None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


def _run(cfg: Config) -> Dict[str, Dict]:
    if cfg.distributed:
        if "RANK" not in os.environ:
            raise DistillError("--distributed runs under torchrun (RANK/WORLD_SIZE are not set)")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = _device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = _rank()
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed)
    try:
        train_ds, test_ds = D.load(cfg.dataset, cfg.data, cfg.image_size)
    except D.DataError as e:
        raise DistillError(str(e)) from None
    k = train_ds.num_classes
    backend_name = resolve(cfg.backend, device)
    meta_base = {"config": asdict(cfg), "device": str(device), "backend": backend_name, "torch": torch.__version__,
                 "num_classes": k, "train_size": len(train_ds), "test_size": len(test_ds),
                 "world_size": dist.get_world_size() if rkd.is_distributed() else 1}
    teacher = M.build(cfg.teacher, k).to(device)
    summary: Dict[str, Dict] = {}
    if cfg.teacher_ckpt:
        load_checkpoint(teacher, cfg.teacher_ckpt)
        teacher.to(device)
        test_loader = _loader(test_ds, cfg, False)
        summary["teacher"] = {"model": cfg.teacher, "checkpoint": cfg.teacher_ckpt, **evaluate(teacher, test_loader, device)}
    elif any(m != "ce" for m in cfg.methods):
        torch.manual_seed(cfg.seed)
        h = train_epochs(teacher, None, "ce", train_ds, test_ds, cfg, cfg.teacher_epochs, device, f"teacher {cfg.teacher}")
        if rank == 0:
            write_logs(h, os.path.join(cfg.out, "teacher"), {**meta_base, "method": "teacher", "model": cfg.teacher}, cfg.plot)
            torch.save({"model": teacher.state_dict()}, os.path.join(cfg.out, "teacher", "teacher.pt"))
        summary["teacher"] = {"model": cfg.teacher, **h[-1]}
    for p in teacher.parameters():
        p.requires_grad_(False)
    runs = {}
    for method in cfg.methods:
        torch.manual_seed(cfg.seed + 1)
        random.seed(cfg.seed + 1 + rank)
        student = M.build(cfg.student, k).to(device)
        h = train_epochs(student, teacher, method, train_ds, test_ds, cfg, cfg.epochs, device, f"{method} {cfg.student}")
        runs[method] = h
        last = h[-1]
        summary[method] = {"model": cfg.student, **last, "best_test_acc": max(r["test_acc"] for r in h)}
        if rank == 0:
            write_logs(h, os.path.join(cfg.out, method), {**meta_base, "method": method, "model": cfg.student}, cfg.plot)
            # the trained student, for `python -m rcka_kernels.compare --run` (layer CKA with its teacher)
            torch.save({"model": student.state_dict()}, os.path.join(cfg.out, method, "student.pt"))
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump({"meta": meta_base, "summary": summary}, f, indent=1)
        if cfg.plot and runs:
            plot_curves(runs, os.path.join(cfg.out, "curves.png"))
        for name, srow in summary.items():
            extra = f" parity max rel err {srow['parity_max_rel_err']:.2e}" if "parity_max_rel_err" in srow else ""
            tput = f" {srow['images_per_s']:.0f} img/s, peak {srow['peak_memory_mb']:.0f} MiB" if "images_per_s" in srow else ""
            print(f"{name:8s} {srow['model']:12s} test acc {srow['test_acc']:6.2f}%{tput} [{backend_name}]{extra}")
    return summary
