"""Benchmarks: `python -m benchmarks.NAME --help` (each prints a table; figures go to docs/PERFORMANCE.md)."""
