"""Simulation throughput: a plain lenstronomy loop versus the platform's Ray Data shard writer.

In one run, on one config:

(a) baseline: ``Simulator(cfg.sim)`` built once, then rows rendered one after another in this process
    (one BLAS/OpenMP thread, no Ray, no I/O); timed is the render loop only.
(b) platform: ``shards.write_shards`` into a temporary storage root on every local core: the Ray Data
    actor pool renders, serialises to Parquet, checksums and writes each shard, then the manifest.
    Ray is started (or joined) and warmed up first (a tiny dataset through the same path, so that
    the driver's Ray Data machinery and the OS file cache are warm); timed is the one
    ``write_shards`` call, which includes starting its actor pool (each actor imports lenstronomy
    and builds its Simulator), since every real run pays that too.

The baseline runs before Ray starts and again after it has stopped, so it is not slowed by Ray's own
processes; ``baseline_images_per_s`` is the two runs' combined rate (total images / total seconds),
so a machine whose speed drifts during the run moves both sides of the ratio alike, and
``baseline_drift`` (after / before - 1) says how far to trust the ratio (as in ``bench train``). The
steady-state
figures (``steady_*``) count shard files as they appear, between the first and the last wave of
shards: the platform's throughput once every actor has started, without the pool's ramp-down.
``per_core_efficiency = platform_images_per_s / (cores x baseline_images_per_s)``.

Wall-clock figures are only as good as the machine is quiet, so the run also accounts for CPU time
(Linux /proc): the baseline's images per CPU-second, and for the platform window the CPU-seconds of
this session (driver + the local Ray it started: GCS, raylet, workers) versus everything else on the
machine (``cpu.other_cores_busy``; ``contended`` when above 0.1 core). ``render_share_of_session_cpu``
(rendering at the baseline's CPU cost / the session's CPU) and ``session_utilisation`` (session CPU /
cores x wall) split the efficiency into overhead and idle time:
``per_core_efficiency ~ render_share x utilisation x baseline wall/CPU ratio``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

from lensmill.bench import machine, today, versions
from lensmill.config import ActorPool, Config, SimConfig, StorageConfig
from lensmill.runtime import connect

log = logging.getLogger(__name__)

# The platform part should keep every core busy for about this long: long enough to amortise the
# actor pool's start-up, short enough for a quick run.
_PLATFORM_SECONDS_PER_CORE = 30.0
_BASELINE_MIN_SECONDS = 4.0


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_cpu_s() -> float | None:
    """CPU-seconds all cores of this machine have been busy since boot (/proc/stat), None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def _proc_table() -> dict[tuple[int, int], tuple[int, float, str]]:
    """(pid, start tick) -> (parent pid, CPU-seconds of the process itself, name) for every process."""
    table: dict[tuple[int, int], tuple[int, float, str]] = {}
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return table
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # The command name may hold spaces and parentheses: split after the last ")".
                name, rest = f.read().split("(", 1)[1].rsplit(")", 1)
            rest = rest.split()
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        # Fields after the name: state ppid ... utime(11) stime(12) ... starttime(19).
        cpu = (int(rest[11]) + int(rest[12])) / _CLK_TCK
        table[(int(pid), int(rest[19]))] = (int(rest[1]), cpu, name)
    return table


def process_kind(name: str) -> str:
    """What a process of the session is, from its name (Ray sets its workers' titles, e.g.
    ``ray::MapWorker(MapBatches(ShardWriter))``, cut to 15 characters by the kernel)."""
    if name.startswith("ray::MapWorker") or name.startswith("ray::_MapWorker"):
        return "shard_writer_actors"
    if name.startswith("ray::"):
        return "other_ray_workers"
    if name in ("raylet", "gcs_server"):
        return name
    if name.startswith("python") or name.startswith("lensmill") or name.startswith("pytest"):
        return "driver_and_ray_python_daemons"
    return "other"


