"""The training loop: the teacher, then one student per method and seed (CE, KD, CE + RCKA, CE + RCKA + KD).

``run(cfg)`` is what ``python -m rcka_kernels.distill`` calls. Per epoch it records losses,
accuracies, the learning rate the epoch trained at, throughput (images/s) and peak memory to
``<out>/<run>/metrics.{json,csv}`` and writes a checkpoint (``last.pt``, and ``best.pt`` when
the test accuracy is the best so far) holding the model, the optimizer, the schedule, the
metrics so far and every random state the rest of the run depends on, so ``resume`` continues
from the last complete epoch and ends where an uninterrupted run ends. The finished models are
``<out>/teacher/teacher.pt`` and ``<out>/<method>/student.pt`` (``{"model": state_dict, ...}``;
further seeds in ``<out>/<method>/seed<k>/``), which ``python -m rcka_kernels.compare --run`` reads.
With ``parity`` every step also evaluates the RCKA loss and its gradient with the float64
reference backend and the fast backend on the same batch and records the largest relative
error (and each backend's time). Under ``torchrun`` with ``distributed`` the student is wrapped
in DDP and the RCKA loss sees the global batch (logits are all-gathered with gradient).
"""

from __future__ import annotations

import csv
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import distributed as rkd
from .._dispatch import resolve as resolve_backend
from ..losses import RCKALoss
from . import checkpoint as C
from . import data as D
from . import models as M
from .checkpoint import load_checkpoint
from .config import (
    DATASET_DEFAULTS,
    DEFAULT_PAIRS,
    METHODS,
    Config,
    DistillError,
    differences,
    dry_run_report,
    fingerprint,
    lr_at,
    milestones,
    resolve,
    trains_teacher,
)

__all__ = ["Config", "DistillError", "run", "kd_loss", "load_checkpoint", "DATASET_DEFAULTS", "DEFAULT_PAIRS", "METHODS"]

KD_METHODS, RCKA_METHODS = ("kd", "rcka+kd"), ("rcka", "rcka+kd")


# ----------------------------------------------------------------------------- losses


def kd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.: T^2 KL(softmax(t/T) || softmax(s/T)), batch mean."""
    kl = TF.kl_div(TF.log_softmax(s / temperature, -1), TF.log_softmax(t / temperature, -1), reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def _rcka(cfg: Config, backend: str) -> RCKALoss:
    return RCKALoss(intra_weight=cfg.intra_weight, inter_weight=cfg.inter_weight, temperature=cfg.rcka_temperature,
                    official=cfg.official, l2_norm=cfg.l2_norm, backend=backend)


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



def _loader(ds, cfg: Config, train: bool, generator: Optional[torch.Generator] = None):
    """``generator`` draws the training data's order (and the workers' seeds): its state is checkpointed."""
    sampler = DistributedSampler(ds, shuffle=train, seed=cfg.seed) if cfg.distributed else None
    g = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=cfg.workers, drop_last=train, generator=g)


def _aux_loss(method: str, s, t, cfg: Config, rcka: Optional[RCKALoss]):
    """The distillation terms of ``method`` (everything but the cross-entropy), and the gathered
    logits the RCKA term saw (for --parity)."""
    aux = torch.zeros((), device=s.device)
    gathered = None
    if method in RCKA_METHODS:
        gathered = (rkd.all_gather(s), rkd.all_gather(t)) if cfg.distributed else (s, t)
        aux = aux + rcka(*gathered)
    if method in KD_METHODS:
        aux = aux + cfg.kd_weight * kd_loss(s, t, cfg.kd_temperature)
    return aux, gathered


def train_epoch(net: nn.Module, teacher: Optional[nn.Module], method: str, loader, opt, cfg: Config, device,
                rcka: Optional[RCKALoss], fast: str, bar) -> Dict[str, float]:
    """One pass over the training data; returns the epoch's training statistics."""
    net.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sums = torch.zeros(5, dtype=torch.float64)  # loss, ce, aux, correct, count
    parity = {"rel_err": 0.0}
    peak_seen = 0.0  # CUDA peak before parity resets the counter
    steps = len(loader) if cfg.max_steps is None else min(cfg.max_steps, len(loader))
    it = iter(loader)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        s = net(x)
        ce = TF.cross_entropy(s, y)
        t = None
        if method != "ce":
            with torch.no_grad():
                t = teacher(x)
        aux, gathered = _aux_loss(method, s, t, cfg, rcka)
        if cfg.parity and gathered is not None:
            p = _parity(cfg, *gathered, fast)
            peak_seen = max(peak_seen, p.pop("_peak_before", 0.0))
            parity["rel_err"] = max(parity["rel_err"], p.pop("rel_err"))
            for k, v in p.items():  # times: mean per step; memory: max
                parity[k] = parity.get(k, 0.0) + v / steps if k.startswith("loss_ms") else max(parity.get(k, 0.0), v)
        loss = cfg.ce_weight * ce + aux
        if not torch.isfinite(loss):
            raise DistillError(f"the loss became {loss.item()}; lower --lr or the loss weights")
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
    if rkd.is_distributed():
        sums_d = sums.to(device)
        dist.all_reduce(sums_d)
        sums = sums_d.cpu()
    n = max(sums[4].item(), 1.0)
    row = {"train_loss": sums[0].item() / n, "train_ce": sums[1].item() / n, "train_aux": sums[2].item() / n,
           "train_acc": 100.0 * sums[3].item() / n, "images_per_s": n / seconds if seconds > 0 else float("nan"),
           "seconds": seconds, "peak_memory_mb": max(peak_seen, _peak_memory_mb(device))}
    if cfg.parity and method in RCKA_METHODS:
        row["parity_max_rel_err"] = parity.pop("rel_err")
        row.update(parity)
    return row


