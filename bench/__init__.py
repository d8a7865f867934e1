"""Benchmarks: each script writes JSON; `python3 -m bench.gpu_check` runs them all as one GPU check."""
