"""Layer-by-layer comparison of two networks (``rk.compare``) and its command line
(``python -m rcka_kernels.compare``, ``rcka-compare``): ``hooks`` hand each layer's output
over as the forward pass produces it, ``stats`` holds the two accumulators (exact,
minibatch), ``core`` orchestrates."""

from .core import DEFAULT_MEMORY_BUDGET, CompareResult, PeerFailed, compare
from .hooks import INPUT_KEYS, default_layers

__all__ = ["compare", "CompareResult", "PeerFailed", "default_layers", "INPUT_KEYS", "DEFAULT_MEMORY_BUDGET"]