# ----------------------------------------------------------------------------- one run, with checkpoints


@dataclass
class RunSpec:
    """One model's training: the teacher, or the student of one method and seed."""

    role: str          # "teacher" | "student"
    method: str        # the teacher trains with "ce"
    seed: int
    epochs: int
    dir: str
    final: str         # path of the finished model: teacher.pt | student.pt
    tag: str           # names the run in logs and errors
    fingerprint: Dict  # the arguments the run depends on (config.fingerprint + its method and seed)
    meta: Dict


def _seed_everything(seed: int, rank: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed + rank)
    try:
        import numpy as np

        np.random.seed(seed + rank)
    except ImportError:
        pass


def _resume_point(spec: RunSpec, cfg: Config) -> Optional[Dict]:
    """The run's last complete epoch (``last.pt``) when resuming, after checking that it was
    written by a run with the same arguments; None to start at epoch 1."""
    last = os.path.join(spec.dir, "last.pt")
    if not cfg.resume:
        return None
    if _rank() == 0:
        for p in C.leftovers(spec.dir):
            os.remove(p)
    if not os.path.exists(last):
        return None
    try:
        ck = C.load(last, f"{spec.tag} checkpoint")
    except DistillError as e:
        best = os.path.join(spec.dir, "best.pt")
        try:
            epoch = C.load(best, "")["epoch"]
        except DistillError:
            raise e from None
        raise DistillError(f"{e}; {best!r} (epoch {epoch}) is intact: copied over last.pt, --resume continues from it "
                           "to the same result") from None
    C.check_fingerprint(ck, spec.fingerprint, last)
    return ck


def _all_rng(gen: torch.Generator) -> List[Dict]:
    """Every process's random states (one entry per rank), gathered on every rank."""
    st = C.rng_state(gen)
    if not rkd.is_distributed():
        return [st]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, st)
    return states


def _save_epoch(spec: RunSpec, model, opt, history: List[Dict], best: Dict, marks: List[int], cfg: Config,
                gen: torch.Generator) -> None:
    states = _all_rng(gen)
    if _rank() != 0:
        return
    ck = {"format": 1, "fingerprint": spec.fingerprint, "role": spec.role, "method": spec.method, "seed": spec.seed,
          "epoch": history[-1]["epoch"], "epochs": spec.epochs, "model": model.state_dict(), "optimizer": opt.state_dict(),
          "schedule": {"lr": cfg.lr, "milestones": marks, "gamma": 0.1}, "history": history, "best": best, "rng": states}
    # last.pt is written last: it is what --resume continues from, so a kill before it repeats the
    # epoch (and rewrites best.pt and the metrics) rather than leaving them behind last.pt
    if best["epoch"] == ck["epoch"]:
        C.save(ck, os.path.join(spec.dir, "best.pt"))
    write_logs(history, spec.dir, spec.meta, plot=False)
    C.save(ck, os.path.join(spec.dir, "last.pt"))


