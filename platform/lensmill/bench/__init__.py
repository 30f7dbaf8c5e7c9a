"""Benchmarks, each measured against a baseline in the same run, on the same machine and config.

- ``bench.simulate``: lenstronomy rendering in a plain single-process loop (the baseline) versus the
  platform's Ray Data shard writer with Parquet writes on every local core;
  ``per_core_efficiency = platform / (cores x baseline)``.
- ``bench.train``: training throughput (``run_train_bench``).

Each entry point takes a ``Config`` and returns one JSON-ready dict: the figures, what exactly was
timed, the machine and the versions, so that a result can be compared with another run's.
"""

from __future__ import annotations

import os
import platform as pyplatform
import sys
from datetime import UTC, datetime
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return pyplatform.processor() or pyplatform.machine()


def machine() -> dict[str, Any]:
    """What a benchmark figure depends on besides the code: CPU, cores, GPU, load."""
    gpu = None
    if "torch" in sys.modules:  # only the training bench imports torch; do not import it here
        torch = sys.modules["torch"]
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "platform": pyplatform.platform(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, str]:
    """Versions of everything between the config and the figure (those that are imported)."""
    from lensmill.shards import software_versions

    out = {**software_versions(), "python": pyplatform.python_version()}
    for name in ("numpy", "torch", "timm"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = module.__version__
    return out


def today() -> str:
    """The run's timestamp, UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")
