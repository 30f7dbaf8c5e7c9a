"""The sweep's pieces without Ray: its config, search space, concurrency, searcher, table and plot."""

import math

import pytest
import torch

from lensmill.config import Choice, LogUniform, StorageConfig, load_config
from lensmill.errors import ConfigError
from lensmill.records import RunSummary, SweepTrial, TrialResult
from lensmill.train import dihedral_augment, train_step

SMOKE = "jobs/configs/smoke.yaml"
SPACE = (
    "tune.search_space={lr: {dist: loguniform, min: 1e-4, max: 1e-2}, weight_decay: 0.001, "
    "batch_size: {dist: choice, values: [16, 32]}, label_smoothing: {min: 0.0, max: 0.1}}"
)


def test_a_search_space_takes_the_sim_syntax_and_fills_in_models_and_lrs():
    cfg = load_config(SMOKE, [SPACE, "tune.num_samples=5"])
    space = cfg.tune.space()
    assert space["model"] == Choice(dist="choice", values=("tiny", "timm:resnet10t"))
    assert isinstance(space["lr"], LogUniform) and space["weight_decay"] == 0.001
    assert cfg.tune.architectures == ("tiny", "timm:resnet10t") and cfg.tune.trial_count == 5
    one = load_config(SMOKE, [SPACE, "tune.models=[resnet18]"])
    assert one.tune.space()["model"] == "resnet18" and one.tune.architectures == ("resnet18",)
    # Without a space: the grid.
    assert load_config(SMOKE).tune.trial_count == 2 and load_config(SMOKE).tune.space() == {}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.search_space={epochz: 3}", "tune.search_space.epochz: not a setting a sweep samples"),
        ("tune.search_space={batch_size: {min: 8, max: 64}}", "tune.search_space.batch_size: takes a fixed"),
        ("tune.search_space={lr: {dist: choice, values: [0.1, -1]}}", "search_space.lr: Input should be"),
        ("tune.search_space={label_smoothing: {min: 0, max: 1.5}}", "label_smoothing: Input should"),
        ("tune.search_space={lr: {dist: normal, mean: 0.1, std: 1}}", "search_space.lr: Input tag 'normal'"),
        ("tune.search_space={}", "tune.search_space: empty"),
    ],
)  # fmt: skip
def test_a_bad_search_space_names_the_setting(override: str, message: str):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{")):
        load_config(SMOKE, [override])


def test_a_space_that_samples_nothing_is_refused():
    with pytest.raises(ConfigError, match="every setting is fixed"):
        load_config(SMOKE, ["tune.models=[tiny]", "tune.search_space={lr: 0.01}"])


def test_an_unknown_architecture_fails_before_any_trial_naming_the_field():
    from lensmill.tune import check_architectures

    cfg = load_config(SMOKE, ["tune.search_space={model: {dist: choice, values: [tiny, resnet9000]}}"])
    with pytest.raises(ConfigError, match=r"tune.search_space.model: unknown model 'resnet9000'"):
        check_architectures(cfg.tune)
    with pytest.raises(ConfigError, match=r"tune.models: unknown timm model 'nosuchnet'"):
        check_architectures(load_config(SMOKE, ["tune.models=[tiny, 'timm:nosuchnet']"]).tune)
    check_architectures(load_config(SMOKE, ["tune.models=[vit_cutout_tiny, 'timm:resnet10t']"]).tune)


def test_fixed_settings_go_into_every_trial_and_sampled_ones_become_tune_domains():
    from ray.tune.search.sample import Categorical, Float

    from lensmill.tune import search_domains, sweep_base, trial_run_name

    cfg = load_config(SMOKE, [SPACE])
    base = sweep_base(cfg)
    assert base.train.weight_decay == 0.001
    domains = search_domains(cfg.tune)
    assert set(domains) == {"model", "lr", "batch_size", "label_smoothing"}
    assert isinstance(domains["lr"], Float) and domains["lr"].lower == 1e-4
    assert isinstance(domains["batch_size"], Categorical) and domains["batch_size"].categories == [16, 32]
    # Every sampled setting is part of the run's name (its config hash): no two trials share a folder.
    a = {"model": "tiny", "lr": 1e-3, "batch_size": 16, "label_smoothing": 0.05}
    assert trial_run_name(base, a) != trial_run_name(base, a | {"batch_size": 32})
    assert trial_run_name(base, a).startswith("smoke-tiny-lr0.001-")


def test_trials_at_once_follow_each_trials_resources_and_the_cluster():
    from lensmill.tune import trial_concurrency

    cfg = load_config(SMOKE, [SPACE, "tune.num_samples=8", "tune.max_concurrent_trials=null"])
    # Two workers of 2 CPUs plus the trial's own 0.1 CPU: 4.1 CPUs a trial.
    two = load_config(SMOKE, [SPACE, "tune.max_concurrent_trials=null", "train.num_workers=2"])
    assert trial_concurrency(two, {"CPU": 16.0}) == 3
    assert trial_concurrency(cfg, {"CPU": 4.0}) == 1 and trial_concurrency(cfg, {"CPU": 1.0}) == 1
    assert trial_concurrency(cfg, {"CPU": 64.0}) == 8  # never more than num_samples
    gpu = load_config(SMOKE, [SPACE, "tune.max_concurrent_trials=null", "train.use_gpu=true"])
    assert trial_concurrency(gpu, {"CPU": 64.0, "GPU": 3.0}) == 3
    capped = load_config(SMOKE, [SPACE, "tune.max_concurrent_trials=2"])
    assert trial_concurrency(capped, {"CPU": 64.0}) == 2


def test_the_searcher_is_told_finished_trials_and_proposes_unfinished_ones_first():
    from lensmill.tune import make_searcher

    cfg = load_config(SMOKE, [SPACE])
    done = {"model": "tiny", "lr": 1e-3, "batch_size": 16, "label_smoothing": 0.0}
    pending = {"model": "timm:resnet10t", "lr": 3e-3, "batch_size": 32, "label_smoothing": 0.05}
    searcher = make_searcher(cfg.tune, [(done, 0.9), (done | {"lr": 2e-3}, math.nan)], [pending])
    trials = searcher._ot_study.get_trials()
    # The pending point waits in the queue; the finished ones are in the study with their values.
    assert [t.state.name for t in trials] == ["WAITING", "COMPLETE", "FAIL"] and trials[1].value == 0.9
    assert searcher.suggest("a") == pending
    fresh = searcher.suggest("b")
    assert set(fresh) == set(pending) and 1e-4 <= fresh["lr"] <= 1e-2 and fresh["batch_size"] in (16, 32)


def summary(name: str, auc: float, tpr10: float) -> RunSummary:
    history = (
        {"epoch": 0, "val_auc": auc - 0.1, "val_tpr10": 0.1},
        {"epoch": 1, "val_auc": auc, "val_tpr10": tpr10},
    )
    return RunSummary(
        run_name=name, model="tiny", lr=1e-3, dataset_uri="/d", dataset_id="d", mlflow_run_id="r",
        image_shape=(1, 8, 8), in_chans=1, cache_in_memory=True, val_auc=auc, best_epoch=1,
        epochs_run=2, stopped_early=True, stop_reason="scheduler", attempts=1, checkpoint_uri="/c",
        member_file="model.pt", history=history,
    )  # fmt: skip


def test_the_results_table_has_a_column_per_sampled_setting_and_the_best_epochs_tpr10(tmp_path):
    from lensmill.plots import plot_parallel_coordinates
    from lensmill.tune import table_columns, trials_markdown, trials_table

    trials = [
        TrialResult(model="tiny", lr=1e-3, run_name="a", params={"lr": 1e-3, "batch_size": 16},
                    summary=summary("a", 0.8, 0.4)),
        TrialResult(model="tiny", lr=2e-3, run_name="b", params={"lr": 2e-3, "batch_size": 32},
                    summary=summary("b", 0.9, 0.6)),
        TrialResult(model="tiny", lr=5e-3, run_name="c", params={"lr": 5e-3, "batch_size": 32}, error="boom"),
    ]  # fmt: skip
    rows = trials_table(trials, ["batch_size"])
    assert [r["trial"] for r in rows] == ["b", "a", "c"]
    assert rows[0]["batch_size"] == 32 and rows[0]["val_tpr10"] == 0.6 and rows[2]["val_tpr10"] is None
    columns = table_columns(["batch_size"])
    assert columns[:4] == ("trial", "model", "lr", "batch_size") and "val_tpr10" in columns
    md = trials_markdown(rows, columns).splitlines()
    assert md[0].startswith("| trial | model | lr | batch_size |") and "| 32 |" in md[2]
    png = plot_parallel_coordinates(rows, ["model", "lr", "batch_size"], "val_auc", tmp_path / "pc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_sweep_trial_record_round_trips_with_its_value_types(tmp_path):
    from lensmill.records import read_record, write_record

    rec = SweepTrial(run_name="r", params={"model": "tiny", "lr": 1e-3, "batch_size": 32, "augment": False})
    write_record(str(tmp_path / "r.json"), rec, StorageConfig())
    back = read_record(str(tmp_path / "r.json"), SweepTrial, StorageConfig())
    assert back == rec and type(back.params["batch_size"]) is int and back.params["augment"] is False
    assert summary("s", 0.9, 0.6).at_best_epoch("val_tpr10") == 0.6
    assert math.isnan(summary("s", 0.9, 0.6).at_best_epoch("val_nothing"))


def test_augment_strength_zero_keeps_every_image_and_one_matches_the_default():
    x = torch.randn(64, 1, 8, 8)
    assert torch.equal(dihedral_augment(x, torch.Generator().manual_seed(0), 0.0), x)
    full = dihedral_augment(x, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(full, dihedral_augment(x, torch.Generator().manual_seed(0)))
    half = dihedral_augment(x, torch.Generator().manual_seed(0), 0.5)
    kept = sum(torch.equal(a, b) for a, b in zip(half, x, strict=True))
    # About half untouched plus 1/8 of the transformed drawing the identity: ~56%.
    assert 20 <= kept <= 52


def test_label_smoothing_pulls_the_targets_towards_one_half():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(16, 4), (torch.arange(16) % 2).float()

    def loss(smoothing: float) -> float:
        m = torch.nn.Linear(4, 1)
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        wrapped = torch.nn.Sequential(m, torch.nn.Flatten(0))
        return train_step(wrapped, opt, x, y, torch.device("cpu"), None, label_smoothing=smoothing)

    logits = model(x).squeeze(1).detach()
    target = y * 0.8 + 0.1
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item()
    assert loss(0.2) == pytest.approx(want, rel=1e-6) and loss(0.2) != pytest.approx(loss(0.0))


def test_the_cost_of_a_sweep_counts_num_samples_trials_of_its_costliest_architecture():
    from lensmill.cost import estimate_cost

    base = ["sim.n_train=60000", "tune.models=[resnet18, resnet34]"]
    (grid,) = estimate_cost(load_config(None, base), stages=["train"]).stages
    (sweep,) = estimate_cost(load_config(None, [*base, SPACE, "tune.num_samples=6"]), stages=["train"]).stages
    assert sweep.work.startswith("6 trials") and grid.work.startswith("2 trials")
    # Six trials of resnet34 (2x ResNet-18) against one of each: 12 / 3 = 4x the node-hours.
    assert sweep.node_hours / grid.node_hours == pytest.approx(4.0, rel=0.01)


def test_a_fresh_sweep_tries_every_architecture_first_and_a_resumed_one_only_those_left():
    from lensmill.tune import make_searcher

    cfg = load_config(SMOKE, [SPACE])
    archs = list(cfg.tune.space()["model"].values)
    first = make_searcher(cfg.tune, [], [])
    assert [first.suggest(f"t{i}")["model"] for i in range(len(archs))] == archs
    done = {"model": archs[0], "lr": 1e-3, "batch_size": 16, "label_smoothing": 0.0}
    resumed = make_searcher(cfg.tune, [(done, 0.9)], [])
    assert resumed.suggest("a")["model"] == archs[1]
