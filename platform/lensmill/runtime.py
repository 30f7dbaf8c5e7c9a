"""Connecting to Ray: a local Ray started for the command, or an existing cluster."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from lensmill.config import Config


def connect(cfg: Config, num_cpus: int | None = None, include_dashboard: bool = True) -> bool:
    """Join ``ray.address`` (or $RAY_ADDRESS, as set for ``ray job submit``), or start a local Ray
    with ``num_cpus`` (default ``ray.num_cpus``) logical CPUs. Does nothing when Ray is already
    initialised. True when this call started or joined Ray (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner needs: without
    # it, a trial that Tune stops leaks its workers' CPUs and the next trial waits forever.
    local = {
        "num_cpus": num_cpus or cfg.ray.num_cpus,
        "include_dashboard": include_dashboard,
        **({"dashboard_host": "127.0.0.1"} if include_dashboard else {}),
    }
    ray.init(**({"address": address} if address else local), logging_level="WARNING", log_to_driver=True)
    return True


@contextmanager
def ray_connection(cfg: Config) -> Iterator[None]:
    """``connect`` for the length of a command; shuts down only what it started or joined."""
    import ray

    started = connect(cfg)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