class CpuSampler:
    """CPU time of this process and its descendants (a local Ray's GCS, raylet and workers are
    children of the process that started it) over a window, sampled from /proc every ``interval_s``.

    Sampling, rather than one reading at each end, keeps the CPU time of processes that exit inside
    the window (Ray Data's actors exit as soon as the dataset is written): at most the last interval
    of each is lost. Linux only; elsewhere ``session_cpu_s`` is None.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        import threading

        self.interval_s = interval_s
        self.root = os.getpid()
        self.first: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.names: dict[tuple[int, int], str] = {}
        self.session: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")

    def _sample(self) -> None:
        table = _proc_table()
        initial = not self.last  # processes alive at the start count from there, later ones from 0
        children: dict[int, list[tuple[int, int]]] = {}
        for key, (ppid, cpu, name) in table.items():
            children.setdefault(ppid, []).append(key)
            self.first.setdefault(key, cpu if initial else 0.0)
            self.last[key] = cpu
            self.names[key] = name
        todo = [self.root]
        while todo:
            for key in children.get(todo.pop(), []):
                self.session.add(key)
                todo.append(key[0])
        self.session.update(k for k in table if k[0] == self.root)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self.machine0 = _machine_cpu_s()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.machine1 = _machine_cpu_s()

    @property
    def session_cpu_s(self) -> float | None:
        if not self.last:
            return None
        return sum(self.last[k] - self.first.get(k, 0.0) for k in self.session)

    def session_cpu_by_kind(self) -> dict[str, float]:
        """The session's CPU-seconds by ``process_kind``: where the CPU not spent rendering went."""
        out: dict[str, float] = {}
        for k in self.session:
            kind = process_kind(self.names.get(k, ""))
            out[kind] = out.get(kind, 0.0) + self.last[k] - self.first.get(k, 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    @property
    def machine_cpu_s(self) -> float | None:
        if self.machine0 is None or self.machine1 is None:
            return None
        return self.machine1 - self.machine0


class ShardProgress:
    """Completed train shards over time (local datasets: shard files appear whole, by rename), for the
    steady-state rate once every actor has started and before the pool runs dry at the end."""

    def __init__(self, folder: str, interval_s: float = 0.25) -> None:
        import threading

        self.folder = folder
        self.interval_s = interval_s
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="shard-progress")

    def _count(self) -> int:
        try:
            return sum(1 for e in os.scandir(self.folder) if e.name.startswith("part-"))
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.points.append((time.perf_counter(), self._count()))

    def __enter__(self) -> ShardProgress:
        self.points.append((time.perf_counter(), self._count()))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def steady_rate(self, rows_per_shard: int, shards: int, actors: int) -> tuple[float, float] | None:
        """(images/s, seconds) between the first ``actors`` shards and the last ``actors`` shards."""
        lo, hi = actors, shards - actors
        start = next(((t, c) for t, c in self.points if c >= lo), None)
        end = next(((t, c) for t, c in reversed(self.points) if c <= hi), None)
        if start is None or end is None or end[1] <= start[1] or end[0] <= start[0]:
            return None
        return (end[1] - start[1]) * rows_per_shard / (end[0] - start[0]), end[0] - start[0]


def run_baseline(sim: SimConfig, n_images: int | None = None) -> dict[str, Any]:
    """Render rows of the train split in a plain loop; ``n_images`` None = for a few seconds."""
    from threadpoolctl import threadpool_limits

    from lensmill.simulate import Simulator, label_for, row_rng

    t0 = time.perf_counter()
    simulator = Simulator(sim)
    build_s = time.perf_counter() - t0
    # One thread, as each Ray actor runs (Ray sets OMP_NUM_THREADS=1 in its workers).
    with threadpool_limits(1):
        for i in range(3):  # first calls fill lenstronomy's caches: not part of the steady state
            simulator.render(row_rng(sim.seed, "train", i), label_for(i, sim.positive_fraction))
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while (n_images is None and (time.perf_counter() - t0 < _BASELINE_MIN_SECONDS or n < 50)) or (
            n_images is not None and n < n_images
        ):
            simulator.render(row_rng(sim.seed, "train", n), label_for(n, sim.positive_fraction))
            n += 1
        elapsed = time.perf_counter() - t0
        cpu_s = time.process_time() - c0
    return {
        "images": n,
        "seconds": elapsed,
        "images_per_s": n / elapsed,
        # CPU time, unlike wall time, does not count what other processes took from this core.
        "images_per_cpu_s": n / cpu_s if cpu_s > 0 else None,
        "simulator_build_s": build_s,
    }


def _bench_storage(cfg: Config) -> tuple[StorageConfig, str, bool]:
    """A fresh storage root for the bench dataset: a temporary folder, or a prefix under an S3 root."""
    if cfg.storage.root.startswith("s3://"):
        root = f"{cfg.storage.root}/bench/simulate-{uuid.uuid4().hex[:12]}"
        return cfg.storage.model_copy(update={"root": root}), root, True
    root = tempfile.mkdtemp(prefix="lensmill-bench-")
    return cfg.storage.model_copy(update={"root": root}), root, False


