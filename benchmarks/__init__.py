"""Benchmarks run from the repository root: ``python -m benchmarks.peers``, ``python -m benchmarks.render_readme``."""