def _progress(cfg: Config):
    if not cfg.progress or _rank() != 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def train_run(spec: RunSpec, model: nn.Module, teacher: Optional[nn.Module], train_ds, test_ds, cfg: Config,
              device) -> List[Dict]:
    """Train ``model`` for ``spec`` (continuing from its checkpoint with ``cfg.resume``), writing a
    checkpoint and the metrics after every epoch and the finished model at the end; returns the history."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    train_loader, test_loader = _loader(train_ds, cfg, True, gen), _loader(test_ds, cfg, False)
    marks = milestones(cfg, spec.epochs)
    history: List[Dict] = []
    best: Dict = {"epoch": 0, "test_acc": -1.0}
    ck = _resume_point(spec, cfg)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        history, best = list(ck["history"]), dict(ck["best"])
        states = ck["rng"]
        C.set_rng_state(states[_rank()], gen)
    net = model
    if cfg.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fast = resolve_backend(cfg.backend, device)
    if fast == "reference":
        fast = resolve_backend("auto", device)
    rcka = _rcka(cfg, cfg.backend) if spec.method in RCKA_METHODS else None
    if teacher is not None:
        teacher.eval()
    bar_mod = _progress(cfg)
    for epoch in range(len(history) + 1, spec.epochs + 1):
        lr = lr_at(cfg, epoch, marks)
        for g in opt.param_groups:
            g["lr"] = lr
        steps = len(train_loader) if cfg.max_steps is None else min(cfg.max_steps, len(train_loader))
        bar = bar_mod(total=steps, desc=f"{spec.tag} {epoch}/{spec.epochs}", leave=False, file=sys.stderr) if bar_mod else None
        if cfg.distributed:
            train_loader.sampler.set_epoch(epoch)
        try:
            stats = train_epoch(net, teacher, spec.method, train_loader, opt, cfg, device, rcka, fast, bar)
        except DistillError as e:
            raise DistillError(f"{spec.tag}, epoch {epoch}: {e}") from None
        finally:
            if bar:
                bar.close()
        row = {"epoch": epoch, "lr": lr, **stats, **evaluate(model, test_loader, device)}
        history.append(row)
        if row["test_acc"] > best["test_acc"]:
            best = {"epoch": epoch, "test_acc": row["test_acc"]}
        _save_epoch(spec, model, opt, history, best, marks, cfg, gen)
        if _rank() == 0:
            msg = (f"[{spec.tag}] epoch {epoch}/{spec.epochs} lr {lr:.3g} loss {row['train_loss']:.4f} acc {row['train_acc']:.2f} "
                   f"test {row['test_acc']:.2f} {row['images_per_s']:.0f} img/s")
            if "parity_max_rel_err" in row:
                msg += f" parity {row['parity_max_rel_err']:.2e}"
            print(msg, file=sys.stderr, flush=True)
    if _rank() == 0:
        C.save({"model": model.state_dict(), "epoch": spec.epochs, "fingerprint": spec.fingerprint,
                "test_acc": history[-1]["test_acc"] if history else None}, spec.final)
        write_logs(history, spec.dir, spec.meta, cfg.plot and bool(history))
    return history


# ----------------------------------------------------------------------------- logs


def _csv_bytes(rows: List[Dict], keys: List[str]) -> bytes:
    import io

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def write_logs(history: List[Dict], out_dir: str, meta: Dict, plot: bool) -> None:
    """metrics.json and metrics.csv (each replaced whole, never left half-written) and curves.png."""
    C.save_json({"meta": meta, "history": history}, os.path.join(out_dir, "metrics.json"))
    keys = sorted({k for r in history for k in r}, key=lambda k: (k != "epoch", k))
    C.atomic_write(os.path.join(out_dir, "metrics.csv"), lambda f: f.write(_csv_bytes(history, keys)))
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


def _prepare_out(cfg: Config, fp: Dict) -> None:
    """Refuse an --out that holds a run unless resuming it; with --resume, refuse a folder that
    holds no run or a run started with other arguments. (A new run records its arguments in
    run.json once its input is checked.)"""
    runfile, summ = os.path.join(cfg.out, "run.json"), os.path.join(cfg.out, "summary.json")
    saved = C.read_json(runfile, "run file")
    if cfg.resume:
        if saved is None:
            what = ("does not exist" if not os.path.isdir(cfg.out) else "is empty" if not os.listdir(cfg.out)
                    else "holds no run of this harness (no run.json)")
            raise DistillError(f"--resume: --out {cfg.out!r} {what}; there is nothing to resume")
        diff = differences(saved.get("fingerprint") or {}, fp)
        if diff:
            raise DistillError(f"--resume: the run in {cfg.out!r} was started with other arguments ({'; '.join(diff)}); "
                               "resume with its arguments, or choose another --out")
        return
    if saved is not None or os.path.exists(summ):
        state = "a finished run" if os.path.exists(summ) else "an unfinished run"
        raise DistillError(f"--out {cfg.out!r} holds {state}; --resume continues it (a finished run is not retrained), "
                           "or choose another --out (or delete that folder) to start over")


def run(cfg: Config) -> Dict[str, Dict]:
    """Train (or load) the teacher, then a student per method and seed; returns {run: summary}.
    With ``cfg.dry_run`` print the resolved configuration as JSON and return {}."""
    cfg = resolve(cfg)
    if cfg.dry_run:
        print(json.dumps(dry_run_report(cfg), indent=1))
        return {}
    threads = cfg.threads if cfg.threads is not None else (1 if cfg.dataset == "digits" else None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


def _given_teacher(cfg: Config, k: int, device) -> Optional[nn.Module]:
    if not cfg.teacher_ckpt:
        return None
    teacher = M.build(cfg.teacher, k).to(device)
    load_checkpoint(teacher, cfg.teacher_ckpt)
    return teacher.to(device)


def _teacher(cfg: Config, given: Optional[nn.Module], k: int, fp: Dict, meta: Dict, train_ds, test_ds,
             device) -> Tuple[Optional[nn.Module], Dict]:
    """The teacher (given, trained, or resumed) and its summary row; None when only CE students run."""
    if given is not None:
        return given, {"model": cfg.teacher, "checkpoint": cfg.teacher_ckpt, **evaluate(given, _loader(test_ds, cfg, False), device)}
    if not trains_teacher(cfg):
        return None, {}
    _seed_everything(cfg.seed, _rank())
    teacher = M.build(cfg.teacher, k).to(device)
    d = os.path.join(cfg.out, "teacher")
    spec = RunSpec("teacher", "ce", cfg.seed, cfg.teacher_epochs, d, os.path.join(d, "teacher.pt"), f"teacher {cfg.teacher}",
                   {**fp, "role": "teacher", "run_seed": cfg.seed}, {**meta, "method": "teacher", "model": cfg.teacher})
    h = train_run(spec, teacher, None, train_ds, test_ds, cfg, device)
    return teacher, {"model": cfg.teacher, "seeds": [cfg.seed], **h[-1], "best_test_acc": max(r["test_acc"] for r in h)}


def _student_dir(cfg: Config, method: str, seed: int) -> str:
    """The first seed's run is <out>/<method> (where rk.compare --run reads student.pt); further seeds <out>/<method>/seed<k>."""
    d = os.path.join(cfg.out, method)
    return d if seed == cfg.seed else os.path.join(d, f"seed{seed}")


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
    try:
        train_ds, test_ds = D.load(cfg.dataset, cfg.data, cfg.image_size)
    except D.DataError as e:
        raise DistillError(str(e)) from None
    k = train_ds.num_classes
    world = dist.get_world_size() if rkd.is_distributed() else 1
    fp = fingerprint(cfg, num_classes=k, train_size=len(train_ds), test_size=len(test_ds), world_size=world)
    _prepare_out(cfg, fp)
    if rkd.is_distributed():
        dist.barrier()  # every rank has looked at --out before rank 0 writes run.json there
    given = _given_teacher(cfg, k, device)
    if rank == 0 and not cfg.resume:
        C.save_json({"fingerprint": fp, "config": asdict(cfg)}, os.path.join(cfg.out, "run.json"))
    backend_name = resolve_backend(cfg.backend, device)
    meta = {"config": asdict(cfg), "device": str(device), "backend": backend_name, "torch": torch.__version__,
            "num_classes": k, "train_size": len(train_ds), "test_size": len(test_ds), "world_size": world}
    teacher, trow = _teacher(cfg, given, k, fp, meta, train_ds, test_ds, device)
    summary: Dict[str, Dict] = {"teacher": trow} if trow else {}
    if teacher is not None:
        for p in teacher.parameters():
            p.requires_grad_(False)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    curves, rows = {}, {}
    for method in cfg.methods:
        for s in seeds:
            _seed_everything(s + 1, rank)
            student = M.build(cfg.student, k).to(device)
            d = _student_dir(cfg, method, s)
            spec = RunSpec("student", method, s, cfg.epochs, d, os.path.join(d, "student.pt"), f"{method} {cfg.student} seed {s}",
                           {**fp, "role": "student", "method": method, "run_seed": s},
                           {**meta, "method": method, "model": cfg.student, "seed": s})
            h = train_run(spec, student, teacher, train_ds, test_ds, cfg, device)
            curves.setdefault(method, h)
            rows.setdefault(method, []).append({**h[-1], "seed": s, "best_test_acc": max(r["test_acc"] for r in h)})
        summary[method] = {"model": cfg.student, **aggregate(rows[method])}
    if rank == 0:
        write_summary(cfg, meta, summary, curves)
    return summary


