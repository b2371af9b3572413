"""Benchmarks: each script prints its figures; docs/benchmarks.md records them."""
