"""Connecting to Ray: a local Ray started for the command, or an existing cluster."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lensmill.config import ActorPool, Config


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
def ray_connection(cfg: Config, include_dashboard: bool = True) -> Iterator[None]:
    """``connect`` for the length of a command; shuts down only what it started or joined."""
    import ray

    started = connect(cfg, include_dashboard=include_dashboard)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def actor_pool_options(pool: ActorPool, n_tasks: int | None = None) -> dict[str, Any]:
    """``map_batches`` keywords for a Ray Data actor pool that grows with the cluster: it starts
    ``min_actors`` and adds actors while inputs queue (pending actors make the autoscaler launch
    nodes), up to ``max_actors`` and never more than ``n_tasks`` (when known)."""
    from ray.data import ActorPoolStrategy

    cap = pool.max_actors if n_tasks is None else min(pool.max_actors or n_tasks, n_tasks)
    return {
        "compute": ActorPoolStrategy(min_size=min(pool.min_actors, cap or pool.min_actors), max_size=cap),
        "num_cpus": pool.cpus_per_actor,
    }
