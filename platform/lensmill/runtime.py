"""Connecting to Ray: a local Ray started for the command, or an existing cluster."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from lensmill.config import Config


@contextmanager
def ray_connection(cfg: Config) -> Iterator[None]:
    """Use Ray if already initialised; else join ``ray.address`` (or $RAY_ADDRESS, as set for
    ``ray job submit``), or start a local Ray with ``ray.num_cpus`` logical CPUs. Shuts down only
    what it started."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner needs: without
    # it, a trial that Tune stops leaks its workers' CPUs and the next trial waits forever.
    local = {"num_cpus": cfg.ray.num_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    kwargs = {"address": address} if address else local
    ray.init(**kwargs, logging_level="WARNING", log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()
