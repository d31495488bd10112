"""Benchmarks: ratios measured in one run on the same machine, medians of repeats (never timed tests)."""
