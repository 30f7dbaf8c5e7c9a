"""Resources come from the config, never from what is up when a stage starts."""

from __future__ import annotations

import numpy as np
import pytest

from lensmill.config import ConfigError, load_config
from lensmill.models import LensClassifier
from lensmill.predict import EnsemblePredictor, Member
from lensmill.serve import build_endpoint, deployment_options, ingress_env


def test_serve_replicas_fixed_or_autoscaled() -> None:
    fixed = deployment_options(load_config(None, ["serve.num_replicas=3"]).serve)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    cfg = load_config(
        None, ["serve.autoscaling={min_replicas: 0, max_replicas: 6, target_ongoing_requests: 4}",
               "serve.gpus_per_replica=0.25"],
    )  # fmt: skip
    opts = deployment_options(cfg.serve)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 6,
        "target_ongoing_requests": 4.0,
    }
    assert opts["ray_actor_options"]["num_gpus"] == 0.25
    deployment = build_endpoint(cfg)._bound_deployment
    auto = deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (0, 6, 4.0)
    with pytest.raises(ConfigError, match="serve.autoscaling"):
        load_config(None, ["serve.autoscaling={min_replicas: 5, max_replicas: 2}"])


def test_serve_ingress_sets_the_controllers_environment() -> None:
    assert ingress_env(load_config(None, []).serve) == {}  # Serve's Python proxy: nothing to set
    s = load_config(None, ["serve.ingress=haproxy", "serve.port=8123", "serve.haproxy_stats_port=18404",
                           "serve.haproxy_metrics_port=19101"]).serve  # fmt: skip
    env = ingress_env(s)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]) == ("18404", "19101")
    # Its files in a folder of this endpoint's port, not Serve's one folder for the machine.
    paths = [v for k, v in env.items() if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert len(paths) == 5 and all("lensmill-haproxy-8123" in v for v in paths)
    assert ingress_env(load_config(None, ["serve.ingress=haproxy", "serve.port=8124"]).serve) != env
    with pytest.raises(ConfigError, match="serve.ingress"):
        load_config(None, ["serve.ingress=nginx"])


def test_scoring_pool_bounds() -> None:
    sc = load_config(None, []).scoring
    assert sc.min_actors == 1 and sc.max_actors is None and sc.gpus_per_actor == 0
    with pytest.raises(ConfigError, match="scoring"):
        load_config(None, ["scoring.min_actors=4", "scoring.max_actors=2"])


def test_simulation_pool_grows_within_its_bounds_and_is_not_part_of_the_dataset() -> None:
    from ray.data import ActorPoolStrategy

    from lensmill.runtime import actor_pool_options
    from lensmill.shards import dataset_id_for

    default = load_config(None, [])
    wide = load_config(
        None, ["sim.pool.min_actors=2", "sim.pool.max_actors=64", "sim.pool.cpus_per_actor=0.5"]
    )
    assert dataset_id_for(default.sim) == dataset_id_for(wide.sim)
    assert "pool" not in wide.sim.identity()
    assert dataset_id_for(load_config(None, ["sim.seed=1"]).sim) != dataset_id_for(default.sim)
    opts = actor_pool_options(wide.sim.pool, n_tasks=10)
    assert isinstance(opts["compute"], ActorPoolStrategy) and opts["num_cpus"] == 0.5
    assert (opts["compute"].min_size, opts["compute"].max_size) == (2, 10)  # never more actors than shards
    one = actor_pool_options(default.sim.pool, n_tasks=1)["compute"]
    assert (one.min_size, one.max_size) == (1, 1)
    uncapped = actor_pool_options(default.scoring)["compute"]
    assert uncapped.min_size == 1 and uncapped.max_size in (None, float("inf"))
    with pytest.raises(ConfigError, match="sim.pool"):
        load_config(None, ["sim.pool.min_actors=4", "sim.pool.max_actors=2"])


def test_predictor_moves_to_a_device_and_answers_the_same() -> None:
    model = LensClassifier("tiny", 1, [0.0], [1.0])
    predictor = EnsemblePredictor([Member("a", model, 1.0)], (1, 16, 16))
    images = np.random.default_rng(0).normal(size=(3, 1, 16, 16)).astype(np.float32)
    before = predictor.predict(images)["p_lens"]
    assert predictor.to("cpu") is predictor
    np.testing.assert_allclose(predictor.predict(images)["p_lens"], before)
