"""Autotuning, the autotune cache, timing, perf results and the ``opforge`` command line."""
