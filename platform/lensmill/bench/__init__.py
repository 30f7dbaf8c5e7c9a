"""Benchmarks, each measured against a baseline in the same run, on the same machine and config.

- ``bench.simulate``: lenstronomy rendering in a plain single-process loop (the baseline) versus the
  platform's Ray Data shard writer with Parquet writes on every local core;
  ``per_core_efficiency = platform / (cores x baseline)``.
- ``bench.train``: training throughput (``run_train_bench``).

Each entry point takes a ``Config`` and returns one JSON-ready dict: the figures, what exactly was
timed, the machine and the versions, so that a result can be compared with another run's.
"""
