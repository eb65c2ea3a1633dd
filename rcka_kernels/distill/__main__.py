"""Command line of the distillation harness (``python -m rcka_kernels.distill``).

Examples
  python -m rcka_kernels.distill                                   # digits: teacher, then CE / KD / RCKA students
  python -m rcka_kernels.distill --data ~/data/cifar100 --teacher resnet32x4 --student resnet8x4 \\
      --teacher-ckpt resnet32x4.pth --methods rcka --parity
  torchrun --nproc_per_node 2 -m rcka_kernels.distill --distributed --data ~/data/imagenet \\
      --teacher-ckpt resnet34.pth
Bad input ends with a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .data import DataError
from .train import DATASET_DEFAULTS, DEFAULT_PAIRS, METHODS, Config, DistillError, run


def _methods(s: str):
    return [m.strip() for m in s.split(",") if m.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rcka-distill", description="Teacher/student distillation with CE + RCKA, KD and CE baselines.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASET_DEFAULTS), help="default: detected from --data, or digits without --data")
    p.add_argument("--data", help="CIFAR-100 root (cifar-100-python/) or ImageNet root (train/, val/)")
    p.add_argument("--teacher", help=f"teacher model (defaults: {DEFAULT_PAIRS})")
    p.add_argument("--student", help="student model")
    p.add_argument("--teacher-ckpt",
                   help="teacher state dict (torchvision / CRD style checkpoints load); without it the teacher is trained first")
    p.add_argument("--methods", type=_methods, default=list(METHODS), help="comma-separated subset of ce,kd,rcka")
    p.add_argument("--epochs", type=int)
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--intra-weight", type=float, default=15.0, help="RCKA sample-axis weight")
    p.add_argument("--inter-weight", type=float, help="RCKA class-axis weight (off when not given)")
    p.add_argument("--rcka-temperature", type=float, help="soften logits with softmax(z/T) in the sample-axis term")
    p.add_argument("--official", action="store_true", help="the published code's uncentred alignment (see docs/losses.md)")
    p.add_argument("--l2-norm", action="store_true", help="with --official: Gram rows scaled by 1/sqrt(diag)")
    p.add_argument("--backend", default="auto", help="auto | reference | torch | triton | cuda")
    p.add_argument("--parity", action="store_true",
                   help="every step: RCKA loss and gradient with the reference and the fast backend; log the largest relative error")
    p.add_argument("--out", default="runs/distill", help="output folder (metrics.json/csv, curves.png per method, summary.json)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=224, help="ImageNet crop size")
    p.add_argument("--max-steps", type=int, help="cap on steps per epoch (quick runs)")
    p.add_argument("--distributed", action="store_true", help="DDP under torchrun (nccl on GPUs, gloo on CPUs)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for digits, else torch's default)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cfg = Config(**vars(args))
    try:
        run(cfg)
        if cfg.distributed:
            import torch.distributed as dist

            # every rank leaves its last collective before any rank tears the group
            # down; without it a rank could exit mid-exchange and gloo aborts it
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
    except (DistillError, DataError) as e:
        print(f"rcka-distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rcka-distill: interrupted", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if cfg.distributed and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _exit(code: int) -> None:
    """Exit; a distributed run skips the interpreter's teardown once its work and
    output are complete, since gloo's threads can abort the process there
    (SIGABRT, "terminate called without an active exception") under torchrun."""
    if os.environ.get("RANK") is not None and os.environ.get("WORLD_SIZE", "1") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def cli() -> None:
    """The rcka-distill console script."""
    _exit(main())


if __name__ == "__main__":
    cli()
