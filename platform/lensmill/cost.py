"""``lensmill cost``: node-hours, GPU-hours, wall time and dollars of a run on a Ray cluster's node types.

Arithmetic on paper: no Ray, no AWS call. The node types and their limits come from the cluster
launcher file (``cluster/aws.yaml``), prices from ``lensmill/data/prices.yaml`` and throughputs from
``lensmill/data/throughputs.yaml``; every throughput carries its source (measured, with the command
and machine, or an estimate), and the estimate names the figures each stage used.

Stages: ``simulate`` (every image of the three splits), ``train`` (every trial of the tune grid,
all epochs: an upper bound, since ASHA stops weak trials early) and ``score`` (the test split, or a
catalog of ``images`` cutouts). Each stage's nodes run on-demand or all on spot (two prices); the
head node is on-demand in both.
"""

from __future__ import annotations

import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lensmill.config import Choice, Config
from lensmill.errors import ConfigError

log = logging.getLogger("lensmill")

STAGES = ("simulate", "train", "score")
DEFAULT_CLUSTER = Path("cluster/aws.yaml")
PRICES_FILE = "data/prices.yaml"
THROUGHPUTS_FILE = "data/throughputs.yaml"
# AWS bills EBS volumes per GB-month of 730 hours.
HOURS_PER_MONTH = 730.0


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- the data files ------------------------------------------------------------------------------


class Figure(_Frozen):
    """One throughput or factor, with where it came from."""

    value: float = Field(gt=0)
    unit: str
    kind: Literal["measured", "estimate"]
    source: str


class SimReference(Figure):
    """A measured simulation rate and the render work of the config it was measured on."""

    bands: int = Field(ge=1)
    image_size_px: int = Field(ge=1)
    supersampling: int = Field(ge=1)


class ModelCost(Figure):
    # Models that resize their input (ViT: 224 px) cost the same whatever the cutout size.
    input_px: int | None = None


class CpuScaling(_Frozen):
    core_speed_factor: Figure


class SimulateFigures(_Frozen):
    references: dict[str, SimReference]


class TrainFigures(_Frozen):
    reference_image_size_px: int = Field(ge=1)
    cpu_per_core: Figure
    gpu: dict[str, Figure]
    streaming_factor_cpu: Figure
    ddp_efficiency: Figure
    validation_cost: Figure


class ScoreFigures(_Frozen):
    cpu_per_core: Figure
    gpu: dict[str, Figure]


class Throughputs(_Frozen):
    """lensmill/data/throughputs.yaml."""

    cpu_scaling: CpuScaling
    simulate: SimulateFigures
    train: TrainFigures
    score: ScoreFigures
    model_cost: dict[str, ModelCost]
    node_startup_minutes: Figure


class InstancePrice(_Frozen):
    vcpus: int = Field(ge=1)
    physical_cores: int = Field(ge=1)
    gpus: int = Field(0, ge=0)
    gpu_model: str | None = None
    on_demand_usd_per_hour: float = Field(gt=0)
    spot_usd_per_hour: float = Field(gt=0)


class PriceTable(_Frozen):
    """lensmill/data/prices.yaml."""

    region: str
    as_of: str
    source: str
    ebs_gp3_usd_per_gb_month: float = Field(ge=0)
    instance_types: dict[str, InstancePrice]

    def price(self, instance_type: str, where: str) -> InstancePrice:
        """The price of ``instance_type``; a missing one names it and what asked for it."""
        try:
            return self.instance_types[instance_type]
        except KeyError:
            raise ConfigError(
                f"instance type {instance_type} ({where}) has no price in lensmill/{PRICES_FILE} "
                f"(priced: {', '.join(sorted(self.instance_types))}): add it, from the AWS price list"
            ) from None


def _read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None


