"""Knowledge-distillation harness: ``python -m rcka_kernels.distill`` (or ``rcka-distill``).

Teacher -> student with CE + RCKA (and CE + RCKA + KD), against the KD (Hinton)
and CE-only baselines, on CIFAR-100 or ImageNet from a local path, or on
scikit-learn's digits when no data path is given; the published recipes as
presets (``--recipe``), several seeds with their mean and spread (``--seeds``),
crash-safe per-epoch checkpoints and ``--resume``. See
``python -m rcka_kernels.distill --help`` and docs/losses.md.
"""

from .train import Config, DistillError, run

__all__ = ["Config", "DistillError", "run", "main"]


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
