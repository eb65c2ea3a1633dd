"""Layer-by-layer comparison of two networks (``rk.compare``) and its command line
(``python -m rcka_kernels.compare``, ``rcka-compare``); see ``core`` for the
estimators and ``stats`` for the streamed statistics."""

from .core import DEFAULT_MEMORY_BUDGET, INPUT_KEYS, CompareResult, compare, default_layers

__all__ = ["compare", "CompareResult", "default_layers", "INPUT_KEYS", "DEFAULT_MEMORY_BUDGET"]
