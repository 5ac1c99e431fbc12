"""Benchmarks, run together by `make bench` (python -m bench.run) or one by one."""
