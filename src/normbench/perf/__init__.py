"""The benchmarks behind bench/perf.py, one module per section."""
