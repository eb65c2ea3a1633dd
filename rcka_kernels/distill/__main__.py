"""Command line of the distillation harness (``python -m rcka_kernels.distill``).

Examples
  python -m rcka_kernels.distill                                   # digits: teacher, then CE / KD / RCKA students
  python -m rcka_kernels.distill --data ~/data/cifar100 --teacher resnet32x4 --student resnet8x4 \\
      --teacher-ckpt resnet32x4.pth --methods rcka --parity
  python -m rcka_kernels.distill --recipe cifar100 --data ~/data/cifar100 --seeds 3 --out runs/c100
  python -m rcka_kernels.distill --recipe cifar100 --data ~/data/cifar100 --seeds 3 --out runs/c100 --resume  # after a crash
  python -m rcka_kernels.distill --recipe imagenet --dry-run                 # the resolved configuration as JSON
  torchrun --nproc_per_node 2 -m rcka_kernels.distill --distributed --recipe imagenet --data ~/data/imagenet \\
      --teacher-ckpt resnet34.pth
Bad input ends with a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import DATASET_DEFAULTS, DEFAULT_METHODS, DEFAULT_PAIRS, METHODS, RECIPES, Config, DistillError
from .data import DataError
from .train import run


def _methods(s: str):
    return [m.strip() for m in s.split(",") if m.strip()]


def _ints(s: str):
    try:
        return [int(m) for m in s.split(",") if m.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, e.g. 150,180,210; got {s!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rcka-distill", description="Teacher/student distillation with CE + RCKA, KD and CE baselines. "
                                "A flag overrides the --recipe value, which overrides the data set's default.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="the published hyper-parameters: cifar100 = CRD/mdistiller (240 epochs, SGD 0.9, lr 0.05 / 10 at 150,180,210, "
                        "wd 5e-4, batch 64, resnet56 -> resnet20); imagenet = 100 epochs, SGD 0.9, lr 0.1 for batch 256 / 10 at "
                        "30,60,90, wd 1e-4, resnet34 -> resnet18; both RCKA weights 15/15 (see --dry-run)")
    p.add_argument("--dataset", choices=sorted(DATASET_DEFAULTS), help="default: the recipe's, detected from --data, or digits")
    p.add_argument("--data", help="CIFAR-100 root (cifar-100-python/) or ImageNet root (train/, val/)")
    p.add_argument("--teacher", help=f"teacher model (defaults: {DEFAULT_PAIRS})")
    p.add_argument("--student", help="student model")
    p.add_argument("--teacher-ckpt",
                   help="teacher state dict (torchvision / CRD style checkpoints load); without it the teacher is trained first")
    p.add_argument("--methods", type=_methods, default=list(DEFAULT_METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--epochs", type=int, help="student epochs (digits 15, cifar100 240, imagenet 100)")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per process (a recipe's batch is the global one)")
    p.add_argument("--lr", type=float)
    p.add_argument("--milestones", type=_ints,
                   help="lr / 10 after these epochs, within 1..epochs-1 (default: 62.5, 75 and 87.5%% of the run, those >= 1)")
    p.add_argument("--momentum", type=float, help="default 0.9")
    p.add_argument("--weight-decay", type=float, help="default 5e-4")
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--kd-weight", type=float, default=1.0, help="KD term weight (kd and rcka+kd)")
    p.add_argument("--kd-temperature", type=float, help="default 4")
    p.add_argument("--intra-weight", type=float, help="RCKA sample-axis weight (default 15)")
    p.add_argument("--inter-weight", type=float, help="RCKA class-axis weight (off when not given; with --official an on switch)")
    p.add_argument("--rcka-temperature", type=float,
                   help="softened logits: the sample-axis term compares softmax(z/T) (the published code's soften option)")
    p.add_argument("--official", action="store_true", help="the published code's uncentred alignment (see docs/losses.md)")
    p.add_argument("--l2-norm", action="store_true", help="with --official: Gram rows scaled by 1/sqrt(diag) (the published with_l2_norm)")
    p.add_argument("--backend", default="auto", help="auto | reference | torch | triton | cuda")
    p.add_argument("--parity", action="store_true",
                   help="every step: RCKA loss and gradient with the reference and the fast backend; log the largest relative error")
    p.add_argument("--out", default="runs/distill",
                   help="output folder (run.json, summary.{json,csv,md}, per run: metrics, last.pt/best.pt, the model); "
                        "one that holds a run is refused unless --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from each model's last complete epoch; finished models are not retrained")
    p.add_argument("--seeds", type=int, default=1, help="run each method with seeds seed .. seed+N-1; report mean and std")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration as JSON and exit")
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
