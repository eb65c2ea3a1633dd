"""Op families: the backend contract, the custom ops over it, and each backend's kernels."""