# ----------------------------------------------------------------------------- several seeds


SPREAD_KEYS = ("test_acc", "best_test_acc", "train_acc", "test_loss")


def aggregate(rows: List[Dict]) -> Dict:
    """The mean over seeds of every number in the runs' last rows, the sample standard deviation
    (n - 1) of the accuracies and test loss (None for one seed), and each seed's own row."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and k not in ("seed", "epoch") and all(k in r for r in rows)]
    out: Dict = {"seeds": [r["seed"] for r in rows], "epoch": rows[0]["epoch"]}
    out.update({k: statistics.fmean(r[k] for r in rows) for k in keys})
    for k in SPREAD_KEYS:
        if k in keys:
            out[f"{k}_std"] = statistics.stdev(r[k] for r in rows) if len(rows) > 1 else None
    if "parity_max_rel_err" in keys:
        out["parity_max_rel_err"] = max(r["parity_max_rel_err"] for r in rows)
    out["runs"] = rows
    return out


def _pm(row: Dict, key: str) -> str:
    if key not in row:
        return ""
    std = row.get(f"{key}_std")
    return f"{row[key]:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def summary_table(summary: Dict[str, Dict]) -> str:
    """A Markdown table: per run, the test accuracy at the end and the best epoch's, mean ± std over seeds."""
    lines = ["| run | model | seeds | test acc (%) | best-epoch test acc (%) | test acc per seed (%) |", "|---|---|---|---|---|---|"]
    for name, r in summary.items():
        seeds = ", ".join(map(str, r.get("seeds", []))) or "-"
        per = ", ".join(f"{x['test_acc']:.2f}" for x in r.get("runs", []))
        lines.append(f"| {name} | {r['model']} | {seeds} | {_pm(r, 'test_acc')} | {_pm(r, 'best_test_acc')} | {per} |")
    return "\n".join(lines)


