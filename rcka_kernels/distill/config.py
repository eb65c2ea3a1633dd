"""The harness's configuration: defaults, the published recipes (presets), the learning-rate
milestones, and the fingerprint that ties a checkpoint to the arguments of the run that wrote it.

A value comes from, in this order: the command line (or ``Config``), the ``--recipe`` preset,
the data set's defaults. ``resolve(cfg)`` fills every ``None`` field that way.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from . import data as D
from . import models as M

__all__ = ["Config", "DistillError", "DATASET_DEFAULTS", "DEFAULT_PAIRS", "METHODS", "RECIPES", "PAPER_PAIRS",
           "resolve", "milestones", "lr_at", "fingerprint"]

DEFAULT_PAIRS = {"digits": ("mlp_teacher", "mlp_student"), "cifar100": ("resnet56", "resnet20"), "imagenet": ("resnet34", "resnet18")}
# ce: cross-entropy only; kd: CE + Hinton KD; rcka: CE + RCKA; rcka+kd: CE + RCKA + KD (the published code's combined_KD)
METHODS = ("ce", "kd", "rcka", "rcka+kd")
DEFAULT_METHODS = ("ce", "kd", "rcka")


class DistillError(Exception):
    """Bad input to the harness; the CLI prints the message as one line."""


@dataclass
class Config:
    dataset: Optional[str] = None          # digits | cifar100 | imagenet (None: the recipe's, digits, or detected from data)
    data: Optional[str] = None
    recipe: Optional[str] = None           # a key of RECIPES: the published hyper-parameters as defaults
    teacher: Optional[str] = None
    student: Optional[str] = None
    teacher_ckpt: Optional[str] = None
    methods: List[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    epochs: Optional[int] = None
    teacher_epochs: Optional[int] = None
    batch_size: Optional[int] = None       # per process
    lr: Optional[float] = None
    milestones: Optional[List[int]] = None  # lr / 10 after each of these epochs (None: 62.5/75/87.5% of the run)
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: Optional[float] = None
    intra_weight: Optional[float] = None
    inter_weight: Optional[float] = None
    rcka_temperature: Optional[float] = None
    official: bool = False
    l2_norm: bool = False
    backend: str = "auto"
    parity: bool = False
    out: str = "runs/distill"
    resume: bool = False
    seeds: int = 1                         # each method runs with seeds seed, seed + 1, ..., seed + seeds - 1
    dry_run: bool = False
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
# what a field is when neither the command line nor a recipe sets it
FIELD_DEFAULTS = {"momentum": 0.9, "weight_decay": 5e-4, "kd_temperature": 4.0, "intra_weight": 15.0}

# The teacher/student pairs of the paper's CIFAR-100 table that the harness's models cover
# (its WRN, VGG, MobileNet and ShuffleNet pairs are not built here); --teacher/--student pick one.
PAPER_PAIRS = {"cifar100": [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4")],
               "imagenet": [("resnet34", "resnet18")]}

# The published recipes. Every value can still be overridden by its flag.
RECIPES: Dict[str, Dict] = {
    # The CIFAR-100 distillation recipe of the CRD code base (Tian et al., ICLR 2020), which
    # mdistiller and the RCKA paper use: 240 epochs, SGD momentum 0.9, lr 0.05 divided by 10
    # at epochs 150, 180 and 210, weight decay 5e-4, batch 64.
    "cifar100": dict(
        dataset="cifar100", epochs=240, teacher_epochs=240, batch_size=64, lr=0.05, milestones=[150, 180, 210],
        momentum=0.9, weight_decay=5e-4,
        teacher="resnet56", student="resnet20",   # the paper's first pair (PAPER_PAIRS lists the others)
        # RCKA: the weights of the published distiller (CenterKernelAlignmentRKD): 15 on the sample-axis
        # term and 15 on the class-axis term (one published version always adds both with 15 / 15, the
        # other adds the class-axis term, weighted by the sample-axis weight, when inter_weight is set).
        # The repository has no per-pair classification configs, so every pair gets these. KD: T = 4.
        intra_weight=15.0, inter_weight=15.0, kd_temperature=4.0,
    ),
    # The ImageNet schedule of the same code bases: 100 epochs, SGD momentum 0.9, lr 0.1 for a
    # batch of 256 divided by 10 at epochs 30, 60 and 90, weight decay 1e-4.
    "imagenet": dict(
        dataset="imagenet", epochs=100, teacher_epochs=100, batch_size=256, lr=0.1, milestones=[30, 60, 90],
        momentum=0.9, weight_decay=1e-4,
        teacher="resnet34", student="resnet18",   # the paper's ImageNet pair (a torchvision ResNet-34 teacher: --teacher-ckpt)
        intra_weight=15.0, inter_weight=15.0, kd_temperature=4.0,
    ),
}
# a recipe's batch is the global batch: under --distributed each process takes batch / world size
MILESTONE_FRACTIONS = (0.625, 0.75, 0.875)  # 150, 180, 210 of 240 epochs


def milestones(cfg: Config, epochs: int) -> List[int]:
    """The epochs after which the learning rate is divided by 10, for a run of ``epochs`` epochs.
    Each lies within 1..epochs-1, so the first epoch always trains at ``cfg.lr``."""
    if cfg.milestones is not None:
        return sorted(set(cfg.milestones))
    return sorted({int(epochs * f) for f in MILESTONE_FRACTIONS} & set(range(1, epochs)))


def lr_at(cfg: Config, epoch: int, marks: List[int]) -> float:
    """The learning rate epoch ``epoch`` (1-based) trains at."""
    return cfg.lr * 0.1 ** bisect_right(marks, epoch - 1)


def _fill(cfg: Config) -> List[str]:
    """Fill the fields the command line left unset from the recipe; returns their names."""
    if cfg.recipe is None:
        return []
    if cfg.recipe not in RECIPES:
        raise DistillError(f"unknown --recipe {cfg.recipe!r}; choose from {', '.join(sorted(RECIPES))}")
    filled = []
    for k, v in RECIPES[cfg.recipe].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, list(v) if isinstance(v, list) else v)
            filled.append(k)
    if "batch_size" in filled and cfg.distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.batch_size % world:
            raise DistillError(f"--recipe {cfg.recipe}: its global batch {cfg.batch_size} does not divide over {world} processes; "
                               "give --batch-size (per process)")
        cfg.batch_size //= world
    return filled


def _check_models(cfg: Config) -> None:
    for role, name in (("teacher", cfg.teacher), ("student", cfg.student)):
        if name not in M.MODELS:
            raise DistillError(f"unknown --{role} {name!r}; choose from {', '.join(sorted(M.MODELS))}")
        fam = M.MODELS[name][0]
        fits = fam == cfg.dataset or (fam == "cifar" and cfg.dataset == "cifar100") or (fam == "imagenet" and cfg.dataset == "imagenet")
        if not fits:
            raise DistillError(f"--{role} {name} is a {fam} model; it does not fit the {cfg.dataset} data")


def _check_milestones(cfg: Config, filled: List[str]) -> None:
    if cfg.milestones is None:
        return
    src = f" (from --recipe {cfg.recipe})" if "milestones" in filled else ""
    runs = [("student", cfg.epochs)] + ([("teacher", cfg.teacher_epochs)] if trains_teacher(cfg) else [])
    for role, e in runs:
        bad = [m for m in cfg.milestones if not 1 <= m <= e - 1]
        if bad:
            raise DistillError(f"--milestones {','.join(map(str, cfg.milestones))}{src} must lie within epochs 1..{e - 1} of the "
                               f"{e}-epoch {role} run ({', '.join(map(str, bad))} do not); give --milestones for this length")


def trains_teacher(cfg: Config) -> bool:
    return not cfg.teacher_ckpt and any(m != "ce" for m in cfg.methods)


def resolve(cfg: Config) -> Config:
    """Fill every unset field (command line > recipe > data set defaults) and check the result."""
    filled = _fill(cfg)
    if cfg.dataset is None:
        try:
            cfg.dataset = D.detect(cfg.data) if cfg.data else "digits"
        except D.DataError as e:
            raise DistillError(str(e)) from None
    if cfg.dataset not in DATASET_DEFAULTS:
        raise DistillError(f"unknown --dataset {cfg.dataset!r}; choose digits, cifar100 or imagenet")
    ep, tep, bs, lr = DATASET_DEFAULTS[cfg.dataset]
    cfg.epochs = ep if cfg.epochs is None else cfg.epochs
    cfg.teacher_epochs = tep if cfg.teacher_epochs is None else cfg.teacher_epochs
    cfg.batch_size = bs if cfg.batch_size is None else cfg.batch_size
    cfg.lr = lr if cfg.lr is None else cfg.lr
    for k, v in FIELD_DEFAULTS.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    t, s = DEFAULT_PAIRS[cfg.dataset]
    cfg.teacher, cfg.student = cfg.teacher or t, cfg.student or s
    _check_models(cfg)
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise DistillError(f"unknown method(s) {bad or cfg.methods}; choose from {', '.join(METHODS)}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise DistillError(f"--methods lists a method twice: {','.join(cfg.methods)}")
    if cfg.epochs < 1 or cfg.teacher_epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise DistillError("--epochs, --teacher-epochs and --batch-size must be >= 1 and --lr > 0")
    if cfg.seeds < 1:
        raise DistillError(f"--seeds must be >= 1, got {cfg.seeds}")
    if cfg.l2_norm and not cfg.official:
        raise DistillError("--l2-norm is the published code's Gram row scaling; it needs --official")
    _check_milestones(cfg, filled)
    return cfg


def dry_run_report(cfg: Config) -> Dict:
    """What --dry-run prints: the resolved configuration and the learning rate of every epoch's schedule."""
    out = {"config": asdict(cfg), "student_milestones": milestones(cfg, cfg.epochs)}
    if trains_teacher(cfg):
        out["teacher_milestones"] = milestones(cfg, cfg.teacher_epochs)
    if cfg.recipe:
        out["recipe_values"] = RECIPES[cfg.recipe]
    return out


# the arguments a run's results depend on: a checkpoint written under other values is not reused
FINGERPRINT_FIELDS = ("dataset", "teacher", "student", "teacher_ckpt", "epochs", "teacher_epochs", "batch_size", "lr",
                      "milestones", "momentum", "weight_decay", "ce_weight", "kd_weight", "kd_temperature", "intra_weight",
                      "inter_weight", "rcka_temperature", "official", "l2_norm", "max_steps", "image_size", "seed")


def fingerprint(cfg: Config, **extra) -> Dict:
    fp = {k: getattr(cfg, k) for k in FINGERPRINT_FIELDS}
    fp.update(extra)
    return fp


def differences(saved: Dict, now: Dict) -> List[str]:
    """'key: <saved> in the checkpoint, <now> asked' for every key whose value differs."""
    keys = [k for k in now if k in saved] + [k for k in saved if k not in now] + [k for k in now if k not in saved]
    return [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in dict.fromkeys(keys) if saved.get(k) != now.get(k)]
