"""effjax benchmarks: `python -m benchmarks <suite> [args]` (see benchmarks/__main__.py)."""