def write_summary(cfg: Config, meta: Dict, summary: Dict[str, Dict], curves: Dict[str, List[Dict]]) -> None:
    """summary.json, summary.csv and summary.md (the table), curves.png; the table and a footnote on stdout."""
    C.save_json({"meta": meta, "summary": summary}, os.path.join(cfg.out, "summary.json"))
    keys = ["run", "model", "n_seeds", "seeds", "test_acc_mean", "test_acc_std", "best_test_acc_mean", "best_test_acc_std",
            "test_acc_per_seed"]
    rows = [{"run": n, "model": r["model"], "n_seeds": len(r.get("seeds", [])), "seeds": " ".join(map(str, r.get("seeds", []))),
             "test_acc_mean": r.get("test_acc"), "test_acc_std": r.get("test_acc_std"), "best_test_acc_mean": r.get("best_test_acc"),
             "best_test_acc_std": r.get("best_test_acc_std"),
             "test_acc_per_seed": " ".join(f"{x['test_acc']:.4f}" for x in r.get("runs", []))}
            for n, r in summary.items()]
    C.atomic_write(os.path.join(cfg.out, "summary.csv"), lambda f: f.write(_csv_bytes(rows, keys)))
    table = summary_table(summary)
    note = (f"{cfg.dataset}: teacher {cfg.teacher}, students {cfg.student}, {cfg.epochs} epochs; mean ± sample standard deviation "
            f"over {cfg.seeds} seed(s) of the student's initialisation and data order; backend {meta['backend']}")
    parity = [f"{n} {r['parity_max_rel_err']:.2e}" for n, r in summary.items() if "parity_max_rel_err" in r]
    if parity:
        note += "; parity max rel err: " + ", ".join(parity)
    C.atomic_write(os.path.join(cfg.out, "summary.md"), lambda f: f.write(f"{table}\n\n{note}\n".encode()))
    if cfg.plot and curves:
        plot_curves(curves, os.path.join(cfg.out, "curves.png"))
    print(f"{table}\n\n{note}")
