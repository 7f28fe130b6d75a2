"""Benchmark scripts that print and save figures, run from the repository root as
``python -m benchmarks.<script> ...``; what they share is in `benchmarks.common`."""