def _validated(model: type[BaseModel], data: Any, where: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_prices(path: Path | None = None) -> PriceTable:
    """The price table shipped in the package, or the one at ``path``."""
    where = str(path) if path else f"lensmill/{PRICES_FILE}"
    text = path.read_text() if path else resources.files("lensmill").joinpath(PRICES_FILE).read_text()
    return _validated(PriceTable, _read_yaml(text, where), where)


def load_throughputs(path: Path | None = None) -> Throughputs:
    """The throughput figures shipped in the package, or the ones at ``path``."""
    where = str(path) if path else f"lensmill/{THROUGHPUTS_FILE}"
    text = path.read_text() if path else resources.files("lensmill").joinpath(THROUGHPUTS_FILE).read_text()
    return _validated(Throughputs, _read_yaml(text, where), where)


# -- the cluster ---------------------------------------------------------------------------------


class NodeType(_Frozen):
    """One entry of the launcher's available_node_types."""

    name: str
    instance_type: str
    cpus: float
    gpus: float
    max_workers: int
    spot: bool
    disk_gb: float


class Pool(_Frozen):
    """The worker node types of one instance type (spot and on-demand alike) a stage can use."""

    instance_type: str
    node_types: tuple[str, ...]
    max_nodes: int
    cpus: float
    gpus: float
    disk_gb: float
    price: InstancePrice


class Cluster(_Frozen):
    path: str
    head: NodeType
    head_price: InstancePrice
    cpu_pool: Pool | None
    gpu_pool: Pool | None
    max_workers: int
    idle_timeout_minutes: float


def _node_type(name: str, spec: dict[str, Any]) -> NodeType:
    node_config = spec.get("node_config", {})
    market = (node_config.get("InstanceMarketOptions") or {}).get("MarketType", "")
    disks = node_config.get("BlockDeviceMappings") or []
    return NodeType(
        name=name,
        instance_type=str(node_config.get("InstanceType", "")),
        cpus=float(spec.get("resources", {}).get("CPU", 0)),
        gpus=float(spec.get("resources", {}).get("GPU", 0)),
        max_workers=int(spec.get("max_workers", 0)),
        spot=str(market).lower() == "spot",
        disk_gb=float(sum(d.get("Ebs", {}).get("VolumeSize", 0) for d in disks)),
    )


def read_cluster(path: Path, prices: PriceTable) -> Cluster:
    """The node types of a Ray cluster launcher file, priced; the CPU and the GPU worker pools."""
    if not path.is_file():
        raise ConfigError(f"cluster file not found: {path} (run from the repository root, or pass --cluster)")
    raw = _read_yaml(path.read_text(), str(path))
    try:
        types = {name: _node_type(name, spec) for name, spec in raw["available_node_types"].items()}
        head = types.pop(raw["head_node_type"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a Ray cluster launcher file ({exc!r} missing)") from None
    max_workers = int(raw.get("max_workers", sum(t.max_workers for t in types.values())))
    by_instance: dict[str, list[NodeType]] = {}
    for t in types.values():
        if not t.instance_type:
            raise ConfigError(f"{path}: node type {t.name} has no node_config.InstanceType")
        by_instance.setdefault(t.instance_type, []).append(t)
    pools = [
        Pool(
            instance_type=it,
            node_types=tuple(t.name for t in ts),
            # The spot and the on-demand type of one instance type can both be up: their sum, capped.
            max_nodes=min(sum(t.max_workers for t in ts), max_workers),
            cpus=ts[0].cpus,
            gpus=ts[0].gpus,
            disk_gb=ts[0].disk_gb,
            price=prices.price(it, f"{path}: node type {ts[0].name}"),
        )
        for it, ts in by_instance.items()
    ]

    def widest(candidates: list[Pool]) -> Pool | None:
        return max(candidates, key=lambda p: p.max_nodes, default=None)

    return Cluster(
        path=str(path),
        head=head,
        head_price=prices.price(head.instance_type, f"{path}: head node type {head.name}"),
        cpu_pool=widest([p for p in pools if p.gpus == 0 and p.max_nodes > 0]),
        gpu_pool=widest([p for p in pools if p.gpus >= 1 and p.max_nodes > 0]),
        max_workers=max_workers,
        idle_timeout_minutes=float(raw.get("idle_timeout_minutes", 5)),
    )


# -- the estimate --------------------------------------------------------------------------------


class StageEstimate(_Frozen):
    """One stage on one pool of worker nodes."""

    stage: str
    images: int
    work: str  # what was counted
    instance_type: str
    node_types: tuple[str, ...]
    nodes: int
    # Nodes x the time they compute; overhead: start-up and idle timeout, per node.
    node_hours: float
    overhead_node_hours: float
    gpu_hours: float
    wall_hours: float  # start-up of the nodes included
    cost_usd: dict[str, float]  # {"on_demand": ..., "spot": ...}, overhead and root volumes included
    figures: dict[str, Figure]
    notes: tuple[str, ...] = ()


class HeadEstimate(_Frozen):
    instance_type: str
    node_hours: float
    cost_usd: dict[str, float]


class CostEstimate(_Frozen):
    config: str
    cluster: str
    prices: dict[str, str]  # region, as_of, source
    stages: tuple[StageEstimate, ...]
    head: HeadEstimate
    total: dict[str, Any]
    assumptions: tuple[str, ...]


def _effective_cores(pool: Pool, ray_cpus: float, tp: Throughputs) -> float:
    """Cores that ``ray_cpus`` logical CPUs (vCPUs) of a node are worth, in measuring-VM cores."""
    cores_per_vcpu = pool.price.physical_cores / pool.price.vcpus
    return min(ray_cpus, pool.cpus) * cores_per_vcpu * tp.cpu_scaling.core_speed_factor.value


def _model_cost(name: str, image_px: int, tp: Throughputs) -> tuple[float, ModelCost]:
    """Work per image of ``name`` relative to ResNet-18 on the reference image size."""
    figure = tp.model_cost.get(name, tp.model_cost["unknown"])
    px = figure.input_px or image_px
    return figure.value * (px / tp.train.reference_image_size_px) ** 2, figure


def _stage(
    stage: str,
    images: int,
    work: str,
    pool: Pool,
    nodes: int,
    busy_node_hours: float,
    compute_wall_hours: float,
    cluster: Cluster,
    prices: PriceTable,
    tp: Throughputs,
    figures: dict[str, Figure],
    notes: list[str],
) -> StageEstimate:
    startup_h = tp.node_startup_minutes.value / 60
    overhead = nodes * (startup_h + cluster.idle_timeout_minutes / 60)
    ebs_usd_per_hour = pool.disk_gb * prices.ebs_gp3_usd_per_gb_month / HOURS_PER_MONTH
    billed = busy_node_hours + overhead
    return StageEstimate(
        stage=stage,
        images=images,
        work=work,
        instance_type=pool.instance_type,
        node_types=pool.node_types,
        nodes=nodes,
        node_hours=busy_node_hours,
        overhead_node_hours=overhead,
        gpu_hours=busy_node_hours * pool.gpus,
        wall_hours=compute_wall_hours + startup_h,
        cost_usd={
            "on_demand": billed * (pool.price.on_demand_usd_per_hour + ebs_usd_per_hour),
            "spot": billed * (pool.price.spot_usd_per_hour + ebs_usd_per_hour),
        },
        figures={**figures, "node_startup_minutes": tp.node_startup_minutes},
        notes=tuple(notes),
    )


def _gpu_figure(table: dict[str, Figure], section: str, what: str, pool: Pool) -> Figure:
    """The throughput of ``pool``'s GPU model in a ``section.gpu`` table of the throughputs file."""
    gpu_model = pool.price.gpu_model or ""
    if gpu_model not in table:
        raise ConfigError(
            f"no {what} throughput for GPU {gpu_model or '?'} ({pool.instance_type}) in "
            f"lensmill/{THROUGHPUTS_FILE} ({section}.gpu lists {', '.join(sorted(table))})"
        )
    return table[gpu_model]


def _require(pool: Pool | None, what: str, cluster_path: str) -> Pool:
    if pool is None:
        raise ConfigError(f"{cluster_path} has no {what} worker node type (max_workers > 0)")
    return pool


def estimate_simulate(cfg: Config, cluster: Cluster, prices: PriceTable, tp: Throughputs) -> StageEstimate:
    """Rendering every image: the ``sim.pool`` actors (one per logical CPU by default), one shard
    per task."""
    pool = _require(cluster.cpu_pool, "CPU", cluster.path)
    sim = cfg.sim
    splits = (sim.n_train, sim.n_val, sim.n_test)
    images = sum(splits)
    shards = sum(math.ceil(n / sim.rows_per_shard) for n in splits)
    plain = (
        sim.lens_mass_model == "SIE"
        and sim.lens_light_components == 1
        and sim.source_clumps_max == 0
        and sim.n_companions_max == 0
    )
    ref_name = "demo" if plain else "realistic"
    ref = tp.simulate.references[ref_name]
    work = len(sim.bands) * (sim.image_size_px * sim.supersampling) ** 2
    ref_work = ref.bands * (ref.image_size_px * ref.supersampling) ** 2
    rate_per_core = ref.value * ref_work / work * tp.cpu_scaling.core_speed_factor.value
    # sim.pool: actors of cpus_per_actor each, up to max_actors (none: as many as the nodes hold).
    per_node = max(1, int(pool.cpus // sim.pool.cpus_per_actor))
    actors = min(shards, sim.pool.max_actors or pool.max_nodes * per_node, pool.max_nodes * per_node)
    nodes = math.ceil(actors / per_node)
    actors_per_node = actors / nodes
    # Actors beyond the node's physical cores share them.
    actor_rate = rate_per_core * min(1.0, _effective_cores(pool, pool.cpus, tp) / actors_per_node)
    waves = math.ceil(shards / actors)
    wall_h = waves * sim.rows_per_shard / actor_rate / 3600
    notes = [
        f"rate from the {ref_name} reference, x {ref_work / work:.3g} for render work "
        f"(bands x (image_size_px x supersampling)^2: {work} vs {ref_work}); assumed proportional",
        f"{shards} shards on {actors} actors ({waves} wave(s)); {actors_per_node:.0f} actors share "
        f"{_effective_cores(pool, pool.cpus, tp):.0f} effective cores per node",
    ]
    return _stage(
        "simulate", images, f"{images:,} images ({shards} shards of <= {sim.rows_per_shard})", pool, nodes,
        nodes * wall_h, wall_h, cluster, prices, tp,
        {"simulate": ref, "core_speed_factor": tp.cpu_scaling.core_speed_factor}, notes,
    )  # fmt: skip


def _cache_fits(cfg: Config) -> bool:
    """Whether each worker's train + val images fit in its in-memory cache (else: streamed each epoch)."""
    from lensmill.train import TRAIN_CACHE_MAX_BYTES  # the one home of the limit (imports torch)

    sim = cfg.sim
    image_bytes = 4 * len(sim.bands) * sim.image_size_px**2
    rows = math.ceil((sim.n_train + sim.n_val) / cfg.train.num_workers)
    return rows * image_bytes <= TRAIN_CACHE_MAX_BYTES


def _trial_models(cfg: Config, tp: Throughputs) -> list[str]:
    """The architecture of every trial: the grid's, or for a sweep (whose samples are not known in
    advance) ``num_samples`` times its costliest architecture."""
    t = cfg.tune
    if t.search_space is None:
        return [m for m in t.models for _ in t.lrs]
    costliest = max(t.architectures, key=lambda m: _model_cost(m, cfg.sim.image_size_px, tp)[0])
    return [costliest] * t.num_samples


def _trial_epochs(cfg: Config) -> int:
    """Epochs of a trial: ``train.epochs``, or the most a sweep samples."""
    space = cfg.tune.space().get("epochs")
    if space is None:
        return cfg.train.epochs
    return int(max(space.values)) if isinstance(space, Choice) else int(space)


def estimate_train(cfg: Config, cluster: Cluster, prices: PriceTable, tp: Throughputs) -> StageEstimate:
    """Every trial of the tune grid (tune.models x tune.lrs) or sweep (tune.num_samples) for all
    epochs on n_train images."""
    t, sim = cfg.train, cfg.sim
    trials = _trial_models(cfg, tp)
    epochs = _trial_epochs(cfg)
    figures: dict[str, Figure] = {}
    notes: list[str] = []
    if t.use_gpu:
        pool = _require(cluster.gpu_pool, "GPU (train.use_gpu is true)", cluster.path)
        figures["train"] = _gpu_figure(tp.train.gpu, "train", "training", pool)
        worker_rate = figures["train"].value
        workers_per_node = min(int(pool.gpus), int(pool.cpus // t.cpus_per_worker))
    else:
        pool = _require(cluster.cpu_pool, "CPU", cluster.path)
        figures["train"] = tp.train.cpu_per_core
        figures["core_speed_factor"] = tp.cpu_scaling.core_speed_factor
        worker_rate = tp.train.cpu_per_core.value * _effective_cores(pool, t.cpus_per_worker, tp)
        workers_per_node = int(pool.cpus // t.cpus_per_worker)
    if workers_per_node < 1:
        raise ConfigError(
            f"train.cpus_per_worker={t.cpus_per_worker:g} does not fit a {pool.instance_type} node "
            f"({pool.cpus:g} CPUs, {pool.gpus:g} GPUs in {cluster.path})"
        )
    nodes_per_trial = math.ceil(t.num_workers / workers_per_node)
    if nodes_per_trial > pool.max_nodes:
        raise ConfigError(
            f"train.num_workers={t.num_workers} needs {nodes_per_trial} {pool.instance_type} nodes; "
            f"{cluster.path} allows {pool.max_nodes}"
        )
    concurrent = max(
        1, min(cfg.tune.max_concurrent_trials or len(trials), len(trials), pool.max_nodes // nodes_per_trial)
    )
    if t.num_workers > 1:
        figures["ddp_efficiency"] = tp.train.ddp_efficiency
        worker_rate *= tp.train.ddp_efficiency.value
    if not _cache_fits(cfg):
        if t.use_gpu:
            notes.append(
                "the split exceeds the in-worker cache: every epoch streams through Ray Data, which "
                f"the {pool.cpus:g} CPUs of a {pool.instance_type} may not feed at the GPU's rate "
                "(not modelled)"
            )
        else:
            figures["streaming_factor_cpu"] = tp.train.streaming_factor_cpu
            worker_rate *= tp.train.streaming_factor_cpu.value
    figures["validation_cost"] = tp.train.validation_cost
    trial_hours = []
    for model in trials:
        rel, figure = _model_cost(model, sim.image_size_px, tp)
        figures[f"model_cost:{model}"] = figure
        images = epochs * (sim.n_train + sim.n_val * tp.train.validation_cost.value)
        trial_hours.append(images / (worker_rate / rel * t.num_workers) / 3600)
    wall_h = max(sum(trial_hours) / concurrent, max(trial_hours))
    notes += [
        f"{len(trials)} trials, {concurrent} at once, {t.num_workers} worker(s) each on "
        f"{nodes_per_trial} node(s)",
        "upper bound: every trial runs every epoch (ASHA stops weak trials after "
        f"tune.grace_period_epochs={cfg.tune.grace_period_epochs})",
    ]
    work = f"{len(trials)} trials x {epochs} epochs x {sim.n_train:,} images (+ validation on {sim.n_val:,})"
    return _stage(
        "train", len(trials) * epochs * sim.n_train, work, pool, concurrent * nodes_per_trial,
        sum(trial_hours) * nodes_per_trial, wall_h, cluster, prices, tp, figures, notes,
    )  # fmt: skip


def estimate_score(
    cfg: Config, cluster: Cluster, prices: PriceTable, tp: Throughputs, images: int | None = None
) -> StageEstimate:
    """Batch scoring (lensmill predict) of the test split, or of ``images`` catalog cutouts."""
    sc, sim = cfg.scoring, cfg.sim
    n = images if images is not None else sim.n_test
    members = sorted(
        (_model_cost(m, sim.image_size_px, tp) + (m,) for m in dict.fromkeys(cfg.tune.architectures)),
        key=lambda x: x[0],
        reverse=True,
    )[: cfg.ensemble.max_members]
    ensemble_cost = sum(rel for rel, _, _ in members)
    figures: dict[str, Figure] = {f"model_cost:{m}": f for _, f, m in members}
    on_gpu = sc.gpus_per_actor > 0
    if on_gpu:
        pool = _require(cluster.gpu_pool, "GPU (scoring.gpus_per_actor > 0)", cluster.path)
        figures["score"] = _gpu_figure(tp.score.gpu, "score", "scoring", pool)
        actors_per_node = min(int(pool.cpus // sc.cpus_per_actor), int(pool.gpus // sc.gpus_per_actor))
    else:
        pool = _require(cluster.cpu_pool, "CPU", cluster.path)
        figures["score"] = tp.score.cpu_per_core
        figures["core_speed_factor"] = tp.cpu_scaling.core_speed_factor
        actors_per_node = int(pool.cpus // sc.cpus_per_actor)
    if actors_per_node < 1:
        raise ConfigError(
            f"a scoring actor ({sc.cpus_per_actor:g} CPUs, {sc.gpus_per_actor:g} GPUs) does not fit a "
            f"{pool.instance_type} node ({pool.cpus:g} CPUs, {pool.gpus:g} GPUs in {cluster.path})"
        )
    # Ray Data adds actors while batches wait: never more than there are batches.
    max_actors = min(sc.max_actors or pool.max_nodes * actors_per_node, math.ceil(n / sc.batch_size))
    nodes = min(pool.max_nodes, math.ceil(max_actors / actors_per_node))
    actors = min(max_actors, nodes * actors_per_node)
    per_node = actors / nodes
    if on_gpu:
        node_rate = figures["score"].value * min(pool.gpus, per_node * sc.gpus_per_actor)
    else:
        node_rate = figures["score"].value * _effective_cores(pool, per_node * sc.cpus_per_actor, tp)
    node_rate /= ensemble_cost
    wall_h = n / (nodes * node_rate) / 3600
    notes = [
        f"{actors} actors on {nodes} node(s); ensemble of {len(members)} member(s) "
        f"({', '.join(m for _, _, m in members)}): {ensemble_cost:.3g} x one ResNet-18 "
        "(upper bound: the costliest ensemble.max_members of the tune architectures)",
    ]
    if images is not None:
        notes.append("catalog scoring: reading the cutouts from storage is assumed not to be the bottleneck")
    work = f"{n:,} images x {len(members)} member(s)"
    return _stage(
        "score", n, work, pool, nodes, nodes * wall_h, wall_h, cluster, prices, tp, figures, notes,
    )  # fmt: skip


def estimate_cost(
    cfg: Config,
    cluster_path: Path = DEFAULT_CLUSTER,
    stages: tuple[str, ...] | list[str] = STAGES,
    images: int | None = None,
    prices: PriceTable | None = None,
    throughputs: Throughputs | None = None,
) -> CostEstimate:
    """The estimate for ``cfg`` on the cluster at ``cluster_path``, stage by stage and in total."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    prices = prices or load_prices()
    tp = throughputs or load_throughputs()
    cluster = read_cluster(Path(cluster_path), prices)
    fns = {
        "simulate": lambda: estimate_simulate(cfg, cluster, prices, tp),
        "train": lambda: estimate_train(cfg, cluster, prices, tp),
        "score": lambda: estimate_score(cfg, cluster, prices, tp, images),
    }
    estimates = tuple(fns[s]() for s in STAGES if s in stages)
    wall_h = sum(s.wall_hours for s in estimates)
    head_ebs = cluster.head.disk_gb * prices.ebs_gp3_usd_per_gb_month / HOURS_PER_MONTH
    head_usd = wall_h * (cluster.head_price.on_demand_usd_per_hour + head_ebs)
    head = HeadEstimate(
        instance_type=cluster.head.instance_type,
        node_hours=wall_h,
        cost_usd={"on_demand": head_usd, "spot": head_usd},  # the head stays on-demand
    )
    total = {
        "node_hours": sum(s.node_hours + s.overhead_node_hours for s in estimates) + wall_h,
        "gpu_hours": sum(s.gpu_hours for s in estimates),
        "wall_hours": wall_h,
        "cost_usd": {k: sum(s.cost_usd[k] for s in estimates) + head_usd for k in ("on_demand", "spot")},
    }
    assumptions = (
        "stages run one after the other; each stage's nodes all on-demand or all on spot "
        "(the head on-demand)",
        "CPU figures per core were measured on a 2-core VM; an instance counts its physical cores "
        "(vCPUs / 2 on these types, no hyperthreading gain) x core_speed_factor",
        "node_hours: nodes x compute time; overhead_node_hours: start-up + idle_timeout_minutes "
        f"({cluster.idle_timeout_minutes:g} min) per node; total node_hours includes both and the head",
        f"prices: {prices.region}, as of {prices.as_of}, approximate; root volumes (gp3) included; "
        "S3 storage, requests and data transfer not included",
        "not counted: ensemble weight search and evaluation (small: val and test splits on the driver)",
    )
    return CostEstimate(
        config=cfg.name,
        cluster=cluster.path,
        prices={"region": prices.region, "as_of": prices.as_of, "source": prices.source},
        stages=estimates,
        head=head,
        total=total,
        assumptions=assumptions,
    )


# -- reporting -----------------------------------------------------------------------------------


def _rounded(obj: Any) -> Any:
    """Floats to 4 significant digits (the figures are not better than that)."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rounded(v) for v in obj]
    return obj


def summarize(estimate: CostEstimate) -> dict[str, Any]:
    """The JSON summary of an estimate (figures rounded; every throughput with its source)."""
    return _rounded(estimate.model_dump(mode="json"))


def _hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} d"


def format_table(estimate: CostEstimate) -> list[str]:
    """A short human-readable table of an estimate, one string per line."""
    rows = [("stage", "instance", "nodes", "node-h", "GPU-h", "wall", "on-demand $", "spot $")]
    for s in estimate.stages:
        rows.append(
            (
                s.stage, s.instance_type, str(s.nodes), f"{s.node_hours + s.overhead_node_hours:.3g}",
                f"{s.gpu_hours:.3g}", _hours(s.wall_hours), f"{s.cost_usd['on_demand']:,.2f}",
                f"{s.cost_usd['spot']:,.2f}",
            )
        )  # fmt: skip
    h, tot = estimate.head, estimate.total
    rows.append(
        ("head", h.instance_type, "1", f"{h.node_hours:.3g}", "0", _hours(h.node_hours),
         f"{h.cost_usd['on_demand']:,.2f}", f"{h.cost_usd['spot']:,.2f}")
    )  # fmt: skip
    rows.append(
        ("total", "", "", f"{tot['node_hours']:.3g}", f"{tot['gpu_hours']:.3g}", _hours(tot["wall_hours"]),
         f"{tot['cost_usd']['on_demand']:,.2f}", f"{tot['cost_usd']['spot']:,.2f}")
    )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    measured = sorted({k for s in estimate.stages for k, f in s.figures.items() if f.kind == "measured"})
    estimated = sorted({k for s in estimate.stages for k, f in s.figures.items() if f.kind == "estimate"})
    lines.append(
        f"measured figures: {', '.join(measured) or 'none'}; estimates: {', '.join(estimated) or 'none'}"
    )
    lines.append(f"prices: {estimate.prices['region']}, as of {estimate.prices['as_of']}, approximate")
    return lines


def log_estimate(estimate: CostEstimate) -> None:
    """The table, line by line, to the lensmill logger (stderr under the CLI)."""
    log.info("cost estimate for %s on %s:", estimate.config, estimate.cluster)
    for line in format_table(estimate):
        log.info("  %s", line)
