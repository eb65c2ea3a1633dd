"""Benchmark scripts (not shipped with the package): run them as `python -m benchmarks.<name>`."""