def _remove(root: str, storage: StorageConfig, remote: bool) -> None:
    if not remote:
        shutil.rmtree(root, ignore_errors=True)
        return
    from lensmill.storage import locate

    loc = locate(root, storage)
    try:
        loc.filesystem.delete_dir(loc.path)
    except OSError as exc:
        log.warning("could not remove the bench data at %s: %s", root, exc)


def _bench_config(cfg: Config, storage: StorageConfig, n_images: int, actors: int) -> Config:
    """``cfg`` with its sim section sized to ``n_images`` (train; 2 each in val and test), rendered by
    a pool of ``actors`` from the start: the bench times the writers, not the pool growing (which an
    autoscaling cluster adds on top)."""
    shards = -(-(n_images - 4) // cfg.sim.rows_per_shard) + 2
    pool = ActorPool(min_actors=min(actors, shards), max_actors=min(actors, shards))
    sim = SimConfig.model_validate(
        {**cfg.sim.model_dump(), "n_train": n_images - 4, "n_val": 2, "n_test": 2, "pool": pool}
    )
    return cfg.model_copy(update={"sim": sim, "storage": storage, "dataset_uri": None})


def _cores(actors: int) -> int:
    """Physical cores the actor pool ran on: the actors, capped at this machine's cores when the
    cluster is this one machine (a local Ray may declare more logical CPUs than there are cores)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1:
        return max(1, min(actors, os.cpu_count() or 1))
    return actors


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_accounting(
    window_s: float, machine_cpu_s: float | None, session_cpu_s: float | None
) -> dict[str, Any]:
    """Where the machine's CPU went while the platform part ran: this session (driver + the local
    Ray it started) versus other processes, whose load makes wall-clock figures pessimistic."""
    out: dict[str, Any] = {"window_s": round(window_s, 3)}
    if machine_cpu_s is not None:
        out["machine_cpu_s"] = round(machine_cpu_s, 2)
    if session_cpu_s is not None:
        out["session_cpu_s"] = round(session_cpu_s, 2)
        if machine_cpu_s is not None:
            other = max(0.0, machine_cpu_s - session_cpu_s)
            out["other_cpu_s"] = round(other, 2)
            out["other_cores_busy"] = round(other / window_s, 2)
    return out


def run_simulate_bench(
    cfg: Config, n_images: int | None = None, baseline_images: int | None = None, warmup: bool = True
) -> dict[str, Any]:
    """Baseline loop, then the platform's ``write_shards`` on all cores; one JSON-ready dict."""
    import ray

    from lensmill.shards import dataset_uri_for, shard_specs, write_shards
    from lensmill.storage import join_uri

    sim = cfg.sim
    base = run_baseline(sim, baseline_images)
    log.info(
        "baseline: %d images in %.2f s = %.0f img/s", base["images"], base["seconds"], base["images_per_s"]
    )

    t0 = time.perf_counter()
    # One CPU per core (not ray.num_cpus: more logical CPUs than cores would run more actors than
    # cores); no dashboard, whose processes would take CPU from the timed actors.
    started = connect(cfg, num_cpus=os.cpu_count(), include_dashboard=False)
    ray_start_s = time.perf_counter() - t0
    storage, root, remote = _bench_storage(cfg)
    try:
        ray_cpus = int(ray.cluster_resources().get("CPU", 1))
        actors_hint = min(ray_cpus, os.cpu_count() or 1) if len(ray.nodes()) == 1 else ray_cpus
        if n_images is None:
            # Enough work for about _PLATFORM_SECONDS_PER_CORE per core, in whole waves of shards.
            target = base["images_per_s"] * _PLATFORM_SECONDS_PER_CORE * actors_hint
            wave = sim.rows_per_shard * ray_cpus
            n_images = max(wave, math.ceil(target / wave) * wave)
        n_images = max(n_images, 8)
        warm_s = 0.0
        if warmup:
            t0 = time.perf_counter()
            # Another seed: another dataset id under the same root, never the one timed.
            tiny = _bench_config(cfg, storage, 4 + 2 * ray_cpus, ray_cpus)
            tiny = tiny.model_copy(update={"sim": tiny.sim.model_copy(update={"seed": sim.seed + 1})})
            write_shards(tiny)
            warm_s = time.perf_counter() - t0
        bench_cfg = _bench_config(cfg, storage, n_images, ray_cpus)
        specs = shard_specs(bench_cfg.sim)
        actors = bench_cfg.sim.pool.min_actors
        log.info(
            "platform: %d images in %d shards on %d actors (%d Ray CPUs)",
            n_images,
            len(specs),
            actors,
            ray_cpus,
        )
        train_dir = join_uri(dataset_uri_for(bench_cfg), "train")
        train_shards = sum(sp["split"] == "train" for sp in specs)
        with CpuSampler() as sampler, ShardProgress(train_dir) as progress:
            t0 = time.perf_counter()
            manifest = write_shards(bench_cfg)
            platform_s = time.perf_counter() - t0
        steady = None if remote else progress.steady_rate(sim.rows_per_shard, train_shards, actors)
        total_bytes = sum(f.bytes or 0 for f in manifest.files)
        cores = _cores(actors)
    finally:
        _remove(root, storage, remote)
        if started:
            ray.shutdown()
    after = run_baseline(sim, base["images"])
    baseline_rate = (base["images"] + after["images"]) / (base["seconds"] + after["seconds"])
    baseline_cpu_rate = (
        (base["images"] + after["images"])
        / (base["images"] / base["images_per_cpu_s"] + after["images"] / after["images_per_cpu_s"])
        if base["images_per_cpu_s"] and after["images_per_cpu_s"]
        else None
    )

    platform_rate = n_images / platform_s
    # The session's CPU covers the Ray workers only when this process started that Ray.
    cpu = _cpu_accounting(platform_s, sampler.machine_cpu_s, sampler.session_cpu_s if started else None)
    if cpu.get("session_cpu_s") and baseline_cpu_rate:
        # Share of the platform's CPU time that went into rendering (at the baseline's CPU cost).
        render_cpu_s = n_images / baseline_cpu_rate
        cpu["render_share_of_session_cpu"] = round(render_cpu_s / cpu["session_cpu_s"], 3)
        cpu["session_utilisation"] = round(cpu["session_cpu_s"] / (cores * platform_s), 3)
        by_kind = sampler.session_cpu_by_kind()
        cpu["session_cpu_s_by_process"] = by_kind
        # The writers' CPU beyond rendering: start-up (imports, numba), Parquet, sha256, writes.
        cpu["shard_writer_overhead_cpu_s"] = round(by_kind.get("shard_writer_actors", 0.0) - render_cpu_s, 2)
    return {
        "bench": "simulate",
        "baseline_images_per_s": round(baseline_rate, 1),
        "baseline_before_images_per_s": round(base["images_per_s"], 1),
        "baseline_after_images_per_s": round(after["images_per_s"], 1),
        "baseline_drift": round(after["images_per_s"] / base["images_per_s"] - 1.0, 3),
        "platform_images_per_s": round(platform_rate, 1),
        "cores": cores,
        "per_core_efficiency": round(platform_rate / (cores * baseline_rate), 3),
        # The same ratio while every actor is busy: without the pool's start-up and its ramp-down.
        "steady_images_per_s": round(steady[0], 1) if steady else None,
        "steady_per_core_efficiency": round(steady[0] / (cores * baseline_rate), 3) if steady else None,
        "steady_window_s": round(steady[1], 2) if steady else None,
        "image_shape": [len(sim.bands), sim.image_size_px, sim.image_size_px],
        "image_size_px": sim.image_size_px,
        "supersampling": sim.supersampling,
        "n_images": n_images,
        "baseline_images": base["images"],
        "rows_per_shard": sim.rows_per_shard,
        "shards": len(specs),
        "actors": actors,
        "ray_cpus": ray_cpus,
        "baseline_s": round(base["seconds"], 3),
        "platform_s": round(platform_s, 3),
        "simulator_build_s": round(base["simulator_build_s"], 3),
        "ray_start_s": round(ray_start_s, 2) if started else None,
        "warmup_s": round(warm_s, 2),
        "parquet_mb": round(total_bytes / 2**20, 1),
        "baseline_images_per_cpu_s": round(baseline_cpu_rate, 1) if baseline_cpu_rate else None,
        "cpu": cpu,
        # More than a tenth of a core busy elsewhere: wall-clock figures understate the platform.
        "contended": None if "other_cores_busy" not in cpu else cpu["other_cores_busy"] > 0.1,
        "load_average": _loadavg(),
        "timed": (
            "baseline: the render loop of one Simulator in this process, one thread, before Ray starts "
            "and again after it stopped (combined rate); "
            "platform: one write_shards call (actor pool start-up, render, Parquet, sha256, write, "
            "manifest) from a warm Ray; steady: shards completed per second (by file) between the "
            "first and the last wave of shards, i.e. with every actor started and busy"
        ),
        "date": today(),
        "machine": machine(),
        "versions": versions(),
    }
