"""Side-by-side benchmarks: ``python -m benchmarks.NAME [--quick]`` (see BENCH.md)."""
